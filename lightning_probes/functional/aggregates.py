"""Network-level aggregates of per-matrix measures (SPEC §4, the paper's Q_M^AGG)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

AGGREGATIONS = ("L1", "L2", "p", "wL1", "wp")


class Aggregates(NamedTuple):
    """Each field has the batch shape of the input (everything but its last dim)."""

    L1: Tensor  # mean |x|
    L2: Tensor  # sqrt(sum x^2) / sqrt(n)
    p: Tensor  # geometric mean
    wL1: Tensor  # channel-weighted mean
    wp: Tensor  # channel-weighted geometric mean


def aggregate(values: Tensor, weights: Tensor) -> Aggregates:
    """Aggregate ``values`` over the last dim with channel ``weights`` of the same shape.

    Entries that are 0 or not finite are left out; an aggregate over no entries is 0.0.
    No host synchronisation.

    >>> x = torch.tensor([1.0, 4.0, 0.0, float("inf")], dtype=torch.float64)
    >>> w = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    >>> [round(float(v), 4) for v in aggregate(x, w)]
    [2.5, 2.9155, 2.0, 3.25, 2.8284]
    """
    kept = torch.isfinite(values) & (values != 0)
    zeros = torch.zeros_like(values)
    magnitude = torch.where(kept, values.abs(), zeros)
    log_magnitude = torch.where(kept, torch.log(torch.where(kept, values.abs(), torch.ones_like(values))), zeros)
    kept_weights = torch.where(kept, weights.to(values.dtype), zeros)
    n = kept.sum(-1).to(values.dtype)
    weight_total = kept_weights.sum(-1)
    has_entries = n > 0
    has_weight = weight_total > 0
    safe_n = torch.where(has_entries, n, torch.ones_like(n))
    safe_weight = torch.where(has_weight, weight_total, torch.ones_like(weight_total))

    def where_defined(defined: Tensor, value: Tensor) -> Tensor:
        return torch.where(defined, value, torch.zeros_like(value))

    return Aggregates(
        L1=where_defined(has_entries, magnitude.sum(-1) / safe_n),
        L2=where_defined(has_entries, torch.sqrt((magnitude**2).sum(-1) / safe_n)),
        p=where_defined(has_entries, torch.exp(log_magnitude.sum(-1) / safe_n)),
        wL1=where_defined(has_weight, (kept_weights * magnitude).sum(-1) / safe_weight),
        wp=where_defined(has_weight, torch.exp((kept_weights * log_magnitude).sum(-1) / safe_weight)),
    )
