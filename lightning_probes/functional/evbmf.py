"""EVBMF (Nakajima et al., JMLR 2013) from singular values only, batched (SPEC §3).

The noise variance is found with a batched port of scipy's bounded Brent minimiser
(``scipy.optimize.minimize_scalar(method="bounded")``, default ``xatol``), step for step, so the
minimiser equals the reference code's up to float rounding in the objective.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

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

        a = torch.where(active, new_a, a)
        b = torch.where(active, new_b, b)
        fulc = torch.where(active, new_fulc, fulc)
        ffulc = torch.where(active, new_ffulc, ffulc)
        nfc = torch.where(active, new_nfc, nfc)
        fnfc = torch.where(active, new_fnfc, fnfc)
        xf = torch.where(active, new_xf, xf)
        fx = torch.where(active, new_fx, fx)
        e = torch.where(active, new_e, e)
        rat = torch.where(active, new_rat, rat)
        nfev = nfev + active.long()
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * xf.abs() + xatol / 3.0
        tol2 = 2.0 * tol1
    return BoundedMinimum(xf, fx, nfev)


def _tau(x: Tensor, alpha: float) -> Tensor:
    shifted = x - (1 + alpha)
    return 0.5 * (shifted + torch.sqrt((shifted**2 - 4 * alpha).clamp_min(0)))


def _x_bar(alpha: float) -> tuple[float, float]:
    tau_bar = 2.5129 * math.sqrt(alpha)
    return tau_bar, (1 + tau_bar) * (1 + alpha / tau_bar)


def noise_variance_bounds(s: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` of SPEC §3 for singular values ``s`` of shape ``(B, L)``, ``L <= cols``."""
    rows = s.shape[-1]
    alpha = rows / cols
    _, x_bar = _x_bar(alpha)
    tail_start = min(math.ceil(rows / (1 + alpha)) - 1, rows)  # = h + 1 of SPEC §3
    squares = s**2
    upper = squares.sum(-1) / (rows * cols)
    lower = torch.maximum(
        squares[:, tail_start] / (cols * x_bar), squares[:, tail_start:].mean(-1) / cols
    )
    return lower, upper


def evbmf_objective(sigma2: Tensor, s: Tensor, cols: int) -> Tensor:
    """The EVBMF free energy of SPEC §3 step 1, at noise variances ``sigma2 (B,)``."""
    rows = s.shape[-1]
    alpha = rows / cols
    _, x_bar = _x_bar(alpha)
    x = s**2 / (cols * sigma2[:, None])
    above = x > x_bar
    tau = _tau(x, alpha)
    below_terms = x - torch.log(x)
    above_terms = x - tau + torch.log((tau + 1) / x) + alpha * torch.log(tau / alpha + 1)
    return torch.where(above, above_terms, below_terms).sum(-1)


def evbmf(s: Tensor, cols: int, xatol: float = 1e-5) -> EVBMFResult:
    """EVBMF of matrices given by their singular values ``s (B, L)`` (descending), ``L <= cols``.

    >>> s = torch.tensor([[50.0, 1.1, 1.0, 0.9]], dtype=torch.float64)
    >>> result = evbmf(s, cols=40)
    >>> int(result.rank[0]), round(float(result.values[0, 0]), 3)
    (1, 49.977)
    """
    rows = s.shape[-1]
    if rows > cols:
        raise ValueError(f"EVBMF needs rows <= cols, got {rows} singular values for {cols} columns")
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    lower, upper = noise_variance_bounds(s, cols)
    sigma2 = minimize_scalar_bounded(
        lambda v: evbmf_objective(v, s, cols), lower, upper, xatol=xatol
    ).x
    # Written as the reference writes it, so ties at the threshold fall the same way.
    threshold = torch.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    kept = s > threshold[:, None]
    shrink = 1 - (rows + cols) * sigma2[:, None] / s**2
    root = torch.sqrt((shrink**2 - 4 * rows * cols * sigma2[:, None] ** 2 / s**4).clamp_min(0))
    values = torch.where(kept, s / 2 * (shrink + root), torch.zeros_like(s))
    return EVBMFResult(values, kept.sum(-1), sigma2)
