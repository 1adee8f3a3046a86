"""A tiny digits classifier and helpers shared by the callback tests (not a test module)."""
from __future__ import annotations

import glob

import torch
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(train_size: int = 192, val_size: int = 96, batch_size: int = 32):
    """Standardised 8x8 digits images, a fixed split, no shuffling (runs are reproducible)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    train = TensorDataset(images[:train_size], labels[:train_size])
    val = TensorDataset(images[train_size:train_size + val_size], labels[train_size:train_size + val_size])
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=batch_size)


def small_cnn(spiked: bool = True, dropout: float = 0.0) -> nn.Sequential:
    """Conv-Conv-Linear. ``spiked`` adds a fixed rank-2 component to the last two weights, so
    that EVBMF keeps some components and the AE measures are not all 0 from the start."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(16, 10),
    )
    if spiked:
        with torch.no_grad():
            for index in (2, 7):
                matrix = net[index].weight.view(net[index].weight.shape[0], -1)
                generator = torch.Generator().manual_seed(index)
                u = torch.randn(matrix.shape[0], 2, generator=generator)
                v = torch.randn(2, matrix.shape[1], generator=generator)
                matrix.add_(u @ v * matrix.std() / 2)
    return net


def classifier_class(pl):
    """A LightningModule class for the Lightning package ``pl`` (pytorch_lightning or lightning.pytorch)."""

    class DigitsClassifier(pl.LightningModule):
        def __init__(self, lr: float = 0.02, spiked: bool = True, dropout: float = 0.0):
            super().__init__()
            self.lr = lr
            self.net = small_cnn(spiked, dropout)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return DigitsClassifier


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``log_dir``: tag -> [(step, value)] by step
    (a resumed run writes a second file; duplicates stay)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(values, key=lambda item: item[0]) for tag, values in scalars.items()}


def read_events(log_dir: str) -> list[EventAccumulator]:
    accumulators = []
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        events.Reload()
        accumulators.append(events)
    return accumulators
