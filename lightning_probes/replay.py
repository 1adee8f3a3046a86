"""Probe saved checkpoints offline: one table row per (checkpoint, layer), optional TensorBoard runs.

Inputs are files or directories (searched recursively) of:
  GenProb files  *.pth.tar  (SPEC §6; epoch, accuracies and losses from the file)
  Lightning      *.ckpt     (the LightningModule's state_dict; epoch and global_step as saved)
  state dicts    *.pt/*.pth (a mapping of names to tensors, or a dict holding one as "state_dict")
Files are loaded safely (weights_only first, then a restricted unpickler that never runs code).

Output (--out results.csv): the SPEC §5 table, columns
  checkpoint, model_id, epoch, step, layer, <probe() columns>, test_acc, test_loss, train_acc,
  train_loss, gap (= test_acc - train_acc; NaN where the file holds no statistics)
in the order of the checkpoints (paths sorted with numbers compared as numbers), layers in module
order. model_id: the GenProb name up to "_epoch_<E>"; for .ckpt the run directory holding it (its
parent, or the parent's parent when that is Lightning's "checkpoints"); for state dicts the file
stem. Failures (truncated, corrupt or foreign files, missing keys or epoch statistics, nothing to
probe) are listed with their reason on stderr and in <out>.errors.csv (columns checkpoint, error;
header only when none failed); the other files go on; the exit status is 1 when any file failed.

--format genprob also writes <out without .csv>.genprob.csv in the reference code's 32-column
layout: test_acc, test_loss, train_acc, train_loss, gap, the 20 in/out S, C, ER, spec, fro columns
(BE then AE), path (the path norm, GenProb NIN files only, as the reference computes it on a
3x32x32 input), model_id (the NIN channel code for GenProb files), type (weight dimensions),
in_weight_BE, out_weight_BE, in_weight_AE, out_weight_AE; a blank line after each checkpoint
(with --no-evbmf the AE columns are empty).

Resumable: each checkpoint's rows are committed atomically to <out>.parts/ (written, fsynced,
renamed) before the next one starts; a rerun with the same options skips committed checkpoints
(a file that changed size or mtime is probed again) and the final table is identical to an
uninterrupted run's, even after kill -9. Failed files are tried again on every run.

--tensorboard DIR writes one run per model (DIR/<model_id>) through the same code path as
ProbeCallback (lightning_probes._callback_core.log_probe_result): per-layer scalars
probe.{M}_{BE|AE}/{layer}/{in|out}, probe/time_ms and the headline aggregates probe/{key}, at
step = the epoch for GenProb files, the checkpoint's global_step for .ckpt, 0 for state dicts.

Layers: GenProb files default to the GenProb selection (SPEC §6); the others to every floating
2-5-D "*weight" tensor of the state dict. ProbeCallback selects by module type (Conv/Linear), so
for a model with other 2-D weights (e.g. embeddings) a .ckpt replay lists more layers than the
online run; the values of the common layers are the same.

Distributed: under torchrun (WORLD_SIZE > 1) the models are split across ranks (all checkpoints
of a model on one rank, so its TensorBoard run has one writer), torch.distributed (gloo) gathers
the tables, and rank 0 writes the outputs; the table equals a single-process run. All ranks must
see the input files; <out>.parts/ may be local to each node. Only rank 0 shows progress.

examples:
  lightning-probes replay zoo/ --out zoo.csv
  lightning-probes replay zoo/ --out zoo.csv --format genprob --tensorboard runs/zoo
  lightning-probes replay lightning_logs/version_0/checkpoints --out run.csv --no-evbmf
  torchrun --nproc-per-node 2 -m lightning_probes replay zoo/ --out zoo.csv
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import Tensor

from lightning_probes.genprob import (
    CheckpointError,
    parse_checkpoint_name,
    path_norm,
    read_checkpoint,
    safe_torch_load,
)
from lightning_probes.probe import REFERENCE_COLUMNS, ProbeResult, probe, select_weights

#: File suffix -> kind of checkpoint.
CHECKPOINT_KINDS = {".pth.tar": "genprob", ".ckpt": "lightning", ".pt": "state_dict",
                    ".pth": "state_dict"}
IDENTITY_COLUMNS = ["checkpoint", "model_id", "epoch", "step"]
PERFORMANCE_COLUMNS = ["test_acc", "test_loss", "train_acc", "train_loss", "gap"]
#: The reference code's CSV layout (GenProb ``save.py``), 32 columns.
GENPROB_CSV_COLUMNS = (PERFORMANCE_COLUMNS + REFERENCE_COLUMNS[:20] + ["path", "model_id", "type"]
                       + REFERENCE_COLUMNS[20:])
ERROR_COLUMNS = ["checkpoint", "error"]


# --------------------------------------------------------------------------- what to replay


@dataclass(frozen=True)
class CheckpointJob:
    """One file to replay: its position in the output, path, kind and model."""

    index: int
    path: Path
    kind: str | None
    model_id: str


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def checkpoint_kind(path: Path) -> str | None:
    """``"genprob"``, ``"lightning"``, ``"state_dict"`` by suffix, ``None`` when unsupported."""
    name = path.name
    for suffix, kind in CHECKPOINT_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def model_id_of(path: Path, kind: str | None) -> str:
    """The model a checkpoint belongs to (see the module's help).

    >>> model_id_of(Path("zoo/z_NIN00000_adam_0.001_32_0_0_DIGITS_epoch_7.pth.tar"), "genprob")
    'z_NIN00000_adam_0.001_32_0_0_DIGITS'
    >>> model_id_of(Path("lightning_logs/version_3/checkpoints/epoch=1-step=20.ckpt"), "lightning")
    'version_3'
    """
    if kind == "genprob":
        name = parse_checkpoint_name(path)
        if name is not None:
            return name.model_id
    if kind == "lightning":
        run_directory = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_directory.name or "."
    return path.name.split(".")[0]


def plan_jobs(inputs: Iterable[str | os.PathLike]) -> list[CheckpointJob]:
    """Every checkpoint under ``inputs`` (directories searched recursively for supported
    suffixes; files taken as given), without duplicates, in natural path order."""
    paths = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            paths.extend(p for p in entry.rglob("*") if p.is_file() and checkpoint_kind(p))
        else:
            paths.append(entry)
    unique = sorted(dict.fromkeys(paths), key=_natural_key)
    return [CheckpointJob(index, path, checkpoint_kind(path), model_id_of(path, checkpoint_kind(path)))
            for index, path in enumerate(unique)]


# --------------------------------------------------------------------------- one checkpoint


@dataclass
class LoadedCheckpoint:
    """What the replay needs from one file, whatever its format."""

    state_dict: dict[str, Tensor]
    epoch: float
    step: int
    performance: dict[str, float] = field(default_factory=dict)
    channel_code: str | None = None


def _tensor_mapping(value) -> bool:
    return isinstance(value, dict) and any(isinstance(v, Tensor) for v in value.values())


def load_checkpoint(job: CheckpointJob) -> LoadedCheckpoint:
    """Read one file of any supported kind; :class:`CheckpointError` names the file and reason."""
    if job.kind is None:
        raise CheckpointError(job.path, "unsupported file type (expected .pth.tar, .ckpt, .pt or .pth)")
    if not job.path.is_file():
        raise CheckpointError(job.path, "no such file")
    if job.kind == "genprob":
        checkpoint = read_checkpoint(job.path)
        return LoadedCheckpoint(checkpoint.state_dict, float(checkpoint.name.epoch),
                                checkpoint.name.epoch, checkpoint.performance,
                                checkpoint.name.channel_code)
    content = safe_torch_load(job.path)
    if job.kind == "lightning":
        if not isinstance(content, dict) or "state_dict" not in content:
            raise CheckpointError(job.path, "missing key 'state_dict' (not a Lightning checkpoint)")
        if not _tensor_mapping(content["state_dict"]):
            raise CheckpointError(job.path, "'state_dict' holds no tensors")
        epoch = content.get("epoch")
        return LoadedCheckpoint(dict(content["state_dict"]),
                                float(epoch) if epoch is not None else float("nan"),
                                int(content.get("global_step", 0)))
    if _tensor_mapping(content):
        return LoadedCheckpoint(dict(content), float("nan"), 0)
    if isinstance(content, dict) and _tensor_mapping(content.get("state_dict")):
        return LoadedCheckpoint(dict(content["state_dict"]), float("nan"), 0)
    raise CheckpointError(job.path, "not a state dict (no mapping of names to tensors)")


@dataclass(frozen=True)
class ReplayOptions:
    """The options that decide a checkpoint's rows (recorded in ``<out>.parts/options.json``)."""

    layers: str = "auto"
    evbmf: bool = True
    genprob_format: bool = False

    def selection(self, kind: str | None) -> str | None:
        """The ``probe(layers=...)`` value for a kind of file."""
        if self.layers == "auto":
            return "genprob" if kind == "genprob" else None
        return self.layers


def replay_checkpoint(job: CheckpointJob, options: ReplayOptions, device: str | None = None,
                      num_threads: int | None = None
                      ) -> tuple[pd.DataFrame, pd.DataFrame | None, ProbeResult, int]:
    """Probe one checkpoint: (its SPEC §5 rows, its reference-layout rows or None, the probe
    result, the TensorBoard step)."""
    loaded = load_checkpoint(job)
    layers = options.selection(job.kind)
    selected = select_weights(loaded.state_dict, layers)
    if not selected:
        raise CheckpointError(job.path, f"nothing to probe with --layers {options.layers}")
    result = probe(loaded.state_dict, evbmf=options.evbmf, layers=layers, device=device,
                   num_threads=num_threads)
    performance = {column: loaded.performance.get(column, float("nan"))
                   for column in PERFORMANCE_COLUMNS[:4]}
    performance["gap"] = performance["test_acc"] - performance["train_acc"]

    table = result.layers.copy()
    for position, (column, value) in enumerate(zip(
            IDENTITY_COLUMNS, (str(job.path), job.model_id, loaded.epoch, loaded.step))):
        table.insert(position, column, value)
    for column, value in performance.items():
        table[column] = value

    reference_rows = None
    if options.genprob_format:
        reference_rows = table.reindex(columns=GENPROB_CSV_COLUMNS)
        reference_rows["path"] = (path_norm(loaded.state_dict, loaded.channel_code)
                                  if loaded.channel_code is not None else float("nan"))
        reference_rows["model_id"] = loaded.channel_code or job.model_id
        dimensions = dict(selected)
        reference_rows["type"] = [dimensions[name].dim() for name in table["layer"]]
    return table, reference_rows, result, loaded.step


# --------------------------------------------------------------------------- committed parts


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_replay_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV the replay wrote, floats exactly as computed (round-trip parsing; only "",
    "NaN" and "nan" are missing values, so a layer or model named "NA" stays a name).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("layer,x\\nNA,0.1234567890123456789\\n")
    >>> table = read_replay_table(path)
    >>> table.loc[0, "layer"], bool(table.loc[0, "x"] == 0.1234567890123456789)
    ('NA', True)
    """
    # pandas 3 parses round-trip by default and deprecates the option.
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(path, keep_default_na=False, na_values=["", "NaN", "nan"], **exact)


class PartStore:
    """``<out>.parts/``: one committed CSV per finished checkpoint, keyed by path, size and mtime.
    The main part is renamed into place last, so its presence means the checkpoint is done."""

    def __init__(self, directory: Path, options: ReplayOptions):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / "options.json"
        wanted = json.dumps(dataclasses.asdict(options), sort_keys=True)
        if manifest.exists():
            recorded = manifest.read_text(encoding="utf-8")
            if recorded != wanted:
                raise SystemExit(f"{directory} was made with other options ({recorded}, now "
                                 f"{wanted}); remove it or choose another --out")
        else:
            _write_atomically(manifest, wanted)

    def _key(self, job: CheckpointJob) -> str:
        try:
            status = job.path.stat()
            identity = f"{job.path}|{status.st_size}|{status.st_mtime_ns}"
        except OSError:
            identity = f"{job.path}|missing"
        return hashlib.sha1(identity.encode()).hexdigest()[:24]

    def table_path(self, job: CheckpointJob) -> Path:
        return self.directory / f"{self._key(job)}.csv"

    def reference_path(self, job: CheckpointJob) -> Path:
        return self.directory / f"{self._key(job)}.genprob.csv"

    def is_done(self, job: CheckpointJob) -> bool:
        return self.table_path(job).exists()

    def commit(self, job: CheckpointJob, table: pd.DataFrame, reference_rows: pd.DataFrame | None
               ) -> None:
        if reference_rows is not None:
            _write_atomically(self.reference_path(job), reference_rows.to_csv(index=False))
        _write_atomically(self.table_path(job), table.to_csv(index=False))

    def read(self, job: CheckpointJob, genprob_format: bool
             ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        reference = read_replay_table(self.reference_path(job)) if genprob_format else None
        return read_replay_table(self.table_path(job)), reference


# --------------------------------------------------------------------------- distribution


@dataclass
class Ranks:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @classmethod
    def from_environment(cls) -> Ranks:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   owns)

    def share(self, jobs: Sequence[CheckpointJob]) -> list[CheckpointJob]:
        """This rank's jobs: whole models, each to the rank with the fewest files so far."""
        files_by_model: dict[str, int] = {}
        for job in jobs:
            files_by_model[job.model_id] = files_by_model.get(job.model_id, 0) + 1
        load = [0] * self.world_size
        owner = {}
        for model_id, count in files_by_model.items():
            owner[model_id] = min(range(self.world_size), key=lambda r: (load[r], r))
            load[owner[model_id]] += count
        return [job for job in jobs if owner[job.model_id] == self.rank]

    def all_gather(self, value):
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.owns_process_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------- the command


@contextlib.contextmanager
def _writing_as_rank_zero():
    """Lightning's loggers write only where ``rank_zero_only.rank`` is 0 (set from torchrun's
    environment). In the replay every rank owns whole models and writes their runs itself, so
    each rank acts as rank zero for its own loggers while it logs."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    rank = rank_zero_only.rank
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = rank


class TensorBoardRuns:
    """One ``pytorch_lightning`` ``TensorBoardLogger`` per model, ``DIR/<model_id>``; a model's
    logger is closed when the next model starts (checkpoints arrive grouped by model)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.model_id: str | None = None
        self.logger = None

    def log(self, model_id: str, result: ProbeResult, step: int) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        from lightning_probes._callback_core import log_probe_result

        with _writing_as_rank_zero():
            if model_id != self.model_id:
                self.close()
                self.logger = TensorBoardLogger(save_dir=str(self.directory), name=model_id,
                                                version="", default_hp_metric=False)
                self.model_id = model_id
            log_probe_result(self.logger, result, step, include_aggregates=True)
            self.logger.experiment.flush()  # on disk before the checkpoint's rows are committed

    def close(self) -> None:
        if self.logger is not None:
            with _writing_as_rank_zero():
                self.logger.finalize("success")
            self.logger = None
            self.model_id = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="checkpoint files or directories")
    parser.add_argument("--out", required=True, type=Path, help="the table to write (CSV)")
    parser.add_argument("--tensorboard", type=Path, metavar="DIR",
                        help="also write one TensorBoard run per model under DIR")
    parser.add_argument("--layers", choices=["auto", "genprob", "all"], default="auto",
                        help="weights to probe: genprob (SPEC §6: 4-D, key contains 'onv' or "
                             "'down'), all (every floating 2-5-D '*weight' tensor), auto (default: "
                             "genprob for GenProb files, all for the others)")
    parser.add_argument("--no-evbmf", dest="evbmf", action="store_false",
                        help="skip EVBMF: BE measures only (faster)")
    parser.add_argument("--format", choices=["table", "genprob"], default="table",
                        help="genprob: also write the reference code's 32-column CSV")
    parser.add_argument("--device", help="where to probe, e.g. cpu or cuda (under torchrun: "
                                         "cuda:LOCAL_RANK); default: where the weights are loaded (cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads while probing")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")


def genprob_csv_path(out: Path) -> Path:
    """``results.csv`` -> ``results.genprob.csv``."""
    stem = out.name[:-4] if out.name.endswith(".csv") else out.name
    return out.with_name(f"{stem}.genprob.csv")


def _write_outputs(out: Path, jobs: Sequence[CheckpointJob], tables: dict, references: dict,
                   errors: dict, genprob_format: bool) -> None:
    done = [job.index for job in jobs if job.index in tables]
    table = (pd.concat([tables[i] for i in done], ignore_index=True) if done
             else pd.DataFrame(columns=IDENTITY_COLUMNS + ["layer"] + PERFORMANCE_COLUMNS))
    _write_atomically(out, table.to_csv(index=False))
    failures = pd.DataFrame([(str(jobs[i].path), errors[i]) for i in sorted(errors)],
                            columns=ERROR_COLUMNS)
    _write_atomically(Path(f"{out}.errors.csv"), failures.to_csv(index=False))
    if genprob_format:
        lines = [",".join(GENPROB_CSV_COLUMNS) + "\n"]
        for i in done:  # the reference writes a blank row after each checkpoint
            lines.append(references[i].to_csv(index=False, header=False) + "\n")
        _write_atomically(genprob_csv_path(out), "".join(lines))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = ReplayOptions(layers=args.layers, evbmf=args.evbmf,
                            genprob_format=args.format == "genprob")
    ranks = Ranks.from_environment()
    try:
        device = args.device
        if device is not None and ranks.world_size > 1 and device == "cuda":
            device = f"cuda:{ranks.local_rank}"
        jobs = plan_jobs(args.paths)
        mine = ranks.share(jobs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        parts = PartStore(Path(f"{args.out}.parts"), options)
        tensorboard = TensorBoardRuns(args.tensorboard) if args.tensorboard else None
        errors: dict[int, str] = {}
        pending = [job for job in mine if not parts.is_done(job)]
        progress = tqdm(total=len(mine), initial=len(mine) - len(pending), unit="ckpt",
                        desc="replay", disable=not args.progress or ranks.rank != 0,
                        file=sys.stderr)
        try:
            for job in pending:
                try:
                    table, reference_rows, result, step = replay_checkpoint(
                        job, options, device, args.threads)
                    if tensorboard is not None:
                        tensorboard.log(job.model_id, result, step)
                    parts.commit(job, table, reference_rows)
                except Exception as error:  # one bad file never stops the others
                    errors[job.index] = (error.reason if isinstance(error, CheckpointError)
                                         else f"{type(error).__name__}: {error}")
                    tqdm.write(f"replay: {job.path}: {errors[job.index]}", file=sys.stderr)
                progress.update()
        finally:
            progress.close()
            if tensorboard is not None:
                tensorboard.close()

        tables, references = {}, {}
        for job in mine:
            if job.index not in errors and parts.is_done(job):
                tables[job.index], references[job.index] = parts.read(job, options.genprob_format)
        gathered = ranks.all_gather((tables, references, errors))
        all_errors = {index: reason for _, _, rank_errors in gathered
                      for index, reason in rank_errors.items()}
        if ranks.rank == 0:
            all_tables = {i: t for rank_tables, _, _ in gathered for i, t in rank_tables.items()}
            all_references = {i: r for _, rank_refs, _ in gathered for i, r in rank_refs.items()}
            _write_outputs(args.out, jobs, all_tables, all_references, all_errors,
                           options.genprob_format)
            failed = f", {len(all_errors)} failed (see {args.out}.errors.csv)" if all_errors else ""
            print(f"replayed {len(jobs) - len(all_errors)} of {len(jobs)} checkpoints into "
                  f"{args.out}{failed}", file=sys.stderr)
        return 1 if all_errors else 0
    finally:
        ranks.close()
