"""probe(): the table and aggregates against per-layer references, selection, and safety."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from reference import reference_layer
from torch import nn

from lightning_probes import TABLE_COLUMNS, aggregates_from_table, probe, select_weights


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 5, 3),
        nn.Conv2d(5, 12, 3),
        nn.BatchNorm2d(12),
        nn.Conv2d(12, 12, 1),
        nn.Conv3d(12, 4, (2, 2, 2)),
        nn.Flatten(),
        nn.Linear(40, 30),
        nn.Linear(30, 10),
    )


def planted_net():
    """Weights with low-rank structure, so EVBMF keeps components and AE values are tested."""
    net = small_net()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = module.weight
                flat = w.reshape(w.shape[0], -1)
                rank = max(1, min(flat.shape) // 4)
                signal = torch.randn(flat.shape[0], rank, generator=generator) @ torch.randn(
                    rank, flat.shape[1], generator=generator)
                w.copy_((signal + 0.05 * torch.randn(flat.shape, generator=generator)).reshape(w.shape))
    return net


@pytest.mark.parametrize("make", [small_net, planted_net])
def test_table_equals_per_layer_reference(make):
    net = make()
    res = probe(net)
    assert list(res.layers.columns) == TABLE_COLUMNS
    assert list(res.layers["layer"]) == ["0.weight", "1.weight", "3.weight", "4.weight", "6.weight", "7.weight"]
    kept = 0
    for name, row in res.layers.set_index("layer").iterrows():
        want = reference_layer(dict(net.named_parameters())[name].detach().double().numpy())
        for column, value in want.items():
            rtol = 1e-6 if column.endswith("_AE") else 1e-9
            assert row[column] == pytest.approx(value, rel=rtol, abs=1e-12), (name, column)
        kept += row["in_rank_AE"] + row["out_rank_AE"]
    if make is planted_net:
        assert kept > 0


def test_aggregates_equal_hand_computation():
    res = probe(planted_net())
    table = res.layers
    x = np.concatenate([table["in_SQ_AE"], table["out_SQ_AE"]])
    w = np.concatenate([table["in_weight_AE"], table["out_weight_AE"]]).astype(float)
    keep = np.isfinite(x) & (x != 0)
    assert keep.sum() > 0
    assert res.aggregates["SQ_AE_p"] == pytest.approx(np.exp(np.log(x[keep]).mean()), rel=1e-12)
    assert res.aggregates["SQ_AE_wp"] == pytest.approx(
        np.exp((w[keep] * np.log(x[keep])).sum() / w[keep].sum()), rel=1e-12)
    e = np.concatenate([table["in_ER_BE"], table["out_ER_BE"]])
    assert res.aggregates["E_BE_L2"] == pytest.approx(np.sqrt((e**2).sum() / len(e)), rel=1e-12)
    f = np.concatenate([table["in_fro_BE"], table["out_fro_BE"]])
    assert res.aggregates["F_BE_L1"] == pytest.approx(f.mean(), rel=1e-12)
    assert res.aggregates == aggregates_from_table(table)
    keys = {f"{m}_{v}_{a}" for m in ("SQ", "E", "F", "S", "SR", "C") for v in ("BE", "AE")
            for a in ("L1", "L2", "p", "wL1", "wp")}
    assert set(res.aggregates) == keys
    assert all(math.isfinite(v) for v in res.aggregates.values())


def test_linear_counts_twice_and_random_weights_keep_no_evbmf_component():
    res = probe(nn.Linear(64, 64))
    row = res.layers.iloc[0]
    assert row["in_S_BE"] == row["out_S_BE"] and row["in_weight_BE"] == 64
    assert row["in_rank_AE"] == 0 and res.aggregates["SQ_AE_p"] == 0.0


def test_state_dict_and_module_give_the_same_table():
    net = small_net()
    from_module = probe(net).layers
    from_state = probe(net.state_dict()).layers
    pd.testing.assert_frame_equal(from_module, from_state)


def test_layer_selections():
    net = small_net()
    assert [n for n, _ in select_weights(net.state_dict())] == [n for n, _ in select_weights(net)]
    only_linear = probe(net, layers=lambda name, t: t.dim() == 2).layers
    assert list(only_linear["layer"]) == ["6.weight", "7.weight"]
    named = probe(net, layers=["7.weight", "1.weight"]).layers
    assert list(named["layer"]) == ["1.weight", "7.weight"]  # module order, not the list's
    with pytest.raises(KeyError, match="nope.weight"):
        probe(net, layers=["nope.weight"])
    with pytest.raises(ValueError, match="layers='some'"):
        probe(net, layers="some")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        probe([1, 2, 3])


def test_genprob_selection_rule_on_keys():
    state = {
        "stem.0.weight": torch.randn(8, 3, 3, 3),
        "cells.0.RELUConvBN0.op.1.weight": torch.randn(40, 8, 3, 3),
        "cells.0.RELUConvBN0.op.2.weight": torch.randn(40),
        "cells.1.down_sample.1.weight": torch.randn(48, 40, 1, 1),
        "cells.0.shortcut.1.weight": torch.randn(40, 8, 1, 1),
        "classifier.weight": torch.randn(10, 48),
    }
    assert [n for n, _ in select_weights(state, "genprob")] == [
        "cells.0.RELUConvBN0.op.1.weight", "cells.1.down_sample.1.weight"]


def test_evbmf_off_drops_ae_columns_and_keys():
    res = probe(small_net(), evbmf=False)
    assert not [c for c in res.layers.columns if c.endswith("_AE")]
    assert res.aggregates and all(k.split("_")[1] == "BE" for k in res.aggregates)


def test_low_precision_weights_are_probed_in_float64():
    net = small_net().to(torch.bfloat16)
    res = probe(net)
    want = reference_layer(net[6].weight.detach().double().numpy())
    assert res.layers.iloc[4]["in_S_BE"] == pytest.approx(want["in_S_BE"], rel=1e-9)
    assert net[6].weight.dtype == torch.bfloat16


def test_spectra_are_returned_on_request():
    net = small_net()
    res = probe(net, keep_spectra=True)
    inward, outward = res.spectra["1.weight"]
    w = net[1].weight.detach().double()
    torch.testing.assert_close(inward, torch.linalg.svdvals(w.transpose(0, 1).reshape(5, -1)))
    torch.testing.assert_close(outward, torch.linalg.svdvals(w.reshape(12, -1)))
    assert probe(net).spectra == {}


def test_probe_never_modifies_the_model():
    net = small_net().train()
    net[7].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    net[6].weight.grad = torch.ones_like(net[6].weight)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    probe(net, num_threads=1)
    with torch.no_grad():
        probe(net)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert torch.equal(net[6].weight.grad, torch.ones_like(net[6].weight))
    assert net.training and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
    assert torch.is_grad_enabled()


def test_explicit_device_argument():
    res_default = probe(small_net())
    res_cpu = probe(small_net(), device="cpu")
    pd.testing.assert_frame_equal(res_default.layers, res_cpu.layers)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            probe(small_net(), device="cuda")
