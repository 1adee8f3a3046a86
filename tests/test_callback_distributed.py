"""ProbeCallback on 2 CPU processes (gloo): DDP and FSDP2 (ModelParallelStrategy + fully_shard)
give every rank the table and aggregates that one process computes from the same weights."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from callback_support import read_events, read_scalars
from lightning_probes import HEADLINE_AGGREGATES, probe

SCRIPT = Path(__file__).with_name("callback_distributed_script.py")
REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, kind):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), kind, str(tmp_path)], env=env, cwd=SCRIPT.parent,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "probe:" not in run.stderr  # no ProbeWarning, also not from the rank that owns no layer
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]

    # Every rank ends with the same full table, spectra and monitored values ...
    for key in ("table", "classifier_table"):
        pd.testing.assert_frame_equal(ranks[0][key], ranks[1][key], check_exact=True)
    assert ranks[0]["aggregates"] == ranks[1]["aggregates"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # ... identical to one process probing the same weights on one thread, as Lightning runs each
    # CPU rank (BLAS may split a product differently on more threads).
    weights = ranks[0]["weights"]
    names = list(ranks[0]["table"]["layer"])
    assert names == ["net.0.weight", "net.2.weight", "net.7.weight"]
    single = probe({name: weights[name] for name in names}, layers=names, keep_spectra=True, num_threads=1)
    pd.testing.assert_frame_equal(ranks[0]["table"], single.layers, check_exact=True)
    assert ranks[0]["aggregates"] == single.aggregates
    for name in names:
        for side in (0, 1):
            assert torch.equal(ranks[0]["spectra"][name][side], ranks[1]["spectra"][name][side])
            assert torch.equal(ranks[0]["spectra"][name][side], single.spectra[name][side])
    assert single.aggregates["SQ_AE_p"] > 0
    classifier_only = probe({"net.7.weight": weights["net.7.weight"]}, layers=["net.7.weight"])
    expected = {f"probe/{key}": single.aggregates[key] for key in HEADLINE_AGGREGATES}
    expected["probe/SR_BE_L1"] = classifier_only.aggregates["SR_BE_L1"]
    assert ranks[0]["metrics"] == pytest.approx(expected, rel=1e-6)
    pd.testing.assert_frame_equal(ranks[0]["classifier_table"], single.layers.iloc[[2]].reset_index(drop=True),
                                  check_exact=True)

    # Rank zero alone writes the logs; they hold the layers the other rank probed too.
    (events,) = read_events(ranks[0]["log_dir"])
    scalars = read_scalars(ranks[0]["log_dir"])
    step = ranks[0]["global_step"]
    assert [s for s, _ in scalars["probe/SQ_AE_p"]] == [step // 2, step]
    for name, row in zip(names, single.layers.to_dict("records")):
        layer = name.removesuffix(".weight")
        assert dict(scalars[f"probe.SQ_BE/{layer}/in"])[step] == pytest.approx(row["in_SQ_BE"], rel=1e-6)
        assert dict(scalars[f"probe.F_AE/{layer}/out"])[step] == pytest.approx(row["out_fro_AE"], rel=1e-6)
        assert events.Histograms(f"probe.spectrum/{layer}/in")[-1].histogram_value.num == single.spectra[name][0].numel()
