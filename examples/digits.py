"""Data and models shared by the examples: scikit-learn's bundled 8x8 digits, no download.

``digits_loaders`` standardises the images and repeats them to 3 channels (the GenProb NIN takes
RGB input); ``DigitsClassifier`` is built for the Lightning package the example uses
(``pytorch_lightning`` or ``lightning.pytorch``, whose class trees are separate).
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def cpu_setup(threads: int | None) -> None:
    """Flush denormals (small CNNs train several times slower on CPU without it) and, when
    given, set torch's CPU thread count."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)

def digits_loaders(batch_size: int = 64, val_share: float = 0.25, seed: int = 0):
    """Train and validation loaders: a stratified split of the 1797 digits, standardised with
    the training statistics, shape (3, 8, 8)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=val_share, stratify=digits.target, random_state=seed
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), batch_size=batch_size,
                       shuffle=True, generator=generator)
    val = DataLoader(TensorDataset(images[val_idx], labels[val_idx]), batch_size=256)
    return train, val


def small_cnn(width: int = 32) -> nn.Sequential:
    """Two 3x3 conv layers and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def kaiming_init(network: nn.Module) -> nn.Module:
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return network


def classifier(pl, network: nn.Module, optimizer: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0):
    """A LightningModule of package ``pl`` training ``network``; logs ``val_acc`` and ``val_loss``."""

    class DigitsClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
            return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    return DigitsClassifier()
