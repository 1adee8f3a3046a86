"""The GenProb checkpoint format (SPEC §6): the NIN architecture, file names, reader and writer.

A GenProb zoo is a directory of files named
``<prefix>_NIN<d1..d5>_<t1>_<t2>_<t3>_<t4>_<t5>_<DATASET>_epoch_<E>.pth.tar``, each holding
``{"state_dict_network": ..., "performance_statistics": {"test_acc1_epoch_<e>": ..., ...}}``.

>>> import tempfile, pathlib
>>> net = nin_from_code("00000")
>>> name = checkpoint_file_name("zoo", "00000", ("adam", "0.001", "32", "0", "1"), "DIGITS", 3)
>>> name
'zoo_NIN00000_adam_0.001_32_0_1_DIGITS_epoch_3.pth.tar'
>>> stats = {f"{split}_{kind}_epoch_{e}": 0.5 for split in ("test", "train")
...          for kind in ("acc1", "loss") for e in (1, 2, 3)}
>>> path = pathlib.Path(tempfile.mkdtemp()) / name
>>> write_checkpoint(path, net.state_dict(), stats)
>>> checkpoint = read_checkpoint(path)
>>> checkpoint.name.channel_code, checkpoint.name.epoch, checkpoint.performance["test_acc"]
('00000', 3, 0.5)
>>> len([key for key, value in checkpoint.state_dict.items() if value.dim() == 4
...      and ("onv" in key or "down" in key)])
21
"""
from __future__ import annotations

import math
import os
import pickle
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "NIN",
    "CheckpointError",
    "GenProbCheckpoint",
    "GenProbName",
    "UnknownObject",
    "checkpoint_file_name",
    "nin_from_code",
    "parse_checkpoint_name",
    "path_norm",
    "planes_from_code",
    "read_checkpoint",
    "safe_torch_load",
    "write_checkpoint",
]

#: SPEC §6 file-name patterns: the channel code anywhere, the dataset and epoch at the end.
CHANNEL_CODE_PATTERN = re.compile(r"NIN(\d{5})")
DATASET_EPOCH_PATTERN = re.compile(r"_([^_]+)_epoch_(\d+)\.pth\.tar$")
#: performance_statistics key of one statistic of one epoch, and the table column it fills.
STATISTIC_KEYS = {
    "test_acc": "test_acc1_epoch_{epoch}",
    "test_loss": "test_loss_epoch_{epoch}",
    "train_acc": "train_acc1_epoch_{epoch}",
    "train_loss": "train_loss_epoch_{epoch}",
}


# --------------------------------------------------------------------------- architecture


def planes_from_code(code: str) -> tuple[int, ...]:
    """Channels of the five NIN cells, ``40 + 8 * digit``.

    >>> planes_from_code("01239")
    (40, 48, 56, 64, 112)
    """
    if not (isinstance(code, str) and len(code) == 5 and code.isdigit()):
        raise ValueError(f"a NIN channel code is five digits, like '00000'; got {code!r}")
    return tuple(40 + 8 * int(digit) for digit in code)


def _relu_conv_bn(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    """Five ReLU-Conv3x3-BN branches on two nodes, plus a ReLU-Conv1x1-BN shortcut when the
    channels change (SPEC §6)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.RELUConvBN0 = _relu_conv_bn(c_in, c_out, 3)
        self.RELUConvBN1 = _relu_conv_bn(c_in, c_out, 3)
        self.RELUConvBN2 = _relu_conv_bn(c_out, c_out, 3)
        self.RELUConvBN3 = _relu_conv_bn(c_out, c_out, 3)
        self.RELUConvBN4 = _relu_conv_bn(c_out, c_out, 3)
        self.shortcut = _relu_conv_bn(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        node1 = self.RELUConvBN0(x)
        node2 = self.RELUConvBN2(node1) + self.RELUConvBN1(x)
        return self.RELUConvBN3(node2) + self.RELUConvBN4(node1) + self.shortcut(x)


class ResBlock(nn.Module):
    """``conv_b(conv_a(x)) + down_sample(x)``, halving the resolution (SPEC §6)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = _relu_conv_bn(c_in, c_out, 3, stride=2)
        self.conv_b = _relu_conv_bn(c_out, c_out, 3)
        self.down_sample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_b(self.conv_a(x)) + self.down_sample(x)


class NIN(nn.Module):
    """The GenProb NIN network of SPEC §6 for five cell widths; state-dict keys are those of the
    reference code, so its checkpoints load as they are.

    >>> net = NIN((40, 40, 40, 40, 40), num_classes=10)
    >>> net(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, planes: Sequence[int], num_classes: int = 10):
        super().__init__()
        if len(planes) != 5:
            raise ValueError(f"NIN has five cells; got {len(planes)} widths {tuple(planes)}")
        p1, p2, p3, p4, p5 = (int(p) for p in planes)
        self.planes = (p1, p2, p3, p4, p5)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.cell0 = BasicBlock(8, p1)
        self.cell1 = ResBlock(p1, p2)
        self.cell2 = BasicBlock(p2, p3)
        self.cell3 = ResBlock(p3, p4)
        self.cell4 = BasicBlock(p4, p5)
        self.last_act = nn.Sequential(nn.BatchNorm2d(p5), nn.ReLU())
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(p5, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        for cell in (self.cell0, self.cell1, self.cell2, self.cell3, self.cell4):
            out = cell(out)
        return self.classifier(self.global_pooling(self.last_act(out)).flatten(1))


def nin_from_code(code: str, num_classes: int = 10) -> NIN:
    """The NIN of a five-digit channel code, e.g. ``nin_from_code("00000")`` (40 channels per
    cell) or ``nin_from_code("99999")`` (112)."""
    return NIN(planes_from_code(code), num_classes)


@torch.no_grad()
def path_norm(state_dict: Mapping[str, Tensor], code: str, image_size: int = 32) -> float:
    """The reference code's ``path`` column for a NIN state dict: every parameter squared (buffers
    as they are), eval mode, ``sqrt(sum(net(ones(1, 3, image_size, image_size))))``; the
    reference fixes ``image_size`` at 32 (CIFAR)."""
    num_classes = state_dict["classifier.weight"].shape[0]
    net = nin_from_code(code, num_classes).double()
    net.load_state_dict({key: value.double() if value.is_floating_point() else value
                         for key, value in state_dict.items()})
    for parameter in net.parameters():
        parameter.pow_(2)
    net.eval()
    return math.sqrt(float(net(torch.ones(1, 3, image_size, image_size, dtype=torch.float64)).sum()))


# --------------------------------------------------------------------------- file names


@dataclass(frozen=True)
class GenProbName:
    """What a GenProb file name says. ``model_id`` is the name up to ``_epoch_<E>.pth.tar``: one
    training run, whatever its epoch."""

    model_id: str
    channel_code: str
    tokens: tuple[str, ...]
    dataset: str
    epoch: int


def checkpoint_file_name(prefix: str, code: str, tokens: Sequence[str], dataset: str,
                         epoch: int) -> str:
    """``<prefix>_NIN<code>_<t1>_..._<t5>_<DATASET>_epoch_<E>.pth.tar``, checking that every part
    is free of underscores so the name parses back."""
    planes_from_code(code)
    if len(tokens) != 5:
        raise ValueError(f"a GenProb name has five hyper-parameter tokens; got {tuple(tokens)}")
    for part in (*tokens, dataset):
        if not part or "_" in str(part):
            raise ValueError(f"GenProb name parts must be non-empty and free of '_'; got {part!r}")
    return f"{prefix}_NIN{code}_{'_'.join(map(str, tokens))}_{dataset}_epoch_{int(epoch)}.pth.tar"


def parse_checkpoint_name(path: str | os.PathLike) -> GenProbName | None:
    """Parse a GenProb file name by the SPEC §6 regexes; ``None`` when it is not one.

    >>> parse_checkpoint_name("runs/zoo_NIN01234_sgd_0.02_64_0.0005_2_DIGITS_epoch_12.pth.tar")
    GenProbName(model_id='zoo_NIN01234_sgd_0.02_64_0.0005_2_DIGITS', channel_code='01234', \
tokens=('sgd', '0.02', '64', '0.0005', '2'), dataset='DIGITS', epoch=12)
    """
    name = Path(path).name
    code_match = CHANNEL_CODE_PATTERN.search(name)
    tail_match = DATASET_EPOCH_PATTERN.search(name)
    if code_match is None or tail_match is None or code_match.end() > tail_match.start():
        return None
    between = name[code_match.end():tail_match.start()]
    tokens = tuple(between.split("_")[1:]) if between.startswith("_") else ()
    return GenProbName(
        model_id=name[:tail_match.start()] + "_" + tail_match.group(1),
        channel_code=code_match.group(1),
        tokens=tokens,
        dataset=tail_match.group(1),
        epoch=int(tail_match.group(2)),
    )


# --------------------------------------------------------------------------- safe loading


class CheckpointError(Exception):
    """A checkpoint file could not be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class UnknownObject(dict):
    """Inert stand-in for a class a checkpoint pickles but the restricted loader does not allow.

    It never runs the original code: it records the constructor arguments (``args``), the pickled
    state (a dict state also fills the mapping itself, so attributes read as keys) and appended
    items. ``pickled_class`` says what the original class was.
    """

    pickled_class = "?"
    dump_patches = False  # read by torch's legacy loader for pickled modules

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args = args
        instance.items_appended = []
        return instance

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.state = state
        if isinstance(state, dict):
            self.update(state)

    def append(self, item):
        self.items_appended.append(item)

    def extend(self, items):
        self.items_appended.extend(items)

    def __repr__(self) -> str:
        return f"<UnknownObject {self.pickled_class}>"


def _allowed_globals() -> dict[tuple[str, str], object]:
    import collections
    import codecs

    import numpy

    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): codecs.encode,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("numpy", "dtype"): numpy.dtype,
        ("numpy", "ndarray"): numpy.ndarray,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                 "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    # numpy scalars and arrays, as pickled by numpy 1.x (numpy.core) and 2.x (numpy._core)
    multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "scalar")] = multiarray.scalar
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
    for name in ("float64", "float32", "int64", "int32", "bool_"):
        allowed[("numpy", name)] = getattr(numpy, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves allow-listed globals (tensor rebuilding, dtypes, plain
    containers, numpy scalars); every other class or function becomes an inert
    :class:`UnknownObject` subclass, so no code from the file ever runs. ``replaced`` lists the
    stand-ins made, as ``module.name``."""

    _allowed: dict[tuple[str, str], object] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaced: list[str] = []
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        allowed = RestrictedUnpickler._allowed.get((module, name))
        if allowed is not None:
            return allowed
        self.replaced.append(f"{module}.{name}")
        return type(str(name), (UnknownObject,), {"pickled_class": f"{module}.{name}"})


def _restricted_pickle_module() -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module that ``torch.load(pickle_module=...)`` accepts."""

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="lightning_probes.genprob.restricted_pickle",
                                 Unpickler=RestrictedUnpickler, load=load)


def safe_torch_load(path: str | os.PathLike) -> object:
    """Load a torch file onto the CPU without running code from it.

    ``torch.load(weights_only=True)`` first; when that refuses the file (classes from the original
    training code, numpy scalars, ...), a restricted unpickler that maps unknown classes to inert
    :class:`UnknownObject` containers. Raises :class:`CheckpointError` naming the file when neither
    can read it (truncated, corrupt or not a torch file).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # any failure: retry with the restricted unpickler
        try:
            return torch.load(path, map_location="cpu", weights_only=False,
                              pickle_module=_restricted_pickle_module())
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
            raise CheckpointError(path, f"not a readable torch file ({reason})") from first_error


# --------------------------------------------------------------------------- reader and writer


@dataclass
class GenProbCheckpoint:
    """One GenProb file: its parsed name, the network's state dict, and the four statistics of its
    own epoch (``test_acc``, ``test_loss``, ``train_acc``, ``train_loss``; accuracies as
    fractions)."""

    name: GenProbName
    state_dict: dict[str, Tensor]
    performance: dict[str, float] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> GenProbCheckpoint:
    """Read a GenProb ``.pth.tar`` file safely (see :func:`safe_torch_load`).

    Raises :class:`CheckpointError` naming the file when its name is not a GenProb name, it cannot
    be read, ``state_dict_network`` or ``performance_statistics`` is missing or malformed, or a
    statistic of the file's epoch is missing or not a number.
    """
    name = parse_checkpoint_name(path)
    if name is None:
        raise CheckpointError(path, "not a GenProb file name "
                              "(<prefix>_NIN<5 digits>_<t1>_..._<t5>_<DATASET>_epoch_<E>.pth.tar)")
    content = safe_torch_load(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(path, f"holds a {type(content).__name__}, not a GenProb dict")
    for key in ("state_dict_network", "performance_statistics"):
        if key not in content:
            raise CheckpointError(path, f"missing key {key!r}")
    state_dict = content["state_dict_network"]
    if not isinstance(state_dict, Mapping) or not any(
            isinstance(value, Tensor) for value in state_dict.values()):
        raise CheckpointError(path, "'state_dict_network' is not a state dict of tensors")
    statistics = content["performance_statistics"]
    if not isinstance(statistics, Mapping):
        raise CheckpointError(path, "'performance_statistics' is not a dict")
    performance = {}
    for column, key_pattern in STATISTIC_KEYS.items():
        key = key_pattern.format(epoch=name.epoch)
        if key not in statistics:
            raise CheckpointError(path, f"performance_statistics has no {key!r}")
        try:
            performance[column] = float(statistics[key])
        except (TypeError, ValueError):
            raise CheckpointError(path, f"performance_statistics[{key!r}] is not a number: "
                                  f"{statistics[key]!r}") from None
    return GenProbCheckpoint(name=name, state_dict=dict(state_dict), performance=performance)


def write_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, Tensor],
                     performance_statistics: Mapping[str, float]) -> None:
    """Write a GenProb file atomically (a temporary file renamed into place), with tensors moved
    to the CPU and statistics as plain floats, loadable with ``weights_only=True``."""
    path = Path(path)
    content = {
        "state_dict_network": {key: value.detach().cpu() for key, value in state_dict.items()},
        "performance_statistics": {str(key): float(value)
                                   for key, value in performance_statistics.items()},
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(content, temporary)
    os.replace(temporary, path)
