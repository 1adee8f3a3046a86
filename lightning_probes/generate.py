"""Train a GenProb model zoo on scikit-learn's bundled digits and checkpoint it in GenProb format.

Every model of the complete grid  channel codes x optimizers x learning-rate scales x batch sizes
x weight decays x seeds  is a NIN (SPEC §6) trained by a Lightning Trainer; after every epoch E a
checkpoint callback writes OUT/<prefix>_NIN<code>_<optimizer>_<lr>_<batch>_<wd>_<seed>_DIGITS_epoch_<E>.pth.tar
with the network's state dict and performance_statistics (train/test accuracy as fractions and
mean cross-entropy, for every epoch 1..E). The learning rate is the optimizer's base rate (Adam
1e-3, SGD 0.02 with momentum 0.9) times the scale. Data: the 1797 8x8 digits, split stratified
with a small train share (so generalization gaps are visible), standardised per pixel on the
train split, repeated to 3 channels. Kaiming-normal init; deterministic for given options on one
machine and --threads, whatever --jobs; denormals flushed. Models whose last checkpoint exists are skipped, so
an interrupted run continues where it stopped.

examples:
  lightning-probes generate zoo --quick                  # 4 models x 3 epochs, about a minute
  lightning-probes generate zoo                          # the default zoo: 48 models x 20 epochs
  lightning-probes generate zoo --codes 00000 01234 --optimizers sgd --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes.genprob import checkpoint_file_name, nin_from_code, write_checkpoint

DATASET_NAME = "DIGITS"
#: Base learning rate of each optimizer; ``--lr-scales`` multiplies it.
BASE_LEARNING_RATES = {"adam": 1e-3, "sgd": 0.02}
SGD_MOMENTUM = 0.9
EVAL_BATCH_SIZE = 512
DEFAULT_JOBS = min(os.cpu_count() or 1, 8)

DEFAULT_GRID = dict(codes=["00000", "10101", "01010"], optimizers=["adam", "sgd"],
                    lr_scales=[0.5, 1.0], batch_sizes=[32, 64], weight_decays=[0.0, 5e-4],
                    seeds=[0], epochs=20)
QUICK_GRID = dict(codes=["00000"], optimizers=["adam", "sgd"], lr_scales=[1.0], batch_sizes=[64],
                  weight_decays=[0.0, 5e-4], seeds=[0], epochs=3)


@dataclass(frozen=True)
class ZooMember:
    """One model of the grid and the five name tokens it is written under."""

    code: str
    optimizer: str
    learning_rate: float
    batch_size: int
    weight_decay: float
    seed: int

    @property
    def tokens(self) -> tuple[str, ...]:
        return (self.optimizer, f"{self.learning_rate:g}", str(self.batch_size),
                f"{self.weight_decay:g}", str(self.seed))


def zoo_grid(codes, optimizers, lr_scales, batch_sizes, weight_decays, seeds) -> list[ZooMember]:
    """The complete grid, in a fixed order.

    >>> len(zoo_grid(**{k: v for k, v in DEFAULT_GRID.items() if k != "epochs"}))
    48
    """
    return [
        ZooMember(code, optimizer, BASE_LEARNING_RATES[optimizer] * scale, batch, decay, seed)
        for code, optimizer, scale, batch, decay, seed in itertools.product(
            codes, optimizers, lr_scales, batch_sizes, weight_decays, seeds)
    ]


def digits_datasets(train_fraction: float = 0.2, split_seed: int = 0
                    ) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (train, test) tensors of shape (n, 3, 8, 8): a stratified split,
    standardised per pixel with the train split's statistics, repeated to three channels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, train_size=train_fraction, stratify=labels, random_state=split_seed)
    scaler = StandardScaler().fit(train_x)

    def as_dataset(x, y) -> TensorDataset:
        pixels = torch.tensor(scaler.transform(x), dtype=torch.float32).view(-1, 1, 8, 8)
        return TensorDataset(pixels.repeat(1, 3, 1, 1), torch.tensor(y, dtype=torch.long))

    return as_dataset(train_x, train_y), as_dataset(test_x, test_y)


def initial_network(code: str, seed: int) -> nn.Module:
    """The untrained NIN a zoo member starts from: ``torch.manual_seed(seed)``, the NIN of the
    channel code, Kaiming-normal (fan-out) init of every Conv2d. Deterministic, so a study can
    rebuild any member's epoch-0 weights.

    >>> a, b = initial_network("00000", 0), initial_network("00000", 0)
    >>> all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    True
    """
    torch.manual_seed(seed)
    network = nin_from_code(code, num_classes=10)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network


def _lightning_classes():
    # Lightning is imported when a zoo is generated, not when the package is.
    import pytorch_lightning as pl

    class DigitsClassifier(pl.LightningModule):
        """A NIN on digits that keeps GenProb's ``performance_statistics`` per finished epoch:
        train accuracy/loss averaged over the epoch's batches, test ones over the test split."""

        def __init__(self, member: ZooMember):
            super().__init__()
            self.member = member
            self.network = initial_network(member.code, member.seed)
            self.performance_statistics: dict[str, float] = {}
            self._sums = {"train": torch.zeros(3, dtype=torch.float64),
                          "test": torch.zeros(3, dtype=torch.float64)}

        def _step(self, batch, split: str) -> torch.Tensor:
            inputs, targets = batch
            logits = self.network(inputs)
            loss = F.cross_entropy(logits, targets)
            correct = (logits.argmax(1) == targets).sum()
            self._sums[split] += torch.tensor(
                [float(loss.detach()) * len(targets), float(correct), len(targets)],
                dtype=torch.float64)
            return loss

        def training_step(self, batch, batch_index):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_index):
            self._step(batch, "test")

        def on_train_epoch_start(self):
            self._sums["train"].zero_()

        def on_validation_epoch_start(self):
            self._sums["test"].zero_()

        def on_validation_epoch_end(self):
            # Validation runs after the epoch's last training batch: both sums are complete.
            epoch = self.current_epoch + 1
            for split in ("train", "test"):
                loss_sum, correct, count = self._sums[split].tolist()
                self.performance_statistics[f"{split}_acc1_epoch_{epoch}"] = correct / count
                self.performance_statistics[f"{split}_loss_epoch_{epoch}"] = loss_sum / count

        def configure_optimizers(self):
            member = self.member
            if member.optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=member.learning_rate,
                                        weight_decay=member.weight_decay)
            return torch.optim.SGD(self.parameters(), lr=member.learning_rate, momentum=SGD_MOMENTUM,
                                   weight_decay=member.weight_decay)

    class GenProbCheckpointWriter(pl.Callback):
        """Writes the network and its statistics in GenProb format at the end of every epoch
        (epochs counted from 1: the file of epoch E holds the weights after E epochs)."""

        def __init__(self, directory: Path, prefix: str):
            self.directory = directory
            self.prefix = prefix

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            name = checkpoint_file_name(self.prefix, pl_module.member.code, pl_module.member.tokens,
                                        DATASET_NAME, epoch)
            write_checkpoint(self.directory / name, pl_module.network.state_dict(),
                             pl_module.performance_statistics)

    return pl, DigitsClassifier, GenProbCheckpointWriter


def train_member(member: ZooMember, out: Path, prefix: str, epochs: int,
                 datasets: tuple[TensorDataset, TensorDataset]) -> None:
    """Train one model of the grid, writing its GenProb checkpoint after every epoch."""
    pl, DigitsClassifier, GenProbCheckpointWriter = _lightning_classes()
    module = DigitsClassifier(member)
    train_set, test_set = datasets
    shuffle = torch.Generator().manual_seed(member.seed)
    train_loader = DataLoader(train_set, batch_size=member.batch_size, shuffle=True,
                              generator=shuffle)
    test_loader = DataLoader(test_set, batch_size=EVAL_BATCH_SIZE)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[GenProbCheckpointWriter(out, prefix)],
    )
    trainer.fit(module, train_loader, test_loader)


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's per-Trainer banners and small-data hints while the zoo trains."""
    import pytorch_lightning  # noqa: F401  (it sets its logger's level when first imported)

    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch",
                                                    "lightning.fabric", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="directory to write the .pth.tar files into")
    parser.add_argument("--quick", action="store_true",
                        help="a 4-model, 3-epoch zoo (about a minute on 2 CPU cores); explicit "
                             "grid options still override it")
    parser.add_argument("--codes", nargs="+", help="NIN channel codes, five digits each "
                        f"(default {' '.join(DEFAULT_GRID['codes'])})")
    parser.add_argument("--optimizers", nargs="+", choices=sorted(BASE_LEARNING_RATES),
                        help="default: adam sgd")
    parser.add_argument("--lr-scales", nargs="+", type=float,
                        help="multipliers of the optimizer's base learning rate "
                             "(adam 1e-3, sgd 0.02; default 0.5 1)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 32 64")
    parser.add_argument("--weight-decays", nargs="+", type=float, help="default: 0 5e-4")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0")
    parser.add_argument("--epochs", type=int, help="epochs per model (default 20)")
    parser.add_argument("--train-fraction", type=float, default=0.2,
                        help="share of the digits used for training, stratified (default 0.2)")
    parser.add_argument("--prefix", default="zoo", help="file-name prefix (default zoo)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"models trained in parallel processes (default: the CPU count, at "
                             f"most 8; here {DEFAULT_JOBS})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: these small models train "
                             "fastest on one thread; more threads only add contention)")


def _train_member_in_worker(member: ZooMember, out: Path, prefix: str, epochs: int,
                            train_fraction: float, threads: int) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    with _quiet_lightning():
        train_member(member, out, prefix, epochs, digits_datasets(train_fraction))


def run(args: argparse.Namespace) -> int:
    grid = dict(QUICK_GRID if args.quick else DEFAULT_GRID)
    for key in grid:
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    epochs = grid.pop("epochs")
    members = zoo_grid(**grid)
    args.out.mkdir(parents=True, exist_ok=True)
    pending = [member for member in members if not (args.out / checkpoint_file_name(
        args.prefix, member.code, member.tokens, DATASET_NAME, epochs)).exists()]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    try:
        _train_all(args, pending, len(members), epochs)
    finally:  # back to torch's defaults when called in-process
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    print(f"{len(members)} models x {epochs} epochs in {args.out} ({len(pending)} trained now, "
          f"{time.perf_counter() - start:.0f} s)")
    return 0


def _train_all(args: argparse.Namespace, pending: list[ZooMember], total: int, epochs: int) -> None:
    from tqdm import tqdm

    progress = tqdm(total=total, initial=total - len(pending), desc="models", unit="model")
    if min(args.jobs, len(pending)) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(pending)), mp_context=context) as pool:
            futures = [pool.submit(_train_member_in_worker, member, args.out, args.prefix, epochs,
                                   args.train_fraction, args.threads) for member in pending]
            for future in as_completed(futures):
                future.result()
                progress.update()
    else:
        datasets = digits_datasets(args.train_fraction)
        with _quiet_lightning():
            for member in pending:
                train_member(member, args.out, args.prefix, epochs, datasets)
                progress.update()
    progress.close()
