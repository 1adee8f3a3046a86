"""``lightning-probes replay`` on a real generated zoo and on a real Trainer's checkpoints."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from callback_support import classifier_class, digits_loaders, read_scalars
from lightning_probes import probe
from lightning_probes.cli import main
from lightning_probes.genprob import nin_from_code, read_checkpoint, write_checkpoint
from lightning_probes.pytorch_lightning import ProbeCallback
from lightning_probes.replay import GENPROB_CSV_COLUMNS, genprob_csv_path, read_replay_table

REPO = Path(__file__).resolve().parents[1]


def python_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """Two NIN 00000 models (Adam, SGD) x 3 epochs, made by the generator."""
    directory = tmp_path_factory.mktemp("zoo")
    assert main(["generate", str(directory), "--codes", "00000", "--optimizers", "adam", "sgd",
                 "--lr-scales", "1", "--batch-sizes", "64", "--weight-decays", "0", "--seeds", "0",
                 "--epochs", "3", "--jobs", "1"]) == 0
    return directory


@pytest.fixture(scope="module")
def replayed(zoo, tmp_path_factory) -> Path:
    """An uninterrupted single-process replay of the zoo, both formats."""
    out = tmp_path_factory.mktemp("replayed") / "zoo.csv"
    assert main(["replay", str(zoo), "--out", str(out), "--format", "genprob", "--no-progress",
                 "--threads", "1", "--tensorboard", str(out.parent / "tensorboard")]) == 0
    return out


def test_round_trip_writer_to_replay_equals_probe_of_the_same_state_dict(zoo, replayed):
    table = read_replay_table(replayed)
    files = sorted(zoo.iterdir(), key=lambda p: (p.name.split("_epoch_")[0], int(p.name.split("_")[-1].split(".")[0])))
    assert len(files) == 6 and table["checkpoint"].unique().tolist() == [str(f) for f in files]
    for path, rows in table.groupby("checkpoint", sort=False):
        checkpoint = read_checkpoint(path)
        expected = probe(checkpoint.state_dict, layers="genprob").layers
        got = rows[expected.columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected, check_exact=True, check_dtype=False)
        assert len(rows) == 21
        assert (rows["epoch"] == checkpoint.name.epoch).all() and (rows["step"] == checkpoint.name.epoch).all()
        assert (rows["model_id"] == checkpoint.name.model_id).all()
        for column, value in checkpoint.performance.items():
            assert (rows[column] == value).all()
        assert np.allclose(rows["gap"], checkpoint.performance["test_acc"] - checkpoint.performance["train_acc"])
    assert 0 < table["train_acc"].max() <= 1 and table["test_acc"].min() > 0
    assert read_replay_table(f"{replayed}.errors.csv").empty

    reference = read_replay_table(genprob_csv_path(replayed))
    assert list(reference.columns) == GENPROB_CSV_COLUMNS and len(GENPROB_CSV_COLUMNS) == 32
    assert len(reference) == len(table)
    for column in GENPROB_CSV_COLUMNS:
        if column in table.columns and column != "model_id":
            np.testing.assert_array_equal(reference[column].to_numpy(), table[column].to_numpy())
    assert (reference["model_id"] == 0).all() and (reference["type"] == 4).all()  # code 00000, 4-D
    assert np.isfinite(reference["path"]).all() and (reference["path"] > 0).all()
    blank_lines = genprob_csv_path(replayed).read_text().count("\n\n")
    assert blank_lines == 6  # the reference's empty row after each checkpoint


def test_generator_writes_the_same_files_with_parallel_jobs(zoo, tmp_path):
    parallel = tmp_path / "parallel"
    assert main(["generate", str(parallel), "--codes", "00000", "--optimizers", "adam", "sgd",
                 "--lr-scales", "1", "--batch-sizes", "64", "--weight-decays", "0", "--seeds", "0",
                 "--epochs", "3", "--jobs", "2"]) == 0
    names = sorted(path.name for path in zoo.iterdir())
    assert sorted(path.name for path in parallel.iterdir()) == names
    for name in names:
        first = torch.load(zoo / name, weights_only=True)
        second = torch.load(parallel / name, weights_only=True)
        assert first["performance_statistics"] == second["performance_statistics"]
        for key, value in first["state_dict_network"].items():
            assert torch.equal(value, second["state_dict_network"][key]), (name, key)


def test_no_evbmf_and_all_layers_options(zoo, tmp_path):
    path = sorted(zoo.iterdir())[0]
    out = tmp_path / "all.csv"
    assert main(["replay", str(path), "--out", str(out), "--no-evbmf", "--layers", "all", "--no-progress",
                 "--threads", "1"]) == 0
    rows = read_replay_table(out)
    expected = probe(read_checkpoint(path).state_dict, evbmf=False).layers
    assert len(expected) == 24  # the stem, the 21 GenProb layers, cell0's shortcut, the classifier
    assert not any(column.endswith("_AE") for column in rows.columns)
    pd.testing.assert_frame_equal(rows[expected.columns], expected, check_exact=True, check_dtype=False)


def test_every_bad_file_kind_is_listed_and_the_rest_go_on(zoo, replayed, tmp_path, capsys):
    directory = tmp_path / "mixed"
    shutil.copytree(zoo, directory)
    good = sorted(directory.iterdir())[0]
    content = good.read_bytes()
    bad = {
        "z_NIN00000_t_t_t_t_t_DIGITS_epoch_1.pth.tar": ("truncated", content[: len(content) // 2]),
        "z_NIN00000_c_c_c_c_c_DIGITS_epoch_1.pth.tar": ("corrupt", bytes(range(256)) * 40),
        "z_NIN00000_f_f_f_f_f_DIGITS_epoch_1.pth.tar": ("foreign", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
    }
    for name, (_, data) in bad.items():
        (directory / name).write_bytes(data)
    net = nin_from_code("00000").state_dict()
    torch.save({"state_dict_network": net}, directory / "z_NIN00000_m_m_m_m_m_DIGITS_epoch_1.pth.tar")
    stats = {f"{s}_{k}_epoch_1": 0.5 for s in ("test", "train") for k in ("acc1", "loss")}
    write_checkpoint(directory / "z_NIN00000_e_e_e_e_e_DIGITS_epoch_2.pth.tar", net, stats)
    torch.save([1, 2, 3], directory / "not_a_state_dict.pt")
    (directory / "weights.pth.tar").write_bytes(content)  # a GenProb file under a foreign name
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")

    out = tmp_path / "mixed.csv"
    assert main(["replay", str(directory), str(notes), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 1
    errors = read_replay_table(f"{out}.errors.csv").set_index("checkpoint")["error"]
    expected_reasons = {
        "z_NIN00000_t_t_t_t_t_DIGITS_epoch_1.pth.tar": "not a readable torch file",
        "z_NIN00000_c_c_c_c_c_DIGITS_epoch_1.pth.tar": "not a readable torch file",
        "z_NIN00000_f_f_f_f_f_DIGITS_epoch_1.pth.tar": "not a readable torch file",
        "z_NIN00000_m_m_m_m_m_DIGITS_epoch_1.pth.tar": "missing key 'performance_statistics'",
        "z_NIN00000_e_e_e_e_e_DIGITS_epoch_2.pth.tar": "no 'test_acc1_epoch_2'",
        "not_a_state_dict.pt": "not a state dict",
        "weights.pth.tar": "not a GenProb file name",
    }
    assert sorted(Path(p).name for p in errors.index) == sorted([*expected_reasons, "notes.txt"])
    for path, reason in errors.items():
        name = Path(path).name
        assert expected_reasons.get(name, "unsupported file type") in reason, (name, reason)
    stderr = capsys.readouterr().err
    assert all(name in stderr for name in expected_reasons)

    table = read_replay_table(out)
    clean = read_replay_table(replayed)
    assert table["checkpoint"].map(lambda p: Path(p).name).tolist() == clean["checkpoint"].map(lambda p: Path(p).name).tolist()
    pd.testing.assert_frame_equal(table.drop(columns="checkpoint"), clean.drop(columns="checkpoint"), check_exact=True)


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_table(zoo, replayed, tmp_path):
    out = tmp_path / "resumed.csv"
    parts = Path(f"{out}.parts")
    command = [sys.executable, "-m", "lightning_probes", "replay", str(zoo), "--out", str(out),
               "--format", "genprob", "--no-progress", "--threads", "1"]
    process = subprocess.Popen(command, env=python_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    committed = []
    deadline = time.monotonic() + 120
    while not committed and time.monotonic() < deadline and process.poll() is None:
        committed = [p for p in parts.glob("*.csv") if not p.name.endswith(".genprob.csv")] if parts.exists() else []
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the replay finished before it could be killed"
    done_at_kill = [p for p in parts.glob("*.csv") if not p.name.endswith(".genprob.csv")]
    assert 1 <= len(done_at_kill) < 6 and not out.exists()

    rerun = subprocess.run(command, env=python_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_bytes() == replayed.read_bytes()
    assert genprob_csv_path(out).read_bytes() == genprob_csv_path(replayed).read_bytes()
    assert not list(parts.glob("*.tmp"))


def test_torchrun_two_processes_equal_one(zoo, replayed, tmp_path):
    out = tmp_path / "distributed.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lightning_probes", "replay", str(zoo), "--out", str(out), "--format", "genprob",
               "--no-progress", "--threads", "1", "--tensorboard", str(tmp_path / "tensorboard")]
    result = subprocess.run(command, env=python_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() == replayed.read_bytes()
    assert genprob_csv_path(out).read_bytes() == genprob_csv_path(replayed).read_bytes()
    assert read_replay_table(f"{out}.errors.csv").empty
    # one TensorBoard run per model, step = epoch, the same scalars whichever rank wrote them
    runs = sorted(path.name for path in (tmp_path / "tensorboard").iterdir())
    assert runs == sorted(read_replay_table(out)["model_id"].unique())
    for run in runs:
        single = read_scalars(str(replayed.parent / "tensorboard" / run))
        distributed = read_scalars(str(tmp_path / "tensorboard" / run))
        assert sorted(single) == sorted(distributed) and "probe/SQ_AE_p" in single
        for tag, values in single.items():
            assert [step for step, _ in values] == [1, 2, 3], tag
            if tag != "probe/time_ms":
                assert distributed[tag] == values, tag


def test_lightning_ckpt_replay_and_tensorboard_tags_equal_the_callbacks(tmp_path):
    torch.manual_seed(0)
    train, val = digits_loaders()
    online = tmp_path / "online"
    checkpoints = tmp_path / "run7" / "checkpoints"  # Lightning's layout: the model id is run7
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(online), name="run"),
        callbacks=[ProbeCallback(), ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(classifier_class(pl)(), train, val)
    ckpts = sorted(checkpoints.glob("*.ckpt"))
    assert len(ckpts) == 2

    offline = tmp_path / "offline"
    out = tmp_path / "ckpt.csv"
    assert main(["replay", str(checkpoints), "--out", str(out), "--tensorboard", str(offline),
                 "--no-progress", "--threads", "1"]) == 0
    table = read_replay_table(out)
    for path in ckpts:
        saved = torch.load(path, weights_only=False)
        rows = table[table["checkpoint"] == str(path)].reset_index(drop=True)
        expected = probe(saved["state_dict"]).layers
        pd.testing.assert_frame_equal(rows[expected.columns], expected, check_exact=True, check_dtype=False)
        assert (rows["step"] == saved["global_step"]).all() and (rows["epoch"] == saved["epoch"]).all()
        assert (rows["model_id"] == "run7").all() and rows["test_acc"].isna().all()

    def probe_scalars(directory):
        return {tag: values for tag, values in read_scalars(str(directory)).items()
                if tag.startswith("probe") and tag != "probe/time_ms"}

    online_scalars, offline_scalars = probe_scalars(online), probe_scalars(offline / "run7")
    assert "probe/time_ms" in read_scalars(str(offline / "run7"))
    assert any(tag.startswith("probe.SQ_AE/") for tag in online_scalars)
    assert "probe/SQ_AE_p" in online_scalars
    assert sorted(offline_scalars) == sorted(online_scalars)
    for tag, values in online_scalars.items():
        steps = [step for step, _ in values]
        assert steps == [int(torch.load(p, weights_only=False)["global_step"]) for p in ckpts], tag
        np.testing.assert_array_equal(np.array(offline_scalars[tag]), np.array(values), err_msg=tag)


@pytest.mark.parametrize("command, options", [
    ("replay", ["--out", "--tensorboard", "--layers", "--no-evbmf", "--format", "--device", "--threads",
                "--no-progress", "errors.csv", "torchrun"]),
    ("generate", ["--quick", "--codes", "--optimizers", "--lr-scales", "--batch-sizes", "--weight-decays",
                  "--seeds", "--epochs", "--train-fraction", "--prefix", "--jobs", "--threads"]),
])
def test_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option
