"""Per-matrix measures from singular values (SPEC §2 and §3)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_probes.functional._ordered import ordered_sum


class SpectralMetrics(NamedTuple):
    """One ``(B,)`` tensor per measure, names as the reference CSV columns."""

    S: Tensor  # stable rank, GenProb's definition: sum(s_i / s_1) / N
    C: Tensor  # condition number s_1 / s_last
    ER: Tensor  # effective rank, entropy (nats) of s / sum(s)
    spec: Tensor  # spectral norm s_1
    fro: Tensor  # Frobenius norm sqrt(sum s_i^2)
    SQ: Tensor  # stable quality atan2(S, 1 - s_last / s_1)


def spectral_metrics(values: Tensor, count: Tensor | None = None, size: Tensor | None = None
                     ) -> SpectralMetrics:
    """Measures of matrices given by descending values ``(B, width)``, of which the first
    ``count`` are used (default: ``size``); stable rank divides by ``size``, the matrix's N
    (default: ``width``), also for the kept EVBMF values (SPEC §3).

    A matrix whose values are all zero has NaN S, C, ER and SQ (undefined) and zero norms; with
    ``count`` given, a matrix that keeps no value has every measure 0 (the reference's AE rule).

    >>> m = spectral_metrics(torch.ones(1, 4, dtype=torch.float64))
    >>> float(m.S[0]), float(m.C[0]), round(float(m.ER[0]), 6), round(float(m.SQ[0]), 6)
    (1.0, 1.0, 1.386294, 1.570796)
    """
    width = values.shape[-1]
    kept_rank_given = count is not None
    if size is None:
        size = torch.full(values.shape[:-1], width, dtype=torch.long, device=values.device)
    if count is None:
        count = size
    position = torch.arange(width, device=values.device)
    used = torch.where(position < count[:, None], values, torch.zeros_like(values))
    first = used[:, 0]
    last = used.gather(1, (count - 1).clamp_min(0)[:, None]).squeeze(1)
    total = ordered_sum(used)
    stable_rank = total / first / size
    condition = first / last
    share = used / total[:, None]
    effective_rank = -ordered_sum(torch.where(share > 0, share * torch.log(share), torch.zeros_like(share)))
    frobenius = torch.sqrt(ordered_sum(used**2))
    stable_quality = torch.atan2(stable_rank, 1 - last / first)

    undefined = first == 0
    nan = torch.full_like(first, float("nan"))
    stable_rank, condition, effective_rank, stable_quality = (
        torch.where(undefined, nan, t)
        for t in (stable_rank, condition, effective_rank, stable_quality)
    )
    result = SpectralMetrics(stable_rank, condition, effective_rank, first, frobenius, stable_quality)
    if kept_rank_given:
        empty = count == 0
        result = SpectralMetrics(*(torch.where(empty, torch.zeros_like(t), t) for t in result))
    return result
