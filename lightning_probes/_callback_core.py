"""The part of ``ProbeCallback`` that does not depend on the Lightning package.

``lightning_probes.pytorch_lightning`` and ``lightning_probes.lightning`` each define
``ProbeCallback`` as :class:`ProbeCallbackCore` plus the ``Callback`` base class and
``rank_zero_only`` of their package; everything else lives here, including
:func:`log_probe_result`, which the offline replay uses too.

What a probe writes, and where
------------------------------
* Aggregates (SPEC §4), the keys chosen with ``aggregates``: ``probe/{M}_{BE|AE}_{agg}``, e.g.
  ``probe/SQ_AE_p``. Online through ``pl_module.log(..., logger=False)`` on every rank, so that
  monitors (EarlyStopping, ModelCheckpoint, pruning callbacks) see them, and, like everything
  below, to the loggers by :func:`log_probe_result` (``include_aggregates=True``) on rank zero.
* Per layer, straight to each logger on rank zero: ``probe.{M}_{BE|AE}/{layer}/{in|out}`` for M in
  ``SQ, E, F, S, SR, C`` (SPEC §4 names: E is the effective rank, F the Frobenius norm, S the
  spectral norm, SR the stable rank, C the condition number) and ``probe.rank_AE/{layer}/{in|out}``,
  where ``layer`` is the parameter name without its ``.weight`` suffix; ``probe/time_ms``; with
  ``log_spectra``, TensorBoard histograms ``probe.spectrum/{layer}/{in|out}`` of the raw singular
  values; on TensorBoard, once per writer, a custom-scalars layout with one chart per measure,
  variant and side holding every layer's curve.

Step convention
---------------
Everything a probe writes to a logger carries one step: online ``trainer.global_step`` at the
probe (the number of optimizer steps taken so far, which is also the ``global_step`` saved in a
checkpoint written at that moment); offline, the checkpoint's ``global_step`` (Lightning
``.ckpt``) or its epoch (GenProb files, which have no step). Pass that number as ``step`` to
:func:`log_probe_result`. Lightning itself logs validation metrics such as ``val_acc`` one step
earlier (``global_step - 1``) when validation runs at the end of an epoch or mid-epoch.
"""
from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lightning_probes.probe import (
    AGGREGATE_MEASURES,
    AGGREGATIONS,
    HEADLINE_AGGREGATES,
    SIDES,
    TABLE_COLUMNS,
    VARIANTS,
    ProbeResult,
    aggregates_from_table,
    layer_table,
    probe,
    select_weights,
)

#: Every aggregate key a probe with EVBMF produces (SPEC §4).
AGGREGATE_KEYS = [f"{m}_{v}_{a}" for m in AGGREGATE_MEASURES for v in VARIANTS for a in AGGREGATIONS]

# TensorBoard writers that already hold the custom-scalars layout (it is written once per writer).
_writers_with_layout: weakref.WeakSet = weakref.WeakSet()


def layer_tag_name(parameter_name: str) -> str:
    """The ``{layer}`` part of a per-layer tag: the parameter name without ``.weight``.

    >>> layer_tag_name("features.0.weight")
    'features.0'
    """
    return parameter_name.removesuffix(".weight")


def custom_scalars_layout(variants: Sequence[str] = VARIANTS) -> dict:
    """TensorBoard custom-scalars layout: a category per measure, a chart per variant and side."""
    return {
        f"probe.{measure}": {
            f"{measure}_{variant} {side}": ["Multiline", [rf"probe\.{measure}_{variant}/.*/{side}$"]]
            for variant in variants
            for side in SIDES
        }
        for measure in AGGREGATE_MEASURES
    }


def log_probe_result(
    logger: Any,
    result: ProbeResult,
    step: int,
    *,
    log_layers: bool = True,
    log_spectra: bool = False,
    include_aggregates: bool = False,
    aggregate_keys: Iterable[str] | None = None,
) -> None:
    """Write a probe result to a Lightning logger, with the tags ``ProbeCallback`` writes.

    Args:
        logger: any Lightning ``Logger`` (scalars go through ``log_metrics``); a
            ``TensorBoardLogger`` gets the scalars as one event, the custom-scalars layout and,
            with ``log_spectra``, the singular-value histograms.
        result: what :func:`lightning_probes.probe` returned (``keep_spectra=True`` for spectra).
        step: the step of every value written (see the module's step convention).
        log_layers: write the per-layer scalars ``probe.{M}_{BE|AE}/{layer}/{in|out}``.
        log_spectra: write the histograms ``probe.spectrum/{layer}/{in|out}`` (TensorBoard only).
        include_aggregates: also write ``probe/{key}`` for the aggregates (the callback does;
            the monitors get them through ``pl_module.log(..., logger=False)``).
        aggregate_keys: which aggregates; default the paper's headline measures, those
            present in ``result``.

    ``probe/time_ms`` is always written. Values are written as they are: a layer whose measure
    is undefined (SPEC §2) is written as NaN.
    """
    variants = [variant for variant in VARIANTS if f"in_S_{variant}" in result.layers.columns]
    metrics: dict[str, float] = {"probe/time_ms": float(result.time_ms)}
    if log_layers:
        metrics.update(_layer_metrics(result.layers, variants))
    if include_aggregates:
        keys = list(aggregate_keys) if aggregate_keys is not None else [
            key for key in HEADLINE_AGGREGATES if key in result.aggregates
        ]
        metrics.update({f"probe/{key}": float(result.aggregates[key]) for key in keys})
    if not _is_tensorboard_logger(logger):
        logger.log_metrics(metrics, step=step)
        return
    writer = logger.experiment
    _write_tensorboard_scalars(logger, writer, metrics, step)
    if log_layers and writer not in _writers_with_layout:
        writer.add_custom_scalars(custom_scalars_layout(variants))
        _writers_with_layout.add(writer)
    if log_spectra:
        for name, pair in result.spectra.items():
            for side, values in zip(SIDES, pair):
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    writer.add_histogram(f"probe.spectrum/{layer_tag_name(name)}/{side}", finite, step)


def _write_tensorboard_scalars(logger, writer, metrics: dict[str, float], step: int) -> None:
    """All scalars as one event of torch's SummaryWriter: hundreds of per-layer values cost one
    write (``log_metrics`` hands each scalar to the writer thread on its own, ~40x slower)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter) or getattr(logger, "_prefix", ""):
        logger.log_metrics(metrics, step=step)  # tensorboardX or a tag prefix: Lightning's own way
        return
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in metrics.items()])
    writer._get_file_writer().add_summary(summary, step)


def _layer_metrics(table: pd.DataFrame, variants: Sequence[str]) -> dict[str, float]:
    metrics = {}
    columns = {
        f"probe.{measure}_{variant}": f"{measure_column}_{variant}"
        for measure, measure_column in AGGREGATE_MEASURES.items()
        for variant in variants
    }
    if "AE" in variants:
        columns["probe.rank_AE"] = "rank_AE"
    for row in table.itertuples(index=False):
        fields = row._asdict()
        layer = layer_tag_name(fields["layer"])
        for prefix, column in columns.items():
            for side in SIDES:
                value = fields[f"{side}_{column}"]
                metrics[f"{prefix}/{layer}/{side}"] = float("nan") if pd.isna(value) else float(value)
    return metrics


def _is_tensorboard_logger(logger: Any) -> bool:
    # Matched by class name so that the TensorBoardLogger of either Lightning package (and of
    # Fabric, and subclasses) qualifies without importing any of them here.
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def _layers_key(layers: Any) -> Any:
    """A description of a layer selection that is the same in every process (for ``state_key``)."""
    if layers is None or isinstance(layers, str):
        return layers
    if callable(layers):
        return f"{getattr(layers, '__module__', '?')}.{getattr(layers, '__qualname__', type(layers).__qualname__)}"
    return tuple(layers)


CALLBACK_DOC = """Probe the layer-wise generalization measures of the model during training.

    After every validation run (not the sanity check), and at the end of a training epoch in
    which no probe ran, the callback calls :func:`lightning_probes.probe` on the module's
    Conv/Linear weights under ``torch.no_grad()`` (parameters, gradients, optimizer state, RNG
    streams and train/eval modes stay as they were), at most once per ``global_step``, and

    * logs the chosen aggregates with ``pl_module.log`` as ``probe/{{key}}`` (e.g.
      ``probe/SQ_AE_p``) on every rank, so ``EarlyStopping``, ``ModelCheckpoint`` (with
      ``auto_insert_metric_name=False``), Optuna's ``PyTorchLightningPruningCallback`` or Ray Tune
      can monitor them; always finite (0.0 while random weights keep no EVBMF component);
    * writes those aggregates, the per-layer measures ``probe.{{M}}_{{BE|AE}}/{{layer}}/{{in|out}}``,
      ``probe/time_ms``, optional spectra histograms and a TensorBoard custom-scalars layout
      straight to the loggers (if any) on rank zero, at step ``trainer.global_step`` (the step
      convention of :mod:`lightning_probes._callback_core`, which the offline replay shares).

    Under DDP each rank probes a share of the layers and the rows are all-gathered, so every rank
    holds the same table and aggregates. FSDP2 / ``ModelParallelStrategy`` DTensor weights are
    gathered one at a time with ``full_tensor()``. FSDP version 1 (flat parameters) and DeepSpeed
    ZeRO-3 raise a ``RuntimeError`` at the first probe rather than measure shards.

    Args:
        evbmf: also compute the "AE" measures after EVBMF denoising (SPEC §3).
        every_n_epochs: while fitting, probe only in epochs ``n - 1, 2n - 1, ...`` (0-based, like
            ``check_val_every_n_epoch``); a monitor of a probe key must then run no more often
            (or use ``strict=False``).
        layers: which weights, as :func:`lightning_probes.select_weights`: ``None`` (every
            Conv1d/2d/3d and Linear weight), ``"genprob"``, a callable ``(name, tensor) -> bool``,
            or parameter names.
        aggregates: keys of SPEC §4 to log as metrics; default the paper's headline measures
            ``SQ_p, E_L2, F_p, S_p``, each BE and AE (BE only when ``evbmf=False``).
        log_layers: write the per-layer scalars to the loggers.
        log_spectra: write histograms of each layer's singular values (TensorBoard only).
        device: where to compute; default where the weights are.
        num_threads: cap on torch's CPU threads while probing (restored after).

    The result of the latest probe is kept in ``last_result`` (a :class:`lightning_probes.ProbeResult`
    with the full per-layer table on every rank).

    Example::

        >>> from {package} import Trainer
        >>> from {package}.callbacks import EarlyStopping
        >>> from lightning_probes.{module} import ProbeCallback
        >>> probes = ProbeCallback(aggregates=["SQ_AE_p", "E_BE_L2"])
        >>> probes.state_key
        "ProbeCallback{{'evbmf': True, 'every_n_epochs': 1, 'layers': None, 'aggregates': ['SQ_AE_p', 'E_BE_L2']}}"
        >>> early_stopping = EarlyStopping("probe/E_BE_L2", mode="min", patience=3)
        >>> trainer = Trainer(callbacks=[probes, early_stopping], logger=False, max_epochs=5,
        ...                   enable_progress_bar=False, enable_model_summary=False)
    """


class ProbeCallbackCore:
    """Shared implementation of ``ProbeCallback``; see the flavour modules for the docs."""

    #: The Lightning package's ``rank_zero_only`` (set by each flavour's ``ProbeCallback``).
    _rank_zero_only: Callable

    def __init__(
        self,
        evbmf: bool = True,
        every_n_epochs: int = 1,
        layers: None | str | Callable[[str, Tensor], bool] | Iterable[str] = None,
        aggregates: Sequence[str] | None = None,
        log_layers: bool = True,
        log_spectra: bool = False,
        device: torch.device | str | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for option, value in (("evbmf", evbmf), ("log_layers", log_layers), ("log_spectra", log_spectra)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}({option}={value!r}): expected True or False")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"{name}(every_n_epochs={every_n_epochs!r}): expected an integer >= 1")
        if isinstance(layers, str) and layers not in ("all", "genprob"):
            raise ValueError(f"{name}(layers={layers!r}): expected None, 'all', 'genprob', a callable or names")
        if layers is not None and not isinstance(layers, str) and not callable(layers):
            if not isinstance(layers, Iterable):
                raise TypeError(f"{name}(layers={layers!r}): expected None, 'all', 'genprob', a callable or names")
            layers = list(layers)
        if aggregates is None:
            aggregates = [key for key in HEADLINE_AGGREGATES if evbmf or "_AE_" not in key]
        elif isinstance(aggregates, str):
            raise TypeError(f"{name}(aggregates={aggregates!r}): expected a list of keys such as ['SQ_AE_p']")
        aggregates = list(aggregates)
        for key in aggregates:
            if key not in AGGREGATE_KEYS:
                raise ValueError(
                    f"{name}(aggregates=[..., {key!r}, ...]): unknown key; keys are "
                    "'{M}_{BE|AE}_{agg}' with M in SQ, E, F, S, SR, C and agg in L1, L2, p, wL1, wp"
                )
            if "_AE_" in key and not evbmf:
                raise ValueError(f"{name}(aggregates=[..., {key!r}, ...]): AE aggregates need evbmf=True")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"{name}(num_threads={num_threads!r}): expected None or an integer >= 1")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"{name}(device={device!r}): not a torch device") from error

        self.evbmf = evbmf
        self.every_n_epochs = every_n_epochs
        self.layers = layers
        self.aggregates = aggregates
        self.log_layers = log_layers
        self.log_spectra = log_spectra
        self.device = device
        self.num_threads = num_threads
        self.last_result: ProbeResult | None = None
        self._last_probe_step: int | None = None
        self._last_probe_epoch: int | None = None
        self._last_aggregates: dict[str, float] = {}
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            evbmf=self.evbmf,
            every_n_epochs=self.every_n_epochs,
            layers=_layers_key(self.layers),
            aggregates=self.aggregates,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_probe_step": self._last_probe_step,
            "last_probe_epoch": self._last_probe_epoch,
            "last_aggregates": dict(self._last_aggregates),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_probe_step = state_dict["last_probe_step"]
        self._last_probe_epoch = state_dict["last_probe_epoch"]
        self._last_aggregates = dict(state_dict["last_aggregates"])

    # Hooks. ``self.log`` is not allowed in ``on_validation_end``, so the validation probe runs in
    # ``on_validation_epoch_end`` (callbacks run before the LightningModule's hook there); the
    # monitors (EarlyStopping, ModelCheckpoint) read the values in ``on_validation_end``.
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._probe_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._last_probe_epoch != trainer.current_epoch:
            self._probe_and_log(trainer, pl_module)

    def _probe_and_log(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        step = trainer.global_step
        if step != self._last_probe_step:
            result = self._probe(trainer, pl_module)
            self.last_result = result
            self._last_probe_step = step
            self._last_probe_epoch = trainer.current_epoch
            self._last_aggregates = {key: result.aggregates[key] for key in self.aggregates}
            self._rank_zero_only(self._write_to_loggers)(trainer, result, step)
        # Also when this step was probed already (e.g. ``trainer.validate`` after ``fit``), so
        # that every run's metrics hold the probe keys.
        for key, value in self._last_aggregates.items():
            # For the monitors only (``logger=False``): the loggers get the aggregates from
            # ``log_probe_result`` at the probe's own step, Lightning would use another one for
            # validation metrics. Identical on every rank: a max over ranks returns the value
            # unchanged, and syncing avoids Lightning's warning about unsynced epoch metrics.
            pl_module.log(f"probe/{key}", value, on_step=False, on_epoch=True, logger=False,
                          sync_dist=True, reduce_fx="max")

    def _write_to_loggers(self, trainer, result: ProbeResult, step: int) -> None:
        for logger in trainer.loggers:
            log_probe_result(logger, result, step, log_layers=self.log_layers, log_spectra=self.log_spectra,
                             include_aggregates=True, aggregate_keys=self.aggregates)

    def _probe(self, trainer, pl_module) -> ProbeResult:
        start = time.perf_counter()
        selected = select_weights(pl_module, self.layers)
        world_size, rank = trainer.world_size, trainer.global_rank
        owners = _assign_owners(selected, world_size)
        cuda_devices = sorted({t.device.index or 0 for _, t in selected if t.device.type == "cuda"})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
            share = _full_weights_of_share(trainer, selected, owners, rank)
            if world_size == 1 or not selected:
                result = self._probe_share(share)
            else:  # a rank may own no layer (fewer layers than ranks): it only gathers
                local = self._probe_share(share) if share else None
                result = _gather(trainer, local, selected, owners, self.evbmf, self.log_spectra)
        result.time_ms = (time.perf_counter() - start) * 1e3
        return result

    def _probe_share(self, share: dict[str, Tensor]) -> ProbeResult:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = probe(share, evbmf=self.evbmf, layers=list(share), device=self.device,
                           num_threads=self.num_threads, keep_spectra=self.log_spectra)
        # Training probes the same weights every epoch: each distinct warning is shown once.
        for warning in caught:
            message = str(warning.message)
            if message not in self._warned:
                self._warned.add(message)
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return result


def _assign_owners(selected: list[tuple[str, Tensor]], world_size: int) -> list[int]:
    """Rank that probes each weight: largest first to the least loaded rank (same on every rank)."""
    load = [0.0] * world_size
    owners = [0] * len(selected)
    costs = []
    for index, (_, tensor) in enumerate(selected):
        rows = tensor.shape[0] if tensor.dim() else 1
        cols = max(tensor.numel() // max(rows, 1), 1)
        costs.append((tensor.numel() * min(rows, cols), index))
    for cost, index in sorted(costs, key=lambda item: (-item[0], item[1])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += cost
    return owners


def _full_weights_of_share(trainer, selected, owners, rank) -> dict[str, Tensor]:
    """The full weights this rank probes, gathering sharded ones one at a time (every rank)."""
    if _has_flat_parameters(trainer.strategy.model):
        raise RuntimeError(
            "ProbeCallback: FSDP version 1 (FSDPStrategy, flat parameters) is not supported; use "
            "FSDP2 (ModelParallelStrategy with fully_shard), whose DTensor weights are gathered one "
            "at a time, or probe the saved checkpoint offline with lightning_probes.probe"
        )
    dtensor = _dtensor_class()
    share = {}
    for index, (name, weight) in enumerate(selected):
        if hasattr(weight, "ds_id"):
            raise RuntimeError(
                "ProbeCallback: DeepSpeed ZeRO-3 partitioned parameters are not supported "
                f"('{name}'); use ZeRO stage 1 or 2, or probe the saved checkpoint offline"
            )
        if dtensor is not None and isinstance(weight, dtensor):
            weight = weight.full_tensor()  # a collective: every rank, same order
        if owners[index] == rank:
            share[name] = weight
    return share


def _dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _has_flat_parameters(model) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def _gather(trainer, local: ProbeResult | None, selected, owners, evbmf: bool, with_spectra: bool) -> ProbeResult:
    """Every rank's rows (and spectra) to every rank, in module order, with the aggregates."""
    strategy = trainer.strategy
    device = strategy.root_device
    world_size = trainer.world_size
    numeric = [column for column in TABLE_COLUMNS[1:] if evbmf or not column.endswith("_AE")]
    names_by_rank = [[name for (name, _), owner in zip(selected, owners) if owner == rank]
                     for rank in range(world_size)]
    most_rows = max(len(names) for names in names_by_rank)

    rows = torch.full((most_rows, len(numeric)), float("nan"), dtype=torch.float64)
    if local is not None:
        values = local.layers[numeric].astype("float64").to_numpy(na_value=np.nan)
        rows[: len(values)] = torch.from_numpy(values)
    gathered = strategy.all_gather(rows.to(device)).cpu().reshape(world_size, most_rows, len(numeric))

    position = {name: (rank, i) for rank, names in enumerate(names_by_rank) for i, name in enumerate(names)}
    order = [position[name] for name, _ in selected]
    values = np.stack([gathered[rank, i].numpy() for rank, i in order]) if order else np.empty((0, len(numeric)))
    table = layer_table([name for name, _ in selected],
                        {column: values[:, j] for j, column in enumerate(numeric)})

    spectra = {}
    if with_spectra:
        spectra = _gather_spectra(strategy, local, names_by_rank, device)
    return ProbeResult(layers=table, aggregates=aggregates_from_table(table), spectra=spectra)


def _gather_spectra(strategy, local: ProbeResult | None, names_by_rank, device) -> dict[str, tuple[Tensor, Tensor]]:
    world_size = len(names_by_rank)
    most_rows = max(len(names) for names in names_by_rank)
    lengths = torch.zeros((most_rows, 2), dtype=torch.int64)
    parts = []
    local_spectra = local.spectra if local is not None else {}
    for i, name in enumerate(names_by_rank[strategy.global_rank]):
        for side, values in enumerate(local_spectra.get(name, ())):
            lengths[i, side] = values.numel()
            parts.append(values.to(torch.float64))
    all_lengths = strategy.all_gather(lengths.to(device)).cpu().reshape(world_size, most_rows, 2)
    longest = int(all_lengths.sum(dim=(1, 2)).max())
    flat = torch.full((longest,), float("nan"), dtype=torch.float64)
    if parts:
        joined = torch.cat(parts)
        flat[: joined.numel()] = joined
    all_flat = strategy.all_gather(flat.to(device)).cpu().reshape(world_size, longest)
    spectra = {}
    for rank, names in enumerate(names_by_rank):
        offset = 0
        for i, name in enumerate(names):
            pair = []
            for side in range(2):
                count = int(all_lengths[rank, i, side])
                pair.append(all_flat[rank, offset: offset + count].clone())
                offset += count
            if pair[0].numel() or pair[1].numel():
                spectra[name] = (pair[0], pair[1])
    return spectra
