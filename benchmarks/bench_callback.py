"""ProbeCallback's overhead on the quickstart: the same training with and without the callback.

    python benchmarks/bench_callback.py                      # NIN 00000 on digits, 3 x 2 runs of 4 epochs
    python benchmarks/bench_callback.py --write-results      # also update benchmarks/RESULTS.md

Runs alternate (without, with, without, with, ...) so that drifts in machine load hit both
alike. An epoch's time is the wall time from one ``on_train_epoch_start`` to the next (training,
validation, the probe and its logging); each run's first epoch is left out (warm-up). Reports the
medians, the overhead as a percentage of the epoch, and the probe's own median time (from
``probe/time_ms``) as a percentage of the epoch. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from digits import classifier, digits_loaders, kaiming_init  # noqa: E402
from machine import cpu_name, load_average  # noqa: E402
from lightning_probes.genprob import nin_from_code  # noqa: E402
from lightning_probes.pytorch_lightning import ProbeCallback  # noqa: E402

SECTION = "## ProbeCallback overhead (benchmarks/bench_callback.py)"


class EpochClock(pl.Callback):
    """Epoch start times; placed after ProbeCallback, also each probe's own time."""

    def __init__(self, probes: ProbeCallback | None):
        self.probes = probes
        self.starts: list[float] = []
        self.probe_times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def on_validation_end(self, trainer, pl_module):
        if self.probes is not None and not trainer.sanity_checking:
            self.probe_times.append(self.probes.last_result.time_ms / 1e3)

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def epoch_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts[1:], self.starts[2:])]  # first epoch: warm-up


def run(with_probes: bool, args, log_dir: str) -> tuple[list[float], list[float]]:
    pl.seed_everything(args.seed, verbose=False)
    train, val = digits_loaders(args.batch_size, seed=args.seed)
    model = classifier(pl, kaiming_init(nin_from_code(args.code)), "adam", 1e-2)
    probes = ProbeCallback() if with_probes else None
    clock = EpochClock(probes)
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=[probes, clock] if with_probes else [clock],
        logger=TensorBoardLogger(log_dir, name="with" if with_probes else "without"),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train, val)
    return clock.epoch_times(), clock.probe_times[1:]


def machine_line(threads: int) -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}, "
            f"pytorch-lightning {pl.__version__}, python {platform.python_version()}, {load_average()}")


def write_results(text: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in current:
        before, rest = current.split(SECTION, 1)
        after = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
        current = before + text + after
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", default="00000", help="NIN channel code (the quickstart's)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    times = {False: [], True: []}
    probe_times: list[float] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.repeats):
            for with_probes in (False, True):
                epochs, probed = run(with_probes, args, log_dir)
                times[with_probes] += epochs
                probe_times += probed
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    probe = statistics.median(probe_times)
    overhead = 100 * (with_ - without) / without
    machine = machine_line(args.threads)
    text = (
        f"{SECTION}\n\n"
        f"Quickstart (NIN{args.code} on digits, batch {args.batch_size}, Adam), {args.repeats} x 2 interleaved runs of "
        f"{args.epochs} epochs, first epoch of each run left out; medians.\n\n"
        "| epoch without callback | epoch with callback | overhead | probe alone (`probe/time_ms`) |\n"
        "|---|---|---|---|\n"
        f"| {without:.3f} s | {with_:.3f} s | {overhead:+.1f} % | "
        f"{1e3 * probe:.0f} ms = {100 * probe / without:.1f} % of an epoch |\n\n"
        f"Target < 5 % of an epoch: **{'met' if overhead < 5 else 'not met'}**. The probe's own time "
        "(`probe()` on the NIN's 24 weights, with EVBMF) is the floor; the rest of the difference is "
        "the callback's logging (one TensorBoard event per probe for all per-layer scalars, "
        "`pl_module.log` of the aggregates) and run-to-run noise.\n\n"
        f"Machine: {machine}.\n"
    )
    print(text)
    if args.write_results:
        write_results(text)


if __name__ == "__main__":
    main()
