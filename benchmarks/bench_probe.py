"""Probe speed on a CIFAR ResNet-18, side by side with the reference loop, WeightWatcher and the
bare spectra, plus per-matrix time and peak memory as layers grow.

    python benchmarks/bench_probe.py [--repeats 5] [--sizes 256 512 1024 2048 4096]

Every contender runs interleaved in one process, medians over repeats, on 1 thread and on all
threads; ratios are printed with the machine line. Nothing is asserted: see RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name, load_average  # noqa: E402
from models import CifarResNet18  # noqa: E402
from reference_loop import reference_probe  # noqa: E402

from lightning_probes import probe  # noqa: E402
from lightning_probes.functional import singular_values, unfold_in, unfold_out  # noqa: E402


def machine_line() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}, "
            f"python {platform.python_version()}, {load_average()}")


def bare_spectra(weights: list[torch.Tensor]) -> None:
    """The floor: float64 singular values of both unfoldings, same-shape matrices batched."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for weight in weights:
        for matrix in ((weight,) if weight.dim() == 2 else (unfold_in(weight), unfold_out(weight))):
            if matrix.shape[0] > matrix.shape[1]:
                matrix = matrix.mT
            groups.setdefault(tuple(matrix.shape), []).append(matrix)
    for shape, matrices in groups.items():
        batch = torch.empty((len(matrices), *shape), dtype=torch.float64)
        for slot, matrix in zip(batch, matrices):
            slot.copy_(matrix)
        singular_values(batch)


def weightwatcher_analyze(model) -> None:
    import weightwatcher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weightwatcher.WeightWatcher(model=model).analyze()


def time_contenders(contenders: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():  # interleaved, so load drifts hit all alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def resnet_table(repeats: int, threads: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = CifarResNet18().eval()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    numpy_weights = {str(i): w.double().numpy() for i, w in enumerate(weights)}
    contenders = {
        "(a) probe(evbmf=True)": lambda: probe(model, evbmf=True),
        "(b) reference per-layer loop": lambda: reference_probe(numpy_weights),
        "(c) weightwatcher analyze()": lambda: weightwatcher_analyze(model),
        "(d) bare float64 spectra": lambda: bare_spectra(weights),
    }
    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        for run in contenders.values():  # warm-up (imports, allocator, BLAS init)
            run()
        return time_contenders(contenders, repeats)


def matrix_point(kind: str, size: int) -> dict:
    """Time and peak RSS of probing one matrix, in this (fresh) process, on 1 thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = torch.randn(size, size) if kind == "linear" else torch.randn(size, size, 3, 3)
    weight /= weight[0].numel() ** 0.5
    base = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:  # resets the high-water mark VmHWM
        clear.write("5")
    start = time.perf_counter()
    probe({"w.weight": weight})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (_resident_kib("VmHWM") - base) / 1024,
            "weight_mib": weight.numel() * 4 / 2**20}


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--point", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(matrix_point(args.point[0], int(args.point[1]))))
        return

    print(f"machine: {machine_line()}")
    all_threads = os.cpu_count() or 1
    for threads in sorted({1, all_threads}):
        medians = resnet_table(args.repeats, threads)
        a, b, c, d = medians.values()
        print(f"\nCIFAR ResNet-18 (21 convs + 1 linear), {threads} thread(s), median of {args.repeats}:")
        for name, seconds in medians.items():
            print(f"  {name:32s} {seconds * 1e3:9.1f} ms")
        print(f"  (a)/(d) = {a / d:.2f}x   (c)/(a) = {c / a:.1f}x faster   (b)/(a) = {b / a:.1f}x faster")

    print("\nOne matrix, 1 thread, fresh process each (probe with EVBMF; peak RSS above the start):")
    print(f"  {'kind':28s} {'time':>10s} {'peak':>10s} {'weight (fp32)':>14s}")
    for kind in ("linear", "conv"):
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--point", kind, str(size)],
                                 capture_output=True, text=True, check=True).stdout
            point = json.loads(out.strip().splitlines()[-1])
            label = f"Linear {size}x{size}" if kind == "linear" else f"Conv {size}x{size}x3x3"
            print(f"  {label:28s} {point['seconds'] * 1e3:8.1f}ms {point['peak_mib']:8.1f}MiB "
                  f"{point['weight_mib']:12.1f}MiB")


if __name__ == "__main__":
    main()
