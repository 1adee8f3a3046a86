"""What the GenProb reference code does, per matrix, for side-by-side timing.

Per layer and unfolding: a full SVD for the metrics, another for the norms, and the reference
EVBMF (its own SVD, then scipy's bounded minimiser); all on the CPU in numpy, one matrix at a time.
Used by the benchmarks only; the tests have their own independent references.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar


def _evbmf(matrix: np.ndarray) -> np.ndarray:
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    L, M = matrix.shape
    _, s, _ = np.linalg.svd(matrix, full_matrices=False)
    alpha = L / M
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h = int(min(math.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = np.sum(s**2) / (L * M)
    lower = max(s[h + 1] ** 2 / (M * x_bar), np.mean(s[h + 1:] ** 2) / M)

    def objective(sigma2):
        x = s**2 / (M * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                + alpha * np.sum(np.log(tau / alpha + 1)))

    with np.errstate(all="ignore"):
        sigma2 = minimize_scalar(objective, bounds=[lower, upper], method="bounded").x
    threshold = np.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    kept = s[s > threshold]
    shrink = 1 - (L + M) * sigma2 / kept**2
    return kept / 2 * (shrink + np.sqrt(np.maximum(shrink**2 - 4 * L * M * sigma2**2 / kept**4, 0)))


def _metrics(values: np.ndarray, n: int) -> tuple[float, ...]:
    if len(values) == 0:
        return (0.0,) * 6
    p = values / values.sum()
    p = p[p > 0]
    stable = np.sum(values / values[0]) / n
    return (stable, values[0] / values[-1], -np.sum(p * np.log(p)), values[0],
            np.sqrt(np.sum(values**2)), np.arctan2(stable, 1 - values[-1] / values[0]))


def reference_probe(state_dict: dict[str, np.ndarray]) -> list[tuple[float, ...]]:
    """Per-layer measures, the reference way (numpy float64 arrays in, one tuple per matrix out)."""
    rows = []
    for weight in state_dict.values():
        weight = np.asarray(weight, dtype=np.float64)
        unfoldings = ([weight, weight] if weight.ndim == 2 else
                      [np.swapaxes(weight, 0, 1).reshape(weight.shape[1], -1), weight.reshape(weight.shape[0], -1)])
        for matrix in unfoldings:
            _, s, _ = np.linalg.svd(matrix, full_matrices=False)  # metrics
            _, s_norms, _ = np.linalg.svd(matrix, full_matrices=False)  # norms, again
            d = _evbmf(matrix)
            rows.append(_metrics(s, len(s)) + _metrics(d, len(s)) + (np.linalg.norm(s_norms),))
    return rows
