"""Exact singular values of batches of same-shape matrices, on their device.

Wide Gram matrices are the fastest exact route: for ``A`` of shape ``(N, M)`` with ``N <= M``,
``eigvalsh(A @ A.T)`` costs about half a singular-value decomposition. Its error on ``s_i`` is
about ``eps * s_1**2 / s_i`` (relative ``eps * (s_1 / s_i)**2``), so every value is exact to
~1e-10 relative while ``s_1 / s_N <= GRAM_MAX_CONDITION``. Matrices beyond that are recomputed
with LAPACK's ``svdvals``, which is accurate to ``eps * s_1`` absolute for every value; values
below ``~eps * s_1`` are then rounding noise whatever the method.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Largest ``s_1 / s_N`` for which the Gram route is used (its relative error is ~cond² · eps).
GRAM_MAX_CONDITION = 1e3


def singular_values(matrices: Tensor) -> Tensor:
    """Singular values, descending, of a batch ``(B, rows, cols)``: a ``(B, min(rows, cols))``
    tensor in the input's dtype and on its device. One host sync per call, none per matrix.

    A matrix with a NaN or infinite entry gets NaN values (found from its Gram diagonal, so
    entries whose squares overflow count as infinite).

    >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))[None])
    tensor([[3., 2., 1.]], dtype=torch.float64)
    """
    if matrices.dim() != 3:
        raise ValueError(f"expected a (batch, rows, cols) tensor, got shape {tuple(matrices.shape)}")
    wide = matrices if matrices.shape[-2] <= matrices.shape[-1] else matrices.mT
    if wide.shape[-2] == 0:
        return wide.new_zeros(wide.shape[0], 0)
    gram = wide @ wide.mT
    finite = torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all(-1)
    gram = torch.where(finite[:, None, None], gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
    values = eigenvalues.sqrt()
    ill_conditioned = finite & (eigenvalues[:, -1] * GRAM_MAX_CONDITION**2 < eigenvalues[:, 0])
    if bool(ill_conditioned.any()):
        index = ill_conditioned.nonzero().squeeze(1)
        values[index] = torch.linalg.svdvals(wide[index])
    return torch.where(finite[:, None], values, torch.full((), float("nan"), dtype=values.dtype, device=values.device))
