"""The GenProb format (SPEC §6): NIN architecture, file names, safe reader, writer, generator."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

from lightning_probes import probe, select_weights
from lightning_probes.cli import main
from lightning_probes.genprob import (
    NIN,
    CheckpointError,
    UnknownObject,
    checkpoint_file_name,
    nin_from_code,
    parse_checkpoint_name,
    planes_from_code,
    read_checkpoint,
    safe_torch_load,
    write_checkpoint,
)


def statistics(epochs, value=0.5):
    return {f"{split}_{kind}_epoch_{e}": value for split in ("test", "train")
            for kind in ("acc1", "loss") for e in range(1, epochs + 1)}


def test_probe_with_the_genprob_selection_measures_the_21_layers_of_a_nin():
    result = probe(nin_from_code("00000").state_dict(), layers="genprob")
    assert len(result.layers) == 21
    assert result.layers["in_weight_BE"].tolist() == [8, 8] + [40] * 19  # cell0 reads the 8-channel stem


@pytest.mark.parametrize("code", ["00000", "01234", "90909"])
def test_genprob_selection_picks_the_21_probed_layers_of_a_nin(code):
    net = nin_from_code(code, num_classes=7)
    names = [name for name, _ in select_weights(net.state_dict(), "genprob")]
    assert len(names) == 21
    assert not any(name.startswith(("stem", "classifier")) or "shortcut" in name for name in names)
    assert sum("RELUConvBN" in name for name in names) == 15
    assert sum(name.endswith("down_sample.1.weight") for name in names) == 2
    assert names == [key for key, value in net.state_dict().items()
                     if value.dim() == 4 and ("onv" in key or "down" in key)]
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_nin_widths_follow_the_channel_code():
    net = nin_from_code("01239")
    assert planes_from_code("01239") == (40, 48, 56, 64, 112)
    assert net.cell4.RELUConvBN0[1].weight.shape == (112, 64, 3, 3)
    assert net.cell1.conv_a[1].stride == (2, 2)
    assert net.classifier.weight.shape == (10, 112)
    assert isinstance(NIN((40,) * 5).cell2.shortcut, torch.nn.Identity)  # same width: identity
    with pytest.raises(ValueError, match="five digits"):
        planes_from_code("0000")


def test_file_names_are_parsed_by_regex_not_by_position():
    name = checkpoint_file_name("my", "01234", ("sgd", "0.02", "64", "0.0005", "3"), "CIFAR100", 17)
    parsed = parse_checkpoint_name(f"/some_dir/with_NIN_in/{name}")
    assert (parsed.channel_code, parsed.tokens, parsed.dataset, parsed.epoch) == (
        "01234", ("sgd", "0.02", "64", "0.0005", "3"), "CIFAR100", 17)
    assert parsed.model_id == "my_NIN01234_sgd_0.02_64_0.0005_3_CIFAR100"
    # a prefix with underscores and a different number of tokens still parses
    odd = parse_checkpoint_name("run_a_b_NIN99999_x_y_CIFAR10_epoch_0.pth.tar")
    assert (odd.channel_code, odd.tokens, odd.dataset, odd.epoch) == ("99999", ("x", "y"), "CIFAR10", 0)
    for other in ("model.pth.tar", "NIN00000_epoch_3.pth", "NIN0000_a_b_c_d_e_D_epoch_1.pth.tar"):
        assert parse_checkpoint_name(other) is None
    with pytest.raises(ValueError, match="free of '_'"):
        checkpoint_file_name("p", "00000", ("a_b", "1", "2", "3", "4"), "D", 1)


def test_writer_and_reader_round_trip(tmp_path):
    net = nin_from_code("00100")
    path = tmp_path / checkpoint_file_name("zoo", "00100", ("adam", "0.001", "32", "0", "1"), "DIGITS", 2)
    stats = statistics(2)
    stats["test_acc1_epoch_2"] = 0.75
    write_checkpoint(path, net.state_dict(), stats)
    plain = torch.load(path, weights_only=True)  # the writer's files need no unpickler fallback
    assert set(plain) == {"state_dict_network", "performance_statistics"}
    checkpoint = read_checkpoint(path)
    assert checkpoint.performance == {"test_acc": 0.75, "test_loss": 0.5, "train_acc": 0.5, "train_loss": 0.5}
    for key, value in net.state_dict().items():
        assert torch.equal(checkpoint.state_dict[key], value)
    assert not list(tmp_path.glob("*.tmp"))


def test_restricted_loader_maps_unknown_classes_to_inert_containers_and_runs_no_code(tmp_path):
    # A module of the "original training code" that exists while saving, not while loading.
    module = types.ModuleType("vanished_training_code")

    class AverageMeter:
        def __init__(self):
            self.avg, self.history = 0.25, [1, 2]

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'executed'}",))

    for cls in (AverageMeter, Payload):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules[module.__name__] = module
    net = nin_from_code("00000")
    stats = {key: np.float64(value) for key, value in statistics(1, 0.5).items()}  # numpy scalars
    path = tmp_path / checkpoint_file_name("zoo", "00000", ("a", "b", "c", "d", "e"), "CIFAR10", 1)
    try:
        torch.save({"state_dict_network": net.state_dict(), "performance_statistics": stats,
                    "meter": AverageMeter(), "payload": Payload(), "hook": os.system}, path)
    finally:
        del sys.modules[module.__name__]

    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    content = safe_torch_load(path)
    assert not (tmp_path / "executed").exists()
    assert isinstance(content["meter"], UnknownObject)
    assert content["meter"].pickled_class == "vanished_training_code.AverageMeter"
    assert dict(content["meter"]) == {"avg": 0.25, "history": [1, 2]}
    assert isinstance(content["payload"], UnknownObject)
    assert content["payload"].args == (f"touch {tmp_path / 'executed'}",)
    checkpoint = read_checkpoint(path)
    assert checkpoint.performance["train_acc"] == 0.5
    assert torch.equal(checkpoint.state_dict["cell0.RELUConvBN0.1.weight"],
                       net.state_dict()["cell0.RELUConvBN0.1.weight"])
    assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("content, reason", [
    ({"performance_statistics": {}}, "missing key 'state_dict_network'"),
    ({"state_dict_network": {"w": torch.ones(2, 2, 1, 1)}}, "missing key 'performance_statistics'"),
    ({"state_dict_network": {"w": torch.ones(2, 2, 1, 1)}, "performance_statistics": statistics(2)},
     "no 'test_acc1_epoch_3'"),
    ({"state_dict_network": {"w": torch.ones(2, 2, 1, 1)},
      "performance_statistics": {**statistics(3), "train_loss_epoch_3": "n/a"}}, "not a number"),
    ({"state_dict_network": [1, 2], "performance_statistics": statistics(3)}, "not a state dict"),
    ([1, 2, 3], "not a GenProb dict"),
])
def test_reader_names_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "z_NIN00000_a_b_c_d_e_DIGITS_epoch_3.pth.tar"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=reason) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)


def test_reader_rejects_unreadable_files_and_foreign_names(tmp_path):
    good = tmp_path / "z_NIN00000_a_b_c_d_e_DIGITS_epoch_1.pth.tar"
    write_checkpoint(good, nin_from_code("00000").state_dict(), statistics(1))
    truncated = tmp_path / "z_NIN00000_a_b_c_d_e_DIGITS_epoch_2.pth.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not a GenProb file name"):
        read_checkpoint(tmp_path / "weights.pth.tar")


def test_generator_is_deterministic_and_writes_every_epoch_statistic(tmp_path):
    options = ["--codes", "00000", "--optimizers", "sgd", "--lr-scales", "1", "--batch-sizes", "64",
               "--weight-decays", "0.0005", "--seeds", "3", "--epochs", "2", "--threads", "1", "--jobs", "1"]
    assert main(["generate", str(tmp_path / "a"), *options]) == 0
    assert main(["generate", str(tmp_path / "b"), *options]) == 0
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == [f"zoo_NIN00000_sgd_0.02_64_0.0005_3_DIGITS_epoch_{e}.pth.tar" for e in (1, 2)]
    for name in names:
        first = torch.load(tmp_path / "a" / name, weights_only=True)
        second = torch.load(tmp_path / "b" / name, weights_only=True)
        assert first["performance_statistics"] == second["performance_statistics"]
        for key, value in first["state_dict_network"].items():
            assert torch.equal(value, second["state_dict_network"][key]), key
    last = torch.load(tmp_path / "a" / names[-1], weights_only=True)["performance_statistics"]
    assert sorted(last) == sorted(statistics(2))
    for key, value in last.items():
        assert 0.0 <= value <= 1.0 if "acc1" in key else value > 0.0
