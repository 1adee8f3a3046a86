"""Each example runs as users run it (a subprocess, tiny budget) and prints what it promises."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from callback_support import read_scalars
from lightning_probes import HEADLINE_AGGREGATES

EXAMPLES = Path(__file__).parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(EXAMPLES / name), "--threads", "1", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_quickstart_prints_the_epoch_table_it_logs(tmp_path):
    out = run_example("quickstart.py", "--epochs", "2", "--log-dir", str(tmp_path))
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "val_acc", *HEADLINE_AGGREGATES, "probe_ms"]
    rows = [[float(v) for v in line.split()] for line in lines[1:3]]
    assert [row[0] for row in rows] == [0, 1]
    assert all(0.5 < row[1] <= 1 for row in rows)  # digits are easy: above chance after an epoch
    assert re.match(r"trained NIN00000 for 2 epochs in [\d.]+ s; TensorBoard logs in ", lines[3])
    scalars = read_scalars(str(tmp_path / "quickstart"))
    for column, key in enumerate(HEADLINE_AGGREGATES, start=2):
        logged = [value for _, value in scalars[f"probe/{key}"]]
        assert [row[column] for row in rows] == pytest.approx(logged, abs=5e-5)
    assert rows[-1][3] > 0  # SQ_AE_p: trained NIN layers keep EVBMF components
    assert any(tag.startswith("probe.SQ_AE/network.cell2.RELUConvBN3.1/") for tag in scalars)


def test_early_stopping_stops_on_the_probe_and_restores_the_best_checkpoint(tmp_path):
    # No rise of SQ_AE_p reaches min_delta=10: the second probe stops training.
    out = run_example("early_stopping.py", "--epochs", "6", "--patience", "1", "--min-delta", "10",
                      "--out", str(tmp_path))
    lines = out.splitlines()
    assert lines[0] == "trained 2 epochs; stopped early: no improvement of probe/SQ_AE_p in the last 1 probe(s)"
    match = re.match(r"best probe/SQ_AE_p = ([\d.]+): (.*/epoch0[01]-SQ_AE_p([\d.]+)\.ckpt)$", lines[1])
    assert match and Path(match[2]).is_file() and match[1] == match[3]
    assert re.match(r"validation accuracy of that checkpoint: 0\.\d{4}$", lines[2])


def test_hpo_runs_both_studies(tmp_path):
    out = run_example("hpo_optuna.py", "--max-trials", "4", "--epochs", "3")
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["pruned", "on", "best", "val_acc"]
    assert [row.split()[0] for row in rows] == ["val_acc", "probe/SQ_AE_p"]
    for row in rows:
        fields = row.split()
        assert 0.5 < float(fields[1]) <= 1
        spent, pruned, complete = int(fields[2]), int(fields[3]), int(fields[4])
        assert pruned + complete == 4 and complete >= 3  # the pruner's 3 start-up trials always complete
        assert 3 * complete <= spent <= 3 * 4
