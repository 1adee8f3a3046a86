"""Weight tensors as matrices (SPEC §1).

A conv weight ``(out, in, *kernel)`` has two unfoldings: **in** (mode-3), rows indexed by input
channels, and **out** (mode-4), rows indexed by output channels. A Linear weight ``(out, in)`` is
used as both. The channel weight of a matrix, used by weighted aggregates, is its smaller side.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def unfolded_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the (in, out) unfoldings of a weight of ``shape``, without touching data.

    >>> unfolded_shapes((16, 8, 3, 3))
    ((8, 144), (16, 72))
    >>> unfolded_shapes((10, 4))
    ((10, 4), (10, 4))
    """
    if len(shape) < 2:
        raise ValueError(f"a weight needs at least 2 dims to unfold, got shape {tuple(shape)}")
    out_channels, in_channels = shape[0], shape[1]
    if len(shape) == 2:
        return (out_channels, in_channels), (out_channels, in_channels)
    kernel = math.prod(shape[2:])
    return (in_channels, out_channels * kernel), (out_channels, in_channels * kernel)


def unfold_in(weight: Tensor) -> Tensor:
    """Mode-3 unfolding: ``(in, out * prod(kernel))``; a 2-D weight is returned as it is.

    >>> unfold_in(torch.zeros(16, 8, 3, 3)).shape
    torch.Size([8, 144])
    """
    if weight.dim() == 2:
        return weight
    return weight.transpose(0, 1).reshape(weight.shape[1], -1)


def unfold_out(weight: Tensor) -> Tensor:
    """Mode-4 unfolding: ``(out, in * prod(kernel))``; a 2-D weight is returned as it is.

    >>> unfold_out(torch.zeros(16, 8, 3, 3)).shape
    torch.Size([16, 72])
    """
    if weight.dim() == 2:
        return weight
    return weight.reshape(weight.shape[0], -1)


def channel_weights(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(in_weight, out_weight)`` of SPEC §1: the smaller side of each unfolding.

    >>> channel_weights((16, 8, 3, 3))
    (8, 16)
    """
    (in_rows, in_cols), (out_rows, out_cols) = unfolded_shapes(shape)
    return min(in_rows, in_cols), min(out_rows, out_cols)
