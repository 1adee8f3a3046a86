"""What the GenProb reference code does, per matrix, for side-by-side timing.

Per layer and unfolding, the four calls of the reference's ``get_metrics`` (GenProb
``source/process.py``): ``compute`` (an SVD with vectors, as ``torch.svd``), ``norms`` (another
one), ``compute_low_rank`` (EVBMF: its own SVD and scipy's bounded minimiser) and
``norms_low_rank`` (EVBMF again, then the rebuilt low-rank matrix ``U diag(d) Vᵀ`` for its AE
Frobenius norm); all on the CPU in numpy float64, one matrix at a time.
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
            wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
            _, s, _ = np.linalg.svd(wide, full_matrices=False)  # compute
            _, s_norms, _ = np.linalg.svd(matrix, full_matrices=False)  # norms
            d = _evbmf(wide)[1]  # compute_low_rank
            u, d_norms, vt = _evbmf(wide)  # norms_low_rank
            rebuilt = (u * d_norms) @ vt
            rows.append(tuple(reference_metrics(s, len(s)).values()) + tuple(reference_metrics(d, len(s)).values())
                        + (s_norms[0], np.linalg.norm(matrix), np.linalg.norm(rebuilt)))
    return rows


def _evbmf(wide: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference EVBMF: an SVD with vectors, the bounded search, the kept factors."""
    u, s, vt = np.linalg.svd(wide, full_matrices=False)
    with np.errstate(all="ignore"):
        d, _ = reference_evbmf(s, wide.shape[1])
    return u[:, : len(d)], d, vt[: len(d)]
