"""Bad input: no exception, defined values, one warning naming the layer and the reason."""
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lightning_probes import probe
from lightning_probes.probe import ProbeWarning


def probe_warning_once(obj, match, **kwargs):
    with pytest.warns(ProbeWarning) as record:
        res = probe(obj, **kwargs)
    messages = [str(w.message) for w in record if issubclass(w.category, ProbeWarning)]
    assert len([m for m in messages if match in m]) == 1, messages
    layer = re.search(r"'[^']+'", match)
    if layer:  # one warning per layer, whatever its reasons
        assert len([m for m in messages if layer.group(0) in m]) == 1, messages
    assert all(math.isfinite(v) for v in res.aggregates.values())
    return res, messages


def measured_row(res, name):
    return res.layers.set_index("layer").loc[name]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entries_give_nan_row_and_finite_aggregates(bad):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        net[1].weight[2, 1, 0, 0] = bad
    res, messages = probe_warning_once(net, "'1.weight' has NaN or Inf")
    row = measured_row(res, "1.weight")
    assert row.drop(["in_weight_BE", "out_weight_BE", "in_weight_AE", "out_weight_AE"]).isna().all()
    healthy = measured_row(res, "0.weight")
    assert np.isfinite(healthy["in_S_BE"])
    clean = probe(nn.Sequential(net[0]))
    assert res.aggregates["SQ_BE_p"] == pytest.approx(clean.aggregates["SQ_BE_p"])


def test_all_zero_weight():
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.zero_()
    res, _ = probe_warning_once(net, "'1.weight' is all zeros")
    row = measured_row(res, "1.weight")
    for side in ("in", "out"):
        assert all(pd.isna(row[f"{side}_{m}_BE"]) for m in ("S", "C", "ER", "SQ"))
        assert row[f"{side}_spec_BE"] == 0 and row[f"{side}_fro_BE"] == 0
        assert all(row[f"{side}_{m}_AE"] == 0 for m in ("S", "C", "ER", "spec", "fro", "SQ"))
        assert row[f"{side}_rank_AE"] == 0


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (1, 1)])
def test_single_singular_value_matrices(shape):
    net = nn.Sequential(nn.Linear(shape[1], shape[0]))
    res, _ = probe_warning_once(net, "'0.weight' of shape")
    row = measured_row(res, "0.weight")
    assert row["in_S_BE"] == 1.0 and row["in_C_BE"] == 1.0 and row["in_ER_BE"] == 0.0
    assert row["in_SQ_BE"] == pytest.approx(math.pi / 2)
    assert row["in_spec_BE"] == pytest.approx(float(net[0].weight.detach().norm()))


def test_zero_size_tensor():
    state = {"empty.weight": torch.zeros(0, 5), "fine.weight": torch.randn(4, 5)}
    res, _ = probe_warning_once(state, "'empty.weight' has zero size")
    row = measured_row(res, "empty.weight")
    assert row["in_spec_BE"] == 0 and pd.isna(row["in_S_BE"]) and row["in_rank_AE"] == 0
    assert row["in_weight_BE"] == 0


def test_integer_tensor_is_named_and_left_out_by_default_and_probed_when_asked():
    state = {"q.weight": torch.randint(-5, 5, (6, 6)), "fine.weight": torch.randn(4, 5)}
    res, _ = probe_warning_once(state, "'q.weight' has dtype torch.int64, not floating point")
    assert list(res.layers["layer"]) == ["fine.weight"]
    res, _ = probe_warning_once(state, "'q.weight' has dtype torch.int64: probed as torch.float64",
                                layers=["q.weight"])
    assert measured_row(res, "q.weight")["in_fro_BE"] == pytest.approx(float(state["q.weight"].double().norm()))


def test_nothing_to_probe():
    res, _ = probe_warning_once(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "nothing to probe")
    assert res.layers.empty and len(res.aggregates) == 60
    assert all(v == 0.0 for v in res.aggregates.values())


def test_non_tensor_values_in_a_state_dict():
    state = {"epoch": 3, "fine.weight": torch.randn(4, 5), "notes": "x"}
    with pytest.warns(ProbeWarning) as record:
        res = probe(state)
    messages = [str(w.message) for w in record]
    assert any("'epoch' is a int, not a tensor" in m for m in messages)
    assert any("'notes' is a str, not a tensor" in m for m in messages)
    assert list(res.layers["layer"]) == ["fine.weight"]


def test_one_dimensional_tensor_selected_explicitly():
    res, _ = probe_warning_once({"bias": torch.randn(7)}, "'bias' has 1 dims", layers=["bias"])
    assert measured_row(res, "bias")["in_S_BE"] == 1.0


def test_matrix_too_large_names_layer_and_shape():
    # A stride-0 view: 2e5 x 3e5 entries without the memory; the probe must refuse up front.
    huge = torch.zeros(()).expand(200_000, 300_000)
    with pytest.raises(MemoryError, match=r"layer 'huge.weight' unfolds to a 200000 x 300000 matrix"):
        probe({"huge.weight": huge, "fine.weight": torch.randn(3, 3)})
