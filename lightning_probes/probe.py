"""``probe()``: every measure of SPEC §1–5 for a module or a state dict, in one call.

The work is grouped by matrix shape: all matrices of the same ``(N, M)`` on the same device are
stacked and decomposed in one batched call, EVBMF runs batched over the group, and the results of
every group reach the host in one transfer at the end.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lightning_probes.functional import (
    aggregate,
    channel_weights,
    evbmf,
    singular_values,
    spectral_metrics,
    unfold_in,
    unfold_out,
    unfolded_shapes,
)

MEASURES = ("S", "C", "ER", "spec", "fro")  # the reference CSV's per-matrix columns, in order
VARIANTS = ("BE", "AE")
SIDES = ("in", "out")
REFERENCE_COLUMNS = [
    f"{side}_{measure}_{variant}" for variant in VARIANTS for side in SIDES for measure in MEASURES
] + [f"{side}_weight_{variant}" for variant in VARIANTS for side in SIDES]
#: Per-layer table columns (SPEC §5), in order.
TABLE_COLUMNS = (
    ["layer"]
    + REFERENCE_COLUMNS
    + [f"{side}_SQ_{variant}" for variant in VARIANTS for side in SIDES]
    + [f"{side}_rank_AE" for side in SIDES]
)
#: Aggregate key prefix -> per-layer measure it aggregates (SPEC §4).
AGGREGATE_MEASURES = {"SQ": "SQ", "E": "ER", "F": "fro", "S": "spec", "SR": "S", "C": "C"}
AGGREGATIONS = ("L1", "L2", "p", "wL1", "wp")
#: The paper's headline measures: Q_SQ^p, Q_E^L2, Q_F^p, Q_S^p, each BE and AE.
HEADLINE_AGGREGATES = [
    f"{key}_{variant}_{agg}"
    for key, agg in (("SQ", "p"), ("E", "L2"), ("F", "p"), ("S", "p"))
    for variant in VARIANTS
]
#: Fraction of the free memory of a device that one batch of decompositions may take.
MEMORY_SHARE = 0.5

LayerSelection = Union[None, str, Callable[[str, Tensor], bool], Iterable[str]]
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PER_MATRIX = ("S", "C", "ER", "spec", "fro", "SQ")


class ProbeWarning(UserWarning):
    """A layer was probed with undefined or trivial values, or left out, and why."""


@dataclass
class ProbeResult:
    """What ``probe()`` returns.

    ``layers``: one row per probed weight, columns ``TABLE_COLUMNS`` (without the ``*_AE``
    columns when EVBMF is off). ``aggregates``: SPEC §4 keys such as ``"SQ_AE_p"``, always
    finite. ``spectra``: ``{layer: (in_values, out_values)}`` as CPU float64 tensors when asked
    for. ``time_ms``: wall time of the probe.
    """

    layers: pd.DataFrame
    aggregates: dict[str, float]
    spectra: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    time_ms: float = 0.0


def select_weights(model_or_state_dict: nn.Module | Mapping, layers: LayerSelection = None
                   ) -> list[tuple[str, Tensor]]:
    """The ``(name, tensor)`` pairs ``probe()`` would probe, in module order.

    ``layers``: ``None`` (a module: every Conv1d/2d/3d and Linear weight; a state dict: every
    floating tensor of 2–5 dims whose key ends in ``weight``), ``"all"`` (the same),
    ``"genprob"`` (4-D tensors whose key contains ``onv`` or ``down``, SPEC §6), a callable
    ``(name, tensor) -> bool``, or an iterable of parameter names.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    >>> [name for name, _ in select_weights(net)]
    ['0.weight', '2.weight']
    """
    if isinstance(model_or_state_dict, nn.Module) and layers in (None, "all"):
        selected = []
        for module_name, module in model_or_state_dict.named_modules():
            if isinstance(module, _CONV_TYPES) and isinstance(module.weight, Tensor):
                name = f"{module_name}.weight" if module_name else "weight"
                if isinstance(module.weight, nn.parameter.UninitializedParameter):
                    _warn(name, "is an uninitialized (lazy) parameter: not probed")
                    continue
                selected.append((name, module.weight))
        return selected

    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict(keep_vars=True)
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(
            "probe() takes an nn.Module or a state dict (a mapping of names to tensors), "
            f"got {type(model_or_state_dict).__name__}"
        )
    tensors = {}
    for name, value in state.items():
        if isinstance(value, Tensor):
            tensors[str(name)] = value
        else:
            _warn(str(name), f"is a {type(value).__name__}, not a tensor: not probed")

    if layers in (None, "all"):
        selected = []
        for name, tensor in tensors.items():
            if not name.endswith("weight") or not 2 <= tensor.dim() <= 5:
                continue
            if not tensor.is_floating_point():
                _warn(name, f"has dtype {tensor.dtype}, not floating point: not probed")
                continue
            selected.append((name, tensor))
        return selected
    if layers == "genprob":
        return [(n, t) for n, t in tensors.items() if t.dim() == 4 and ("onv" in n or "down" in n)]
    if isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: expected None, 'all', 'genprob', a callable or names")
    if callable(layers):
        return [(n, t) for n, t in tensors.items() if layers(n, t)]
    wanted = set(layers)
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise KeyError(f"layers: no tensor named {', '.join(map(repr, missing))} to probe")
    return [(n, t) for n, t in tensors.items() if n in wanted]


def probe(
    model_or_state_dict: nn.Module | Mapping,
    evbmf: bool = True,
    layers: LayerSelection = None,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    num_threads: int | None = None,
    keep_spectra: bool = False,
) -> ProbeResult:
    """Probe every selected weight: per-layer table (SPEC §5) and aggregates (SPEC §4).

    Args:
        model_or_state_dict: an ``nn.Module`` or a state dict.
        evbmf: also compute the "AE" measures after EVBMF denoising.
        layers: which weights, see :func:`select_weights`.
        device: where to compute; default: where each weight lies.
        dtype: compute dtype (float64 by default, whatever the weights' dtype).
        num_threads: cap on torch's CPU threads during the probe (restored after).
        keep_spectra: return the singular values of each unfolding in ``result.spectra``.

    The model is not modified in any way (values, ``requires_grad``, device, dtype, RNG).
    Weights that cannot be measured are still listed, with NaN where SPEC leaves a value
    undefined, and one :class:`ProbeWarning` each naming the layer and the reason.

    Example:
        >>> import torch
        >>> from lightning_probes import probe
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16, 10))
        >>> res = probe(net)
        >>> res.layers[["layer", "in_S_BE", "out_S_BE"]].shape
        (2, 3)
        >>> all(np.isfinite(v) for v in res.aggregates.values())
        True
    """
    start = time.perf_counter()
    selected = select_weights(model_or_state_dict, layers)
    if not selected:
        warnings.warn(
            f"probe: nothing to probe in this {type(model_or_state_dict).__name__} with "
            f"layers={layers!r}; the table is empty and every aggregate is 0.0",
            ProbeWarning, stacklevel=2,
        )
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"probe(device={device!r}): CUDA is not available on this machine")
    uses_cpu = target.type == "cpu" if target is not None else any(t.device.type == "cpu" for _, t in selected)
    previous_threads = torch.get_num_threads()
    if num_threads is not None and uses_cpu:
        torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            table, spectra = _probe_weights(selected, evbmf, target, dtype, keep_spectra)
    finally:
        if num_threads is not None and uses_cpu:
            torch.set_num_threads(previous_threads)
    return ProbeResult(
        layers=table,
        aggregates=aggregates_from_table(table),
        spectra=spectra,
        time_ms=(time.perf_counter() - start) * 1e3,
    )


def aggregates_from_table(table: pd.DataFrame) -> dict[str, float]:
    """SPEC §4 aggregates from per-layer rows (the ones ``probe()`` returns).

    For each measure and variant, the in-values of every row followed by the out-values, with
    the matching channel weights; ``*_AE`` keys only when the table has AE columns.

    >>> import pandas as pd
    >>> row = {c: [1.0] for c in TABLE_COLUMNS if c != "layer"}
    >>> aggregates_from_table(pd.DataFrame(row))["SQ_AE_p"]
    1.0
    """
    variants = [v for v in VARIANTS if f"in_S_{v}" in table.columns]
    keys, values, weights = [], [], []
    for variant in variants:
        channel = np.concatenate([_column(table, f"{side}_weight_{variant}") for side in SIDES])
        for key, measure in AGGREGATE_MEASURES.items():
            keys.append(f"{key}_{variant}")
            values.append(np.concatenate([_column(table, f"{side}_{measure}_{variant}") for side in SIDES]))
            weights.append(channel)
    if not keys:
        return {}
    result = aggregate(torch.from_numpy(np.stack(values)), torch.from_numpy(np.stack(weights)))
    by_aggregation = {name: getattr(result, name).tolist() for name in AGGREGATIONS}
    return {
        f"{key}_{name}": float(by_aggregation[name][i])
        for i, key in enumerate(keys)
        for name in AGGREGATIONS
    }


def layer_table(layers: Sequence[str], columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The per-layer table from numeric columns (those of ``TABLE_COLUMNS`` given, in its order),
    with the table's dtypes: channel weights int64, kept ranks nullable Int64 (NaN becomes
    missing), every measure float64.

    >>> table = layer_table(["fc.weight"], {"in_weight_BE": [3.0], "in_rank_AE": [float("nan")]})
    >>> [str(table[c].dtype) for c in ("in_weight_BE", "in_rank_AE")]
    ['int64', 'Int64']
    """
    table = {"layer": list(layers)}
    for column in TABLE_COLUMNS[1:]:
        if column not in columns:
            continue
        data = np.asarray(columns[column], dtype=np.float64)
        if "_weight_" in column:
            table[column] = data.astype(np.int64)
        elif column.endswith("_rank_AE"):
            table[column] = pd.array([None if np.isnan(v) else int(v) for v in data], dtype="Int64")
        else:
            table[column] = data
    return pd.DataFrame(table, columns=list(table))


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    return table[name].to_numpy(dtype=np.float64, na_value=np.nan)


def _warn(layer: str, reason: str) -> None:
    warnings.warn(f"probe: layer '{layer}' {reason}", ProbeWarning, stacklevel=4)


@dataclass
class _Matrix:
    """One matrix to decompose: an unfolding of layer ``row`` (both sides for a 2-D weight)."""

    row: int
    sides: tuple[int, ...]
    rows: int
    cols: int
    make: Callable[[], Tensor]


def _probe_weights(selected, use_evbmf, target, dtype, keep_spectra):
    count = len(selected)
    values = {
        (side, measure, variant): np.full(count, np.nan)
        for side in SIDES for measure in _PER_MATRIX for variant in VARIANTS
    }
    ranks = np.full((2, count), np.nan)
    channel = np.zeros((2, count), dtype=np.int64)
    empty = np.zeros(count, dtype=bool)
    spectra_parts: dict[tuple[int, int], Tensor] = {}
    groups: dict[tuple[torch.device, int, int], list[_Matrix]] = {}

    for row, (name, tensor) in enumerate(selected):
        weight = tensor.detach()
        reasons = []
        if not weight.is_floating_point():
            reasons.append(f"has dtype {weight.dtype}: probed as {dtype}")
        if weight.dim() < 2:
            reasons.append(f"has {weight.dim()} dims: probed as a 1 x {weight.numel()} matrix")
            weight = weight.reshape(1, -1)
        shape = tuple(weight.shape)
        channel[:, row] = channel_weights(shape)
        if weight.numel() == 0:
            _warn(name, f"has zero size {shape}: its measures are undefined")
            empty[row] = True
            for side in range(2):
                _fill_empty(values, side, row, use_evbmf)
                ranks[side, row] = 0
            continue
        if min(channel[:, row]) == 1:
            reasons.append(f"of shape {shape} unfolds to a matrix with one singular value: S, C, ER are trivial")
        if reasons:
            _warn(name, "; ".join(reasons))
        device = target if target is not None else weight.device
        unfoldings = [unfold_in, unfold_out]
        for sides in ([(0, 1)] if weight.dim() == 2 else [(0,), (1,)]):
            rows, cols = unfolded_shapes(shape)[sides[0]]
            fold = unfoldings[sides[0]]
            matrix = _Matrix(row, sides, min(rows, cols), max(rows, cols),
                             lambda w=weight, f=fold, t=rows > cols: _oriented(f(w), t))
            groups.setdefault((device, matrix.rows, matrix.cols), []).append(matrix)

    spectra_by_device: dict[torch.device, list[tuple[list[_Matrix], Tensor]]] = {}
    for (device, rows, cols), matrices in groups.items():
        for chunk in _chunks(matrices, selected, device, rows, cols):
            spectrum = _singular_values(chunk, selected, device, dtype, rows, cols)
            spectra_by_device.setdefault(device, []).append((chunk, spectrum))

    non_finite = np.zeros(count, dtype=bool)
    for parts in spectra_by_device.values():
        matrices = [matrix for chunk, _ in parts for matrix in chunk]
        blocks = [spectrum for _, spectrum in parts]
        host = _measure(matrices, blocks, use_evbmf).cpu().numpy()  # one transfer per device
        spectra = [row for block in blocks for row in block]
        for matrix, line, spectrum in zip(matrices, host, spectra):
            for side in matrix.sides:
                for j, measure in enumerate(_PER_MATRIX):
                    values[(SIDES[side], measure, "BE")][matrix.row] = line[j]
                    if use_evbmf:
                        values[(SIDES[side], measure, "AE")][matrix.row] = line[6 + j]
                ranks[side, matrix.row] = line[12] if use_evbmf else np.nan
                if keep_spectra:
                    spectra_parts[(matrix.row, side)] = spectrum
            non_finite[matrix.row] |= bool(line[13])

    for row, (name, _) in enumerate(selected):
        if non_finite[row]:
            _warn(name, "has NaN or Inf entries: its measures are NaN")
            for side in SIDES:
                for measure in _PER_MATRIX:
                    for variant in VARIANTS:
                        values[(side, measure, variant)][row] = np.nan
            ranks[:, row] = np.nan
        elif values[("out", "spec", "BE")][row] == 0 and not empty[row]:
            _warn(name, "is all zeros: its S, C, ER and SQ are undefined (NaN)")

    columns = {}
    for column in TABLE_COLUMNS[1:]:
        side, measure, variant = column.split("_")
        if variant == "AE" and not use_evbmf:
            continue
        if measure == "weight":
            columns[column] = channel[SIDES.index(side)]
        elif measure == "rank":
            columns[column] = ranks[SIDES.index(side)]
        else:
            columns[column] = values[(side, measure, variant)]
    table = layer_table([name for name, _ in selected], columns)
    spectra = {}
    if keep_spectra:
        for row, (name, _) in enumerate(selected):
            pair = [spectra_parts.get((row, side)) for side in range(2)]
            if all(p is not None for p in pair):
                spectra[name] = (pair[0].cpu(), pair[1].cpu())
    return table, spectra


def _oriented(matrix: Tensor, transpose: bool) -> Tensor:
    return matrix.mT if transpose else matrix


def _fill_empty(values, side: int, row: int, use_evbmf: bool) -> None:
    values[(SIDES[side], "spec", "BE")][row] = 0.0
    values[(SIDES[side], "fro", "BE")][row] = 0.0
    if use_evbmf:
        for measure in _PER_MATRIX:
            values[(SIDES[side], measure, "AE")][row] = 0.0


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _layer_names(matrices, selected) -> str:
    return ", ".join(dict.fromkeys(f"'{selected[m.row][0]}'" for m in matrices))


def _chunks(matrices, selected, device, rows, cols):
    """Split a same-shape group into batches that fit the device's free memory."""
    # The float64 stack, its Gram matrix and eigen-solver workspace, per matrix.
    per_matrix = 8 * (rows * cols + 3 * rows * rows) + 1024
    budget = int(_free_memory(device) * MEMORY_SHARE)
    if per_matrix > budget:
        raise MemoryError(
            f"probe: layer {_layer_names(matrices, selected)} unfolds to a {rows} x {cols} "
            f"matrix; decomposing it needs about {per_matrix / 2**30:.1f} GiB "
            f"but only {budget / 2**30:.1f} GiB of {device} memory may be used"
        )
    size = max(1, budget // per_matrix)
    return [matrices[i:i + size] for i in range(0, len(matrices), size)]


def _singular_values(chunk, selected, device, dtype, rows, cols) -> Tensor:
    """Singular values ``(B, rows)`` of a same-shape batch, NaN rows for non-finite matrices."""
    try:
        batch = torch.empty((len(chunk), rows, cols), dtype=dtype, device=device)
        for slot, matrix in zip(batch, chunk):
            slot.copy_(matrix.make())
        return singular_values(batch)
    except RuntimeError as error:  # CUDA's OutOfMemoryError, or the CPU allocator's failure
        if not isinstance(error, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        raise MemoryError(
            f"probe: out of {device} memory decomposing {len(chunk)} matrices of {rows} x {cols} "
            f"(layer {_layer_names(chunk, selected)})"
        ) from error


def _measure(matrices: list[_Matrix], blocks: list[Tensor], use_evbmf: bool) -> Tensor:
    """Measures of matrices of any shapes on one device, batched: ``(B, 14)`` = 6 BE, 6 AE,
    kept rank, non-finite flag. The spectra blocks ``(B_i, N_i)`` are zero-padded to the widest;
    EVBMF and the metrics run once over the whole ragged batch."""
    first = blocks[0]
    sizes = [m.rows for m in matrices]
    padded = first.new_zeros(len(matrices), max(sizes))
    start = 0
    for block in blocks:
        padded[start:start + len(block), : block.shape[1]] = block
        start += len(block)
    finite = ~padded[:, 0].isnan()
    padded = torch.where(finite[:, None], padded, torch.zeros((), dtype=first.dtype, device=first.device))
    size = torch.tensor(sizes, device=first.device)
    columns = list(spectral_metrics(padded, size=size))
    if use_evbmf:
        denoised = evbmf(padded, [m.cols for m in matrices], rows=sizes)
        columns += list(spectral_metrics(denoised.values, denoised.rank, size=size))
        columns.append(denoised.rank.to(first.dtype))
    else:
        columns += [torch.full_like(columns[0], float("nan"))] * 7
    columns.append((~finite).to(first.dtype))
    return torch.stack(columns, dim=1)
