"""EVBMF (Nakajima et al., JMLR 2013) from singular values only, batched (SPEC §3).

The noise variance is found with a batched port of scipy's bounded Brent minimiser
(``scipy.optimize.minimize_scalar(method="bounded")``, default ``xatol``), step for step, so the
minimiser equals the reference code's up to float rounding in the objective.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from lightning_probes.functional._ordered import ordered_sum

_SQRT_EPS = math.sqrt(2.2e-16)  # as scipy writes it
_GOLDEN_MEAN = 0.5 * (3.0 - math.sqrt(5.0))
#: Iterations between host checks of convergence in the batched minimiser.
_CHECK_EVERY = 4


class EVBMFResult(NamedTuple):
    """Denoised values ``(B, L)`` (zero past the kept rank), kept rank ``(B,)``, noise ``(B,)``."""

    values: Tensor
    rank: Tensor
    noise_variance: Tensor


class BoundedMinimum(NamedTuple):
    x: Tensor
    fun: Tensor
    nfev: Tensor


def minimize_scalar_bounded(
    func: Callable[[Tensor], Tensor],
    lower: Tensor,
    upper: Tensor,
    xatol: float = 1e-5,
    maxiter: int = 500,
) -> BoundedMinimum:
    """Minimise ``B`` scalar functions at once, each over its own ``[lower, upper]``.

    ``func`` maps a ``(B,)`` tensor of points to ``(B,)`` values. The iteration is scipy's
    ``_minimize_scalar_bounded`` (Brent: golden section plus parabolic steps), run for all
    problems in lockstep; a finished problem is frozen while the others go on.

    >>> f = lambda x: (x - torch.tensor([1.0, 2.0], dtype=torch.float64)) ** 2
    >>> lo, hi = torch.zeros(2, dtype=torch.float64), torch.full((2,), 3.0, dtype=torch.float64)
    >>> minimize_scalar_bounded(f, lo, hi).x
    tensor([1., 2.], dtype=torch.float64)
    """
    a, b = lower.clone(), upper.clone()
    fulc = a + _GOLDEN_MEAN * (b - a)
    nfc, xf = fulc.clone(), fulc.clone()
    rat = torch.zeros_like(a)
    e = torch.zeros_like(a)
    fx = func(xf)
    ffulc, fnfc = fx.clone(), fx.clone()
    nfev = torch.ones_like(a, dtype=torch.long)
    xm = 0.5 * (a + b)
    tol1 = _SQRT_EPS * xf.abs() + xatol / 3.0
    tol2 = 2.0 * tol1

    for iteration in range(maxiter):
        active = ((xf - xm).abs() > (tol2 - 0.5 * (b - a))) & (nfev < maxiter)
        if iteration % _CHECK_EVERY == 0 and not bool(active.any()):
            break
        # Parabolic fit through the three best points, when the last steps were long enough.
        try_parabola = e.abs() > tol1
        r = (xf - nfc) * (fx - ffulc)
        q = (xf - fulc) * (fx - fnfc)
        p = (xf - fulc) * q - (xf - nfc) * r
        q = 2.0 * (q - r)
        p = torch.where(q > 0.0, -p, p)
        q = q.abs()
        accept = (
            try_parabola
            & (p.abs() < (0.5 * q * e).abs())
            & (p > q * (a - xf))
            & (p < q * (b - xf))
        )
        rat_parabola = p / q
        x_parabola = xf + rat_parabola
        near_bound = ((x_parabola - a) < tol2) | ((b - x_parabola) < tol2)
        toward_middle = torch.sign(xm - xf) + (xm == xf).to(a.dtype)
        rat_parabola = torch.where(near_bound, tol1 * toward_middle, rat_parabola)
        e_golden = torch.where(xf >= xm, a - xf, b - xf)
        new_e = torch.where(accept, rat, e_golden)
        new_rat = torch.where(accept, rat_parabola, _GOLDEN_MEAN * e_golden)

        step_sign = torch.sign(new_rat) + (new_rat == 0).to(a.dtype)
        x = xf + step_sign * torch.maximum(new_rat.abs(), tol1)
        fu = func(x)

        improved = fu <= fx
        right = x >= xf
        shift_near = (fu <= fnfc) | (nfc == xf)
        shift_far = ~shift_near & ((fu <= ffulc) | (fulc == xf) | (fulc == nfc))
        new_a = torch.where(improved, torch.where(right, xf, a), torch.where(right, a, x))
        new_b = torch.where(improved, torch.where(right, b, xf), torch.where(right, x, b))
        new_fulc = torch.where(improved | shift_near, nfc, torch.where(shift_far, x, fulc))
        new_ffulc = torch.where(improved | shift_near, fnfc, torch.where(shift_far, fu, ffulc))
        new_nfc = torch.where(improved, xf, torch.where(shift_near, x, nfc))
        new_fnfc = torch.where(improved, fx, torch.where(shift_near, fu, fnfc))
        new_xf = torch.where(improved, x, xf)
        new_fx = torch.where(improved, fu, fx)

        state = torch.stack((a, b, fulc, ffulc, nfc, fnfc, xf, fx, e, rat))
        new_state = torch.stack((new_a, new_b, new_fulc, new_ffulc, new_nfc, new_fnfc, new_xf, new_fx, new_e, new_rat))
        a, b, fulc, ffulc, nfc, fnfc, xf, fx, e, rat = torch.where(active, new_state, state).unbind(0)
        nfev = nfev + active.long()
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * xf.abs() + xatol / 3.0
        tol2 = 2.0 * tol1
    return BoundedMinimum(xf, fx, nfev)


class _Dims(NamedTuple):
    """Per-matrix sizes of a ragged batch, as ``(B, 1)`` float tensors for broadcasting."""

    rows: Tensor
    cols: Tensor
    alpha: Tensor
    tau_bar: Tensor
    x_bar: Tensor
    valid: Tensor  # (B, width): which entries of the padded values are singular values


def _dims(s: Tensor, cols: int | Sequence[int], rows: Sequence[int] | None) -> _Dims:
    batch, width = s.shape
    rows = [width] * batch if rows is None else list(rows)
    cols = [cols] * batch if isinstance(cols, int) else list(cols)
    if len(rows) != batch or len(cols) != batch:
        raise ValueError(f"rows and cols need one entry per matrix ({batch}), got {len(rows)} and {len(cols)}")
    for r, c in zip(rows, cols):
        if not 0 < r <= min(c, width):
            raise ValueError(f"EVBMF needs 0 < rows <= cols and rows <= {width} values, got rows={r}, cols={c}")
    as_column = lambda values: torch.tensor(values, dtype=s.dtype, device=s.device)[:, None]  # noqa: E731
    rows_t, cols_t = as_column(rows), as_column(cols)
    alpha = rows_t / cols_t
    tau_bar = 2.5129 * torch.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    valid = torch.arange(width, device=s.device) < rows_t
    return _Dims(rows_t, cols_t, alpha, tau_bar, x_bar, valid)


def noise_variance_bounds(s: Tensor, cols: int | Sequence[int], rows: Sequence[int] | None = None
                          ) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` of SPEC §3 for descending singular values ``s (B, width)``.

    Matrix ``b`` has ``rows[b]`` values (default: all ``width``; the rest is padding) and
    ``cols[b] >= rows[b]`` columns.
    """
    dims = _dims(s, cols, rows)
    row_counts = [s.shape[-1]] * s.shape[0] if rows is None else list(rows)
    col_counts = [cols] * s.shape[0] if isinstance(cols, int) else list(cols)
    # h + 1 of SPEC §3, in Python floats exactly as the reference computes it
    tail_start = torch.tensor(
        [[min(math.ceil(r / (1 + r / c)) - 1, r)] for r, c in zip(row_counts, col_counts)], device=s.device
    )
    squares = torch.where(dims.valid, s**2, torch.zeros((), dtype=s.dtype, device=s.device))
    upper = ordered_sum(squares) / (dims.rows * dims.cols).squeeze(1)
    tail = dims.valid & (torch.arange(s.shape[-1], device=s.device) >= tail_start)
    tail_mean = ordered_sum(squares * tail) / tail.sum(-1)
    lower = torch.maximum(
        squares.gather(1, tail_start).squeeze(1) / (dims.cols * dims.x_bar).squeeze(1),
        tail_mean / dims.cols.squeeze(1),
    )
    return lower, upper


def _objective(sigma2: Tensor, s: Tensor, dims: _Dims) -> Tensor:
    x = s**2 / (dims.cols * sigma2[:, None])
    shifted = x - (1 + dims.alpha)
    tau = 0.5 * (shifted + torch.sqrt((shifted**2 - 4 * dims.alpha).clamp_min(0)))
    below_terms = x - torch.log(x)
    above_terms = x - tau + torch.log((tau + 1) / x) + dims.alpha * torch.log(tau / dims.alpha + 1)
    terms = torch.where(x > dims.x_bar, above_terms, below_terms)
    return ordered_sum(torch.where(dims.valid, terms, torch.zeros((), dtype=s.dtype, device=s.device)))


def evbmf_objective(sigma2: Tensor, s: Tensor, cols: int | Sequence[int],
                    rows: Sequence[int] | None = None) -> Tensor:
    """The EVBMF free energy of SPEC §3 step 1 at noise variances ``sigma2 (B,)``."""
    return _objective(sigma2, s, _dims(s, cols, rows))


def evbmf(s: Tensor, cols: int | Sequence[int], rows: Sequence[int] | None = None,
          xatol: float = 1e-5) -> EVBMFResult:
    """EVBMF of matrices given by their descending singular values ``s (B, width)``.

    Matrix ``b`` has ``rows[b] <= cols[b]`` dims (``rows`` defaults to ``width``; values past
    ``rows[b]`` are padding), so matrices of different shapes share one batched minimisation.

    >>> s = torch.tensor([[50.0, 1.1, 1.0, 0.9]], dtype=torch.float64)
    >>> result = evbmf(s, cols=40)
    >>> int(result.rank[0]), round(float(result.values[0, 0]), 3)
    (1, 49.977)
    """
    dims = _dims(s, cols, rows)
    lower, upper = noise_variance_bounds(s, cols, rows)
    sigma2 = minimize_scalar_bounded(lambda v: _objective(v, s, dims), lower, upper, xatol=xatol).x
    sigma2 = sigma2[:, None]
    # Written as the reference writes it, so ties at the threshold fall the same way.
    threshold = torch.sqrt(dims.cols * sigma2 * (1 + dims.tau_bar) * (1 + dims.alpha / dims.tau_bar))
    kept = dims.valid & (s > threshold)
    shrink = 1 - (dims.rows + dims.cols) * sigma2 / s**2
    root = torch.sqrt((shrink**2 - 4 * dims.rows * dims.cols * sigma2**2 / s**4).clamp_min(0))
    values = torch.where(kept, s / 2 * (shrink + root), torch.zeros((), dtype=s.dtype, device=s.device))
    return EVBMFResult(values, kept.sum(-1), sigma2.squeeze(1))
