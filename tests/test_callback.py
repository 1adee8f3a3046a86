"""ProbeCallback in real Trainer runs, read back the way users read it: TensorBoard event files,
``trainer.callback_metrics``, EarlyStopping / ModelCheckpoint decisions, checkpoints."""
from __future__ import annotations

import copy
import doctest
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2

import lightning_probes.lightning
import lightning_probes.pytorch_lightning
from callback_support import classifier_class, digits_loaders, read_events, read_scalars
from lightning_probes import HEADLINE_AGGREGATES, probe
from lightning_probes._callback_core import AGGREGATE_KEYS, log_probe_result
from lightning_probes.probe import AGGREGATE_MEASURES, ProbeWarning
from lightning_probes.pytorch_lightning import ProbeCallback

Classifier = classifier_class(pl)
TRAIN_BATCHES = 6  # digits_loaders(): 192 training images in batches of 32


def make_trainer(tmp_path, callbacks, logger=None, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=2, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    options.update(kwargs)
    if logger is None:
        logger = TensorBoardLogger(tmp_path, name="tb")
    return pl.Trainer(callbacks=callbacks, logger=logger, **options)


class WeightsAtProbe(pl.Callback):
    """Placed after ProbeCallback: copies the weights at each step the probe just ran."""

    def __init__(self, probes: ProbeCallback):
        self.probes = probes
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer, pl_module):
        step = trainer.global_step
        if self.probes.state_dict()["last_probe_step"] == step and step not in self.weights:
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    on_validation_epoch_end = _record
    on_train_epoch_end = _record


def assert_close(logged: float, expected: float) -> None:
    """TensorBoard stores float32."""
    if math.isnan(expected):
        assert math.isnan(logged)
    else:
        assert logged == pytest.approx(expected, rel=1e-6, abs=1e-30)


def expected_layer_scalars(result) -> dict[str, float]:
    scalars = {}
    for row in result.layers.to_dict("records"):
        layer = row["layer"].removesuffix(".weight")
        for measure, column in {**AGGREGATE_MEASURES, "rank": "rank"}.items():
            for variant in ("BE", "AE"):
                if measure == "rank" and variant == "BE":
                    continue
                for side in ("in", "out"):
                    value = row[f"{side}_{column}_{variant}"]
                    scalars[f"probe.{measure}_{variant}/{layer}/{side}"] = np.nan if pd.isna(value) else float(value)
    return scalars


def test_tensorboard_events_hold_probe_of_the_weights_at_each_step(tmp_path):
    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = ProbeCallback(log_spectra=True)
    weights = WeightsAtProbe(probes)
    trainer = make_trainer(tmp_path, [probes, weights], val_check_interval=0.5)
    model = Classifier()
    trainer.fit(model, train, val)

    # Validation at half and end of each epoch; the epoch-end probe is not repeated.
    steps = [3, 6, 9, 12]
    assert sorted(weights.weights) == steps
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["probe/time_ms"]] == steps
    assert all(v > 0 for _, v in scalars["probe/time_ms"])
    for step in steps:
        names = list(probes.last_result.layers["layer"])
        expected = probe({n: weights.weights[step][n] for n in names}, layers=names, keep_spectra=True)
        for tag, value in expected_layer_scalars(expected).items():
            assert_close(dict(scalars[tag])[step], value)
        for key in HEADLINE_AGGREGATES:
            assert_close(dict(scalars[f"probe/{key}"])[step], expected.aggregates[key])
            assert math.isfinite(expected.aggregates[key])
    # The spiked weights keep EVBMF components: AE values are not all zero.
    assert dict(scalars["probe/SQ_AE_p"])[12] > 0
    assert set(expected_layer_scalars(expected)) | {f"probe/{k}" for k in HEADLINE_AGGREGATES} | {
        "probe/time_ms"} == {tag for tag in scalars if tag.startswith("probe")}
    # What monitors see is the last probe.
    for key in HEADLINE_AGGREGATES:
        assert trainer.callback_metrics[f"probe/{key}"].item() == pytest.approx(expected.aggregates[key], rel=1e-6)

    (events,) = read_events(trainer.logger.log_dir)
    histogram = events.Histograms("probe.spectrum/net.2/out")
    assert [h.step for h in histogram] == steps
    spectrum = expected.spectra["net.2.weight"][1]
    assert histogram[-1].histogram_value.num == spectrum.numel()
    assert histogram[-1].histogram_value.max == pytest.approx(spectrum.max().item())
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {category.title: category for category in layout.category}
    assert set(categories) == {f"probe.{m}" for m in AGGREGATE_MEASURES}
    chart = categories["probe.SQ"].chart[0]
    assert chart.title == "SQ_BE in"
    assert list(chart.multiline.tag) == [r"probe\.SQ_BE/.*/in$"]


def test_validate_after_fit_reports_the_probe_without_a_second_one(tmp_path):
    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = ProbeCallback()
    trainer = make_trainer(tmp_path, [probes], max_epochs=1)
    model = Classifier()
    trainer.fit(model, train, val)
    last = dict(probes.last_result.aggregates)
    trainer.validate(model, val, verbose=False)
    assert trainer.callback_metrics["probe/SQ_AE_p"].item() == pytest.approx(last["SQ_AE_p"], rel=1e-6)
    assert [s for s, _ in read_scalars(trainer.logger.log_dir)["probe/time_ms"]] == [TRAIN_BATCHES]


@pytest.mark.parametrize(
    "schedule, probe_steps, stopped_epoch",
    [
        # Validation twice per epoch: EarlyStopping checks at each validation end.
        (dict(val_check_interval=0.5), [3, 6], 0),
        # Validation every other epoch: the epochs without one are probed at their end.
        (dict(check_val_every_n_epoch=2), [6, 12, 18, 24], 3),
    ],
)
def test_early_stopping_and_checkpoint_on_probe_keys(tmp_path, schedule, probe_steps, stopped_epoch):
    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = ProbeCallback()
    # An improvement of 1.0 radian in SQ never happens: stops at the second check.
    stopping = EarlyStopping("probe/SQ_BE_p", mode="max", min_delta=1.0, patience=1)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="probe/E_BE_L2", mode="min",
        filename="step{step}-E{probe/E_BE_L2:.6f}", auto_insert_metric_name=False,
    )
    trainer = make_trainer(tmp_path, [probes, stopping, checkpoint], max_epochs=8,
                           enable_checkpointing=True, **schedule)
    trainer.fit(Classifier(), train, val)

    assert stopping.stopped_epoch == stopped_epoch
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["probe/E_BE_L2"]] == probe_steps
    checked = scalars["probe/E_BE_L2"] if "val_check_interval" in schedule else scalars["probe/E_BE_L2"][1::2]
    best_step, best = min(checked, key=lambda item: item[1])
    assert checkpoint.best_model_score.item() == pytest.approx(best, rel=1e-6)
    assert f"step{best_step}-E" in checkpoint.best_model_path


def test_lightning_package_flavour(tmp_path):
    import lightning.pytorch as lp

    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = lightning_probes.lightning.ProbeCallback(aggregates=["SQ_AE_p", "C_BE_wL1"])
    stopping = lp.callbacks.EarlyStopping("probe/C_BE_wL1", mode="min")
    trainer = lp.Trainer(
        max_epochs=2, callbacks=[probes, stopping], logger=lp.loggers.TensorBoardLogger(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    model = classifier_class(lp)()
    trainer.fit(model, train, val)
    scalars = read_scalars(trainer.logger.log_dir)
    names = list(probes.last_result.layers["layer"])
    expected = probe({n: p for n, p in model.named_parameters() if n in names}, layers=names)
    assert [s for s, _ in scalars["probe/C_BE_wL1"]] == [6, 12]
    assert_close(dict(scalars["probe/C_BE_wL1"])[12], expected.aggregates["C_BE_wL1"])
    assert_close(dict(scalars["probe.SQ_AE/net.7/out"])[12], expected.layers["out_SQ_AE"].iloc[-1])
    assert set(trainer.callback_metrics) >= {"probe/SQ_AE_p", "probe/C_BE_wL1"}


@pytest.mark.parametrize(
    "code, flavours",
    [
        # Neither package imported: pytorch_lightning (the one lightning-probes depends on).
        ("", ["lightning_probes.pytorch_lightning"]),
        # The name follows what is imported when it is looked up; both: pytorch_lightning.
        ("import lightning\nshow()\nimport pytorch_lightning\nshow()",
         ["lightning_probes.lightning", "lightning_probes.pytorch_lightning"]),
    ],
)
def test_top_level_name_follows_the_imported_package(code, flavours):
    script = "import lightning_probes\ndef show(): print(lightning_probes.ProbeCallback.__module__)\n"
    script += code or "show()"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == flavours


@pytest.mark.parametrize("logger_kind", ["none", "csv"])
def test_without_tensorboard_metrics_reach_monitors(tmp_path, logger_kind):
    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = ProbeCallback()
    stopping = EarlyStopping("probe/SQ_AE_p", mode="max", patience=5)
    logger = False if logger_kind == "none" else CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [probes, stopping], logger=logger, max_epochs=1)
    # Random weights keep no EVBMF component: the AE aggregates are 0.0, not NaN.
    trainer.fit(Classifier(spiked=False), train, val)
    assert trainer.callback_metrics["probe/SQ_AE_p"].item() == 0.0
    assert trainer.callback_metrics["probe/SQ_BE_p"].item() > 0
    assert stopping.best_score.item() == 0.0
    if logger_kind == "csv":
        table = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
        row = table.dropna(subset=["probe/time_ms"]).iloc[0]
        assert row["step"] == TRAIN_BATCHES
        assert row["probe.SQ_BE/net.2/in"] == pytest.approx(probes.last_result.layers["in_SQ_BE"].iloc[1])
        assert row["probe/SQ_AE_p"] == 0.0


class NaNLayerClassifier(Classifier):
    """A layer that forward never uses holds a NaN: training itself is unaffected."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.unused.weight[0, 0] = float("nan")


def test_nan_in_one_layer_warns_once_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    train, val = digits_loaders()
    probes = ProbeCallback()
    trainer = make_trainer(tmp_path, [probes], max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NaNLayerClassifier(), train, val)
    probe_warnings = [w for w in caught if issubclass(w.category, ProbeWarning)]
    assert len(probe_warnings) == 1
    assert "'unused.weight'" in str(probe_warnings[0].message)
    assert trainer.current_epoch == 3
    assert all(math.isfinite(v.item()) for k, v in trainer.callback_metrics.items() if k.startswith("probe/"))
    scalars = read_scalars(trainer.logger.log_dir)
    assert [s for s, _ in scalars["probe.SQ_BE/unused/in"]] == [6, 12, 18]
    assert all(math.isnan(v) for _, v in scalars["probe.SQ_BE/unused/in"])
    assert all(math.isfinite(v) for _, v in scalars["probe.SQ_BE/net.2/in"])


def training_state(trainer, pl_module) -> dict:
    """Everything training depends on that a probe could touch."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for n, p in pl_module.named_parameters()},
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "rng": torch.get_rng_state(),
        "modes": [m.training for m in pl_module.modules()],
        "threads": torch.get_num_threads(),
    }


class StateBefore(pl.Callback):
    def _take(self, trainer, pl_module):
        self.state = training_state(trainer, pl_module)

    on_validation_epoch_end = on_train_epoch_end = _take


class StateUnchanged(pl.Callback):
    def __init__(self, before: StateBefore):
        self.before = before
        self.compared = 0

    def _compare(self, trainer, pl_module):
        before, after = self.before.state, training_state(trainer, pl_module)
        for name, (value, requires_grad, grad) in before["params"].items():
            now_value, now_requires_grad, now_grad = after["params"][name]
            assert torch.equal(value, now_value) and requires_grad == now_requires_grad
            assert (grad is None and now_grad is None) or torch.equal(grad, now_grad)
        assert str(before["optimizer"]) == str(after["optimizer"])
        assert torch.equal(before["rng"], after["rng"])
        assert before["modes"] == after["modes"] and before["threads"] == after["threads"]
        self.compared += 1

    on_validation_epoch_end = on_train_epoch_end = _compare


def test_probe_leaves_training_untouched(tmp_path):
    def fit(callbacks):
        torch.manual_seed(0)
        train, val = digits_loaders()
        model = Classifier(dropout=0.5)
        trainer = make_trainer(tmp_path, callbacks, logger=False, max_epochs=3, check_val_every_n_epoch=2)
        trainer.fit(model, train, val)
        return model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()

    before = StateBefore()
    unchanged = StateUnchanged(before)
    probes = ProbeCallback(num_threads=1)
    probed = fit([before, probes, unchanged])
    # sanity check, 3 train epoch ends, the validation of epoch 1; probes at 3 of them
    assert unchanged.compared == 5 and probes.state_dict()["last_probe_step"] == 3 * TRAIN_BATCHES
    plain = fit([])
    for name, value in plain[0].items():
        assert torch.equal(value, probed[0][name]), name
    assert str(plain[1]) == str(probed[1])
    assert torch.equal(plain[2], probed[2])


def test_every_n_epochs(tmp_path):
    torch.manual_seed(0)
    train, val = digits_loaders()
    trainer = make_trainer(tmp_path, [ProbeCallback(every_n_epochs=2)], max_epochs=4)
    trainer.fit(Classifier(), train, val)
    assert [s for s, _ in read_scalars(trainer.logger.log_dir)["probe/SQ_AE_p"]] == [12, 24]


def test_resume_from_checkpoint_continues_the_probe_steps(tmp_path):
    def fit(max_epochs, version, ckpt_path=None):
        torch.manual_seed(0)
        train, val = digits_loaders()
        probes = ProbeCallback(every_n_epochs=1)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt{version}", save_last=True)
        trainer = make_trainer(tmp_path, [probes, checkpoint], max_epochs=max_epochs, enable_checkpointing=True,
                               check_val_every_n_epoch=2, logger=TensorBoardLogger(tmp_path, name="tb", version=version))
        trainer.fit(Classifier(), train, val, ckpt_path=ckpt_path)
        return probes, checkpoint, read_scalars(trainer.logger.log_dir)

    _, _, straight = fit(4, "straight")
    probes, checkpoint, _ = fit(2, "resumed")  # saved at the validation end of epoch 1
    state = torch.load(checkpoint.last_model_path, weights_only=False)["callbacks"][probes.state_key]
    assert state["last_probe_step"] == 2 * TRAIN_BATCHES
    _, _, resumed = fit(4, "resumed", ckpt_path=checkpoint.last_model_path)
    for tag in ("probe/time_ms", "probe/SQ_BE_p", "probe.SQ_BE/net.0/in"):
        assert [s for s, _ in resumed[tag]] == [6, 12, 18, 24]
    for tag in ("probe/SQ_BE_p", "probe.F_AE/net.7/out"):
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in straight[tag]], rel=1e-5)


def test_state_key_is_built_from_the_options():
    assert ProbeCallback().state_key == ProbeCallback(every_n_epochs=1).state_key
    keys = {
        ProbeCallback().state_key,
        ProbeCallback(evbmf=False).state_key,
        ProbeCallback(every_n_epochs=3).state_key,
        ProbeCallback(layers="genprob").state_key,
        ProbeCallback(layers=["net.0.weight"]).state_key,
        ProbeCallback(aggregates=["SR_BE_L1"]).state_key,
    }
    assert len(keys) == 6
    # Stable across processes: no object addresses.
    assert "0x" not in ProbeCallback(layers=lambda name, tensor: True).state_key


@pytest.mark.parametrize(
    "options, argument",
    [
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(every_n_epochs=1.5), "every_n_epochs"),
        (dict(evbmf="yes"), "evbmf"),
        (dict(log_layers=None), "log_layers"),
        (dict(log_spectra=1), "log_spectra"),
        (dict(layers="convs"), "layers"),
        (dict(layers=3), "layers"),
        (dict(aggregates=["SQ_AE_q"]), "aggregates"),
        (dict(aggregates="SQ_AE_p"), "aggregates"),
        (dict(evbmf=False, aggregates=["SQ_AE_p"]), "aggregates"),
        (dict(num_threads=0), "num_threads"),
        (dict(device="gpu:x"), "device"),
    ],
)
def test_bad_options_name_the_argument(options, argument):
    with pytest.raises((ValueError, TypeError), match=rf"ProbeCallback\({argument}="):
        ProbeCallback(**options)


def test_defaults_are_the_headline_aggregates():
    assert ProbeCallback().aggregates == HEADLINE_AGGREGATES
    assert ProbeCallback(evbmf=False).aggregates == [k for k in HEADLINE_AGGREGATES if "_BE_" in k]
    assert set(HEADLINE_AGGREGATES) <= set(AGGREGATE_KEYS) and len(AGGREGATE_KEYS) == 60


def test_log_probe_result_writes_the_callback_tags_offline(tmp_path):
    from callback_support import small_cnn

    result = probe(small_cnn(), keep_spectra=True)
    logger = TensorBoardLogger(tmp_path, name="offline")
    log_probe_result(logger, result, step=7, log_spectra=True, include_aggregates=True,
                     aggregate_keys=["SQ_AE_p", "SR_BE_wp"])
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    assert scalars["probe/SR_BE_wp"] == [(7, pytest.approx(result.aggregates["SR_BE_wp"], rel=1e-6))]
    assert "probe/E_BE_L2" not in scalars
    for tag, value in expected_layer_scalars(result).items():
        (step, logged), = scalars[tag]
        assert step == 7
        assert_close(logged, value)
    (events,) = read_events(logger.log_dir)
    assert len(events.Tags()["histograms"]) == 2 * len(result.layers)


@pytest.mark.parametrize("module", [lightning_probes.pytorch_lightning, lightning_probes.lightning])
def test_docstring_example_runs(module):
    assert doctest.testmod(module, raise_on_error=True).attempted >= 5


def test_log_probe_result_honours_a_tensorboard_prefix(tmp_path):
    from callback_support import small_cnn

    result = probe(small_cnn())
    logger = TensorBoardLogger(tmp_path, name="prefixed", prefix="run")
    log_probe_result(logger, result, step=3, include_aggregates=True)
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    assert scalars["run-probe/SQ_AE_p"] == [(3, pytest.approx(result.aggregates["SQ_AE_p"], rel=1e-6))]
    assert_close(scalars["run-probe.E_BE/2/out"][0][1], result.layers["out_ER_BE"].iloc[1])
