"""Checkpoints per second: ``lightning-probes replay`` against the reference-style per-layer loop,
on the same GenProb files.

    python benchmarks/bench_replay.py [--zoo DIR] [--repeats 5]

Without ``--zoo`` a ``generate --quick`` zoo is made in a temporary directory first. Per repeat,
interleaved, both contenders read every file of the zoo:

* replay: the whole command (``lightning-probes replay ZOO --out fresh.csv``: safe load, probe,
  table, atomic part commits, merge), in this process;
* reference: what the GenProb code does per file: ``torch.load``, the 4-D ``onv``/``down``
  weights, then per matrix a full SVD for the metrics and another for the norms and scipy's
  bounded EVBMF (``benchmarks/reference_loop.py``).

Both on one CPU thread (torch and BLAS). Medians over repeats; the replay's time split into
loading and probing is printed too. Nothing is asserted: see RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from bench_probe import machine_line  # noqa: E402
from reference_loop import reference_probe  # noqa: E402

from lightning_probes import probe  # noqa: E402
from lightning_probes.cli import main  # noqa: E402
from lightning_probes.genprob import read_checkpoint  # noqa: E402


def reference_replay(files: list[Path]) -> None:
    for path in files:
        content = torch.load(path, map_location="cpu", weights_only=True)
        weights = {key: value.numpy() for key, value in content["state_dict_network"].items()
                   if value.dim() == 4 and ("onv" in key or "down" in key)}
        reference_probe(weights)


def replay(zoo: Path, out: Path) -> None:
    assert main(["replay", str(zoo), "--out", str(out), "--no-progress", "--threads", "1"]) == 0


def load_and_probe_split(files: list[Path]) -> tuple[float, float]:
    load = probing = 0.0
    for path in files:
        start = time.perf_counter()
        checkpoint = read_checkpoint(path)
        middle = time.perf_counter()
        probe(checkpoint.state_dict, layers="genprob", num_threads=1)
        load += middle - start
        probing += time.perf_counter() - middle
    return load, probing


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, help="a directory of GenProb files (default: a --quick zoo)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    zoo = args.zoo
    if zoo is None:
        zoo = work / "zoo"
        assert main(["generate", str(zoo), "--quick", "--jobs", "2"]) == 0
    files = sorted(zoo.glob("*.pth.tar"))
    torch.set_num_threads(1)
    times = {"replay": [], "reference": []}
    split = []
    with threadpool_limits(1):
        replay(zoo, work / "warmup.csv")
        for repeat in range(args.repeats):
            start = time.perf_counter()
            replay(zoo, work / f"replay{repeat}.csv")
            times["replay"].append(time.perf_counter() - start)
            start = time.perf_counter()
            reference_replay(files)
            times["reference"].append(time.perf_counter() - start)
            split.append(load_and_probe_split(files))

    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: len(files) / seconds for name, seconds in median.items()}
    load = statistics.median(s[0] for s in split) / len(files) * 1e3
    probing = statistics.median(s[1] for s in split) / len(files) * 1e3
    print(machine_line())
    print(f"zoo: {len(files)} GenProb checkpoints ({zoo}), 1 thread, median of {args.repeats}")
    print(f"{'contender':<12}{'s total':>10}{'ckpt/s':>10}")
    for name in times:
        print(f"{name:<12}{median[name]:>10.2f}{rate[name]:>10.1f}")
    print(f"replay / reference speed-up: {median['reference'] / median['replay']:.1f}x")
    print(f"replay per checkpoint: load {load:.1f} ms, probe {probing:.1f} ms")
    print(json.dumps({"checkpoints": len(files), "median_s": median, "ckpt_per_s": rate,
                      "speedup": median["reference"] / median["replay"],
                      "load_ms": load, "probe_ms": probing}))


if __name__ == "__main__":
    main_benchmark()
