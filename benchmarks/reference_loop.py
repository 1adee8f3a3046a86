"""What the GenProb reference code does, per matrix, for side-by-side timing.

Per layer and unfolding, as the reference does: a full SVD (numpy's default, ``full_matrices=True``)
for the metrics, another for the norms, and the reference EVBMF: its own full SVD, scipy's bounded
minimiser, and the rebuilt low-rank matrix ``U diag(d) Vᵀ`` whose norm is its AE Frobenius norm;
all on the CPU in numpy, one matrix at a time.
The per-matrix math is the tests' independent SPEC reference (tests/reference.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# The tests' per-matrix references, written from SPEC independently of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import reference_evbmf, reference_metrics  # noqa: E402


def reference_probe(state_dict: dict[str, np.ndarray]) -> list[tuple[float, ...]]:
    """Per-layer measures, the reference way (numpy float64 arrays in, one tuple per matrix out)."""
    rows = []
    for weight in state_dict.values():
        weight = np.asarray(weight, dtype=np.float64)
        unfoldings = ([weight, weight] if weight.ndim == 2 else
                      [np.swapaxes(weight, 0, 1).reshape(weight.shape[1], -1), weight.reshape(weight.shape[0], -1)])
        for matrix in unfoldings:
            _, s, _ = np.linalg.svd(matrix)  # metrics
            _, s_norms, _ = np.linalg.svd(matrix)  # norms, again
            wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
            u, s_evbmf, vt = np.linalg.svd(wide)  # EVBMF's own SVD
            with np.errstate(all="ignore"):
                d, _ = reference_evbmf(s_evbmf, wide.shape[1])
            rebuilt = (u[:, : len(d)] * d) @ vt[: len(d)]
            rows.append(tuple(reference_metrics(s, len(s)).values()) + tuple(reference_metrics(d, len(s)).values())
                        + (np.linalg.norm(s_norms), np.linalg.norm(rebuilt)))
    return rows
