"""Independent per-matrix references written from SPEC, in numpy/scipy, for the tests."""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar


def reference_evbmf(s: np.ndarray, cols: int) -> tuple[np.ndarray, float]:
    """Kept, shrunk singular values and sigma2 of SPEC §3, one matrix, scipy's bounded Brent."""
    s = np.asarray(s, dtype=np.float64)
    L, M = len(s), cols
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

    sigma2 = minimize_scalar(objective, bounds=[lower, upper], method="bounded").x
    threshold = np.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    kept = s[s > threshold]
    shrink = 1 - (L + M) * sigma2 / kept**2
    d = kept / 2 * (shrink + np.sqrt(np.maximum(shrink**2 - 4 * L * M * sigma2**2 / kept**4, 0)))
    return d, sigma2


def reference_metrics(values: np.ndarray, n: int) -> dict[str, float]:
    """SPEC §2 measures of descending values (all used), stable rank dividing by ``n``."""
    if len(values) == 0:
        return dict(S=0.0, C=0.0, ER=0.0, spec=0.0, fro=0.0, SQ=0.0)
    first, last = values[0], values[-1]
    p = values / values.sum()
    p = p[p > 0]
    stable = np.sum(values / first) / n
    return dict(
        S=stable,
        C=first / last if last > 0 else np.inf,
        ER=float(-np.sum(p * np.log(p))),
        spec=first,
        fro=float(np.sqrt(np.sum(values**2))),
        SQ=float(np.arctan2(stable, 1 - last / first)),
    )


def reference_layer(weight: np.ndarray) -> dict[str, float]:
    """Every per-layer column of SPEC §5 (BE and AE) for one weight, per matrix, numpy SVD."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim == 2:
        matrices = {"in": weight, "out": weight}
    else:
        matrices = {
            "in": np.swapaxes(weight, 0, 1).reshape(weight.shape[1], -1),
            "out": weight.reshape(weight.shape[0], -1),
        }
    row = {}
    for side, matrix in matrices.items():
        s = np.linalg.svd(matrix, compute_uv=False)
        n = len(s)
        for key, value in reference_metrics(s, n).items():
            row[f"{side}_{key}_BE"] = value
        d, _ = reference_evbmf(s, max(matrix.shape))
        for key, value in reference_metrics(d, n).items():
            row[f"{side}_{key}_AE"] = value
        row[f"{side}_rank_AE"] = len(d)
        row[f"{side}_weight_BE"] = row[f"{side}_weight_AE"] = n
    return row
