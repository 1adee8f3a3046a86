"""Issue 5: correlation analysis, granulated Kendall, CMI, early prediction, figures, CLI."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from lightning_probes import TABLE_COLUMNS, probe
from lightning_probes.analysis import (
    checkpoint_measures,
    conditional_mutual_information,
    correlation,
    correlation_table,
    early_prediction,
    first_epochs_reaching,
    granulated_kendall,
    grid_tables,
    kendall_null_halfwidth,
    kendall_tau_interval,
    measure_columns,
    model_hyperparameters,
    nin_parameter_count,
    kendall_tau_of_samples,
    with_hyperparameters,
)
from lightning_probes.cli import main

NUMERIC_COLUMNS = [c for c in TABLE_COLUMNS if c != "layer"]


def model_id(channels="00000", optimizer="sgd", lr="0.1", batch_size="32", weight_decay="0", seed="1"):
    return f"zoo_NIN{channels}_{optimizer}_{lr}_{batch_size}_{weight_decay}_{seed}_DIGITS"


def replay_rows(checkpoints: list[dict], layers: int = 2) -> pd.DataFrame:
    """A replay table: ``layers`` identical rows per checkpoint; every per-matrix value 1 except
    SQ (= ``sq``), Frobenius (= ``fro``) and spectral norm (= ``spec``) when given."""
    rows = []
    for checkpoint in checkpoints:
        values = dict.fromkeys(NUMERIC_COLUMNS, 1.0)
        for key, measure in (("sq", "SQ"), ("fro", "fro"), ("spec", "spec")):
            if key in checkpoint:
                values.update({f"{side}_{measure}_{variant}": checkpoint[key]
                               for side in ("in", "out") for variant in ("BE", "AE")})
        performance = {k: checkpoint[k] for k in ("model_id", "epoch", "test_acc", "train_acc")}
        performance.update(test_loss=1 - checkpoint["test_acc"], train_loss=1 - checkpoint["train_acc"],
                           gap=checkpoint["test_acc"] - checkpoint["train_acc"])
        rows += [{"layer": f"l{i}.weight", **values, **performance} for i in range(layers)]
    return pd.DataFrame(rows)


def planted_zoo(epochs: int = 4, seed: int = 0) -> pd.DataFrame:
    """2 widths x 2 optimizers x 3 learning rates (12 models). SQ tracks the final test accuracy
    from epoch 1 on (noise at epoch 0); the Frobenius norm grows with width only; test accuracy
    rises with width, lr and epoch; the spectral norm is noise."""
    rng = np.random.default_rng(seed)
    checkpoints = []
    grid = itertools.product(("00000", "11111"), ("sgd", "adam"), ("0.1", "0.01", "0.001"))
    for k, (channels, optimizer, lr) in enumerate(grid):
        final_acc = 0.5 + 0.2 * (channels == "11111") + 0.05 * -math.log10(float(lr)) + 0.01 * k
        for epoch in range(epochs):
            acc = final_acc * (epoch + 1) / epochs
            checkpoints.append({
                "model_id": model_id(channels, optimizer, lr), "epoch": epoch,
                "test_acc": acc, "train_acc": min(1.0, acc + 0.1),
                "sq": 1 + final_acc if epoch else 1 + rng.random(),
                "fro": 2.0 + (channels == "11111"), "spec": 1 + rng.random(),
            })
    return replay_rows(checkpoints)


# --------------------------------------------------------------------------- coefficients
def test_coefficients_equal_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    y[3] = y[4]  # a tie
    result = correlation(x, y)
    kendall = stats.kendalltau(x, y)
    assert result.n == 30
    assert result.kendall_tau == pytest.approx(kendall.statistic, abs=1e-15)
    assert result.kendall_p == pytest.approx(kendall.pvalue, abs=1e-15)
    assert result.spearman == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-15)
    assert result.pearson == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-15)


def test_non_finite_pairs_dropped_and_degenerate_inputs_are_nan():
    assert correlation([1, 2, np.inf, 4, np.nan], [1, 3, 2, 4, 5]).n == 3
    assert np.isnan(correlation([1, 1, 1, 1], [1, 2, 3, 4]).kendall_tau)
    assert np.isnan(correlation([1, 2], [1, 2]).spearman)


def test_resampled_tau_equals_scipy_on_each_resample():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, size=12).astype(float)  # ties in x
    y = x + rng.normal(size=12)
    counts = rng.multinomial(12, np.full(12, 1 / 12), size=20)
    taus = kendall_tau_of_samples(x, y, counts)
    for row, tau in zip(counts, taus):
        expected = stats.kendalltau(np.repeat(x, row), np.repeat(y, row)).statistic
        assert tau == pytest.approx(expected, abs=1e-12) or (np.isnan(tau) and np.isnan(expected))


def test_tau_interval_deterministic_and_brackets_estimate():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    first = kendall_tau_interval(x, y, seed=7)
    assert first == kendall_tau_interval(x, y, seed=7)
    assert first.low < correlation(x, y).kendall_tau < first.high
    assert first.low > 0  # a planted relation


def test_noise_floor_matches_simulation():
    rng = np.random.default_rng(4)
    taus = [stats.kendalltau(rng.normal(size=48), rng.normal(size=48)).statistic for _ in range(2000)]
    assert np.quantile(np.abs(taus), 0.95) == pytest.approx(kendall_null_halfwidth(48), rel=0.08)


# --------------------------------------------------------------------------- measures table
def test_aggregates_from_rows_equal_probe_aggregates():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 3),
                              torch.nn.Flatten(), torch.nn.Linear(24, 10))
    result = probe(net)
    rows = result.layers.assign(model_id="m", epoch=3, test_acc=0.7, test_loss=0.9, train_acc=0.8,
                                train_loss=0.5, gap=-0.1)
    measures = checkpoint_measures(pd.concat([rows, rows.assign(epoch=4)]))
    assert len(measures) == 2
    for key, value in result.aggregates.items():
        assert measures.loc[0, key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    weights = [m.weight.detach().double() for m in net if hasattr(m, "weight")]
    assert measures.loc[0, "sum_log_fro"] == pytest.approx(sum(math.log(w.norm()) for w in weights))
    assert measures.loc[0, "sum_log_spec"] == pytest.approx(
        sum(math.log(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2)) for w in weights))


def test_baselines_from_optional_columns():
    rows = replay_rows([{"model_id": "m", "epoch": 1, "test_acc": 0.5, "train_acc": 0.6}], layers=2)
    rows = rows.assign(n_params=[10, 20], dist_init=[3.0, 4.0])
    measures = checkpoint_measures(rows)
    assert measures.loc[0, "param_count"] == 30
    assert measures.loc[0, "dist_init"] == pytest.approx(5.0)
    assert measure_columns(measures)[-2:] == ["param_count", "dist_init"]


def test_genprob_ids_give_hyperparameters_and_parameter_count():
    assert model_hyperparameters(model_id("01234", "adam", "0.001", "64", "0.0005", "3")) == {
        "channels": "01234", "optimizer": "adam", "lr": "0.001", "batch_size": "64",
        "weight_decay": "0.0005", "seed": "3", "dataset": "DIGITS"}
    assert model_hyperparameters("my_resnet") is None
    measures = with_hyperparameters(checkpoint_measures(planted_zoo(epochs=1)))
    assert set(measures["stratum"]) == {"NIN00000", "NIN11111"}
    wide = measures["channels"] == "11111"
    assert (measures.loc[wide, "param_count"] == nin_parameter_count("11111")).all()
    assert nin_parameter_count("11111") > nin_parameter_count("00000")


def test_planted_relations_found():
    measures = with_hyperparameters(checkpoint_measures(planted_zoo()))
    table = correlation_table(measures, ["SQ_BE_p", "SQ_AE_L2", "S_BE_p", "F_BE_p"], ["test_acc"],
                              n_resamples=200)
    final = table[table["epoch"] == 3].set_index("measure")
    assert final.loc["SQ_BE_p", "kendall_tau"] == pytest.approx(1.0)
    assert final.loc["SQ_AE_L2", "spearman"] == pytest.approx(1.0)
    noise = final.loc["S_BE_p"]
    assert noise["tau_ci_low"] < noise["kendall_tau"] < noise["tau_ci_high"]
    assert final.loc["SQ_BE_p", "tau_ci_low"] == pytest.approx(1.0)
    assert final.loc["F_BE_p", "kendall_tau"] > 0.5  # width confound, pooled
    # within one width the Frobenius norm is constant: no ranking at all
    strata = correlation_table(measures, ["F_BE_p", "SQ_BE_p"], ["test_acc"], ("stratum", "epoch"), 0)
    within = strata[strata["epoch"] == 3].set_index(["stratum", "measure"])
    assert within.loc[("NIN00000", "F_BE_p"), "n"] == 6
    assert np.isnan(within.loc[("NIN00000", "F_BE_p"), "kendall_tau"])
    assert within.loc[("NIN11111", "SQ_BE_p"), "kendall_tau"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- grid measures
TINY_GRID = pd.DataFrame({"a": [0, 0, 1, 1], "b": [0, 1, 0, 1], "m": [2.0, 1, 3, 4], "acc": [1.0, 2, 3, 4]})


def test_granulated_kendall_hand_computed():
    # a varies within b=0: models (y1, m2), (y3, m3): tau 1; within b=1: (y2, m1), (y4, m4): tau 1.
    # b varies within a=0: (y1, m2), (y2, m1): tau -1; within a=1: (y3, m3), (y4, m4): tau 1.
    result = granulated_kendall(TINY_GRID, "m", "acc", ["a", "b"])
    assert result.psi == {"a": 1.0, "b": 0.0}
    assert result.mean == 0.5
    assert result.n_groups == {"a": 2, "b": 2}
    # three values of c: tau over 3 models; a fixed seed axis splits the groups
    grid = pd.DataFrame({"c": [0, 1, 2] * 2, "seed": [1, 1, 1, 2, 2, 2],
                         "m": [1.0, 3, 2, 1, 2, 3], "acc": [1.0, 2, 3, 1, 2, 3]})
    result = granulated_kendall(grid, "m", "acc", ["c"], fixed=["seed"])
    assert result.psi["c"] == pytest.approx((1 / 3 + 1) / 2)
    assert result.n_groups["c"] == 2


def test_granulated_kendall_equals_scipy_per_group_on_incomplete_grid():
    rng = np.random.default_rng(5)
    grid = pd.DataFrame(list(itertools.product(range(3), range(2), range(4))), columns=["a", "b", "c"])
    grid = grid.drop(index=[0, 5, 17]).assign(m=lambda g: rng.normal(size=len(g)),
                                              acc=lambda g: rng.normal(size=len(g)))
    grid.loc[grid.index[3], "m"] = np.nan
    result = granulated_kendall(grid, "m", "acc", ["a", "b", "c"])
    for axis in ("a", "b", "c"):
        others = [k for k in ("a", "b", "c") if k != axis]
        taus = [stats.kendalltau(g["m"], g["acc"]).statistic
                for _, g in grid.dropna().groupby(others) if len(g) > 1]
        assert result.psi[axis] == pytest.approx(np.mean(taus), abs=1e-12)
        assert result.n_groups[axis] == len(taus)


def test_conditional_mutual_information_hand_computed():
    result = conditional_mutual_information(TINY_GRID, "m", "acc", ["a", "b"])
    # no conditioning: 12 ordered pairs, 10 concordant, 2 discordant; H(V_t) = 1 bit
    unconditioned = 5 / 6 * math.log2(5 / 3) - 1 / 6 * math.log2(3)
    assert result.per_set[()] == pytest.approx(unconditioned)
    # given a: strata (0,0) and (1,1) hold 2 pairs each, perfectly (anti-)aligned: I = H = 1;
    # strata (0,1), (1,0) hold 4 pairs each with a fixed target order: I = H = 0
    assert result.per_set[("a",)] == pytest.approx(1.0)
    # given b: strata (0,0), (1,1): I = H = 1; strata (0,1), (1,0): 4 pairs with
    # p(t=0,m=0)=1/2, p(t=0,m=1)=1/4, p(t=1,m=1)=1/4
    mutual = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    entropy = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert result.per_set[("b",)] == pytest.approx((1 / 3 + 2 / 3 * mutual) / (1 / 3 + 2 / 3 * entropy))
    # given a and b every stratum is one pair: H = 0, undefined, skipped
    assert np.isnan(result.per_set[("a", "b")])
    assert result.value == pytest.approx(unconditioned)
    assert result.conditioning == ()


def test_conditional_mutual_information_constant_measure_and_incomplete_grid():
    constant = conditional_mutual_information(TINY_GRID.assign(m=1.0), "m", "acc", ["a", "b"])
    assert constant.value == 0.0
    incomplete = conditional_mutual_information(TINY_GRID.iloc[:3], "m", "acc", ["a", "b"])
    assert np.isfinite(incomplete.value)
    perfect = conditional_mutual_information(TINY_GRID.assign(m=TINY_GRID["acc"]), "m", "acc", ["a", "b"])
    assert perfect.value == pytest.approx(1.0)


def test_grid_tables_long_format():
    measures = with_hyperparameters(checkpoint_measures(planted_zoo(epochs=2)))
    granulated, cmi = grid_tables(measures, ["SQ_BE_p"], ["test_acc"])
    # the seed and batch size never vary here: only three axes
    assert sorted(set(granulated["hyperparameter"])) == ["channels", "lr", "mean", "optimizer"]
    final = granulated[granulated["epoch"] == 1].set_index("hyperparameter")
    assert final.loc["mean", "psi"] == pytest.approx(1.0)
    assert cmi.loc[cmi["epoch"] == 1, "cmi"].item() == pytest.approx(1.0)


def test_nested_learning_rate_is_crossed():
    # lr = optimizer base rate x scale: every lr value belongs to one optimizer
    rows = []
    for optimizer, base in (("adam", 0.001), ("sgd", 0.02)):
        for scale, decay in itertools.product((0.5, 1.0), ("0", "0.0005")):
            acc = 0.5 + 0.1 * (optimizer == "sgd") + 0.05 * scale + 0.01 * (decay == "0")
            identity = model_id(optimizer=optimizer, lr=f"{base * scale:g}", weight_decay=decay)
            rows.append({"model_id": identity, "epoch": 1, "test_acc": acc, "train_acc": 1.0, "sq": acc})
    measures = with_hyperparameters(checkpoint_measures(replay_rows(rows)))
    granulated, _ = grid_tables(measures, ["SQ_BE_p"], ["test_acc"])
    psi = granulated.set_index("hyperparameter")
    assert list(psi.index) == ["optimizer", "lr_within_optimizer", "weight_decay", "mean"]
    assert (psi["psi"] == 1.0).all()
    assert psi.loc["optimizer", "n_groups"] == 4


# --------------------------------------------------------------------------- early prediction
def test_early_prediction_first_epochs():
    measures = checkpoint_measures(planted_zoo())
    early = early_prediction(measures, ["SQ_BE_p", "S_BE_p", "test_acc"])
    sq = early[early["measure"] == "SQ_BE_p"].set_index("epoch")
    assert sq.loc[1, "kendall_tau"] == pytest.approx(1.0)
    assert sq.loc[3, "n"] == 12
    summary = first_epochs_reaching(early).set_index("measure")
    assert summary.loc["SQ_BE_p", "first_epoch_tau_0.5"] == 1.0
    assert summary.loc["test_acc", "first_epoch_tau_0.7"] == 0.0  # planted: acc ranks from the start
    assert summary.loc["test_acc", "final_tau"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- figures and CLI
def test_figures_written(tmp_path):
    from lightning_probes.figures import (
        plot_early_prediction,
        plot_measure_scatter,
        plot_strata,
        plot_tau_vs_epoch,
    )

    measures = with_hyperparameters(checkpoint_measures(planted_zoo()))
    shown = ["SQ_BE_p", "SQ_AE_p", "F_BE_p", "sum_log_fro"]
    table = pd.concat([
        correlation_table(measures, shown, n_resamples=0).assign(stratum="all"),
        correlation_table(measures, shown, by=("stratum", "epoch"), n_resamples=0),
    ])
    early = early_prediction(measures, shown + ["test_acc", "train_acc"])
    plot_tau_vs_epoch(table[table["stratum"] == "all"], shown, tmp_path / "tau.png")
    plot_measure_scatter(measures, "SQ_BE_p", 3, tmp_path / "scatter.png")
    plot_early_prediction(early, shown, tmp_path / "early.png")
    plot_strata(table, shown, 3, tmp_path / "strata.png")
    for name in ("tau", "scatter", "early", "strata"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name


def test_cli_writes_every_output(tmp_path, capsys):
    planted_zoo().to_csv(tmp_path / "results.csv", index=False)
    status = main(["correlate", str(tmp_path / "results.csv"), "--out", str(tmp_path / "c.csv"),
                   "--bootstrap", "50", "--plots", str(tmp_path / "figures")])
    assert status == 0
    correlations = pd.read_csv(tmp_path / "c.csv")
    for column in ("epoch", "measure", "target", "stratum", "n", "kendall_tau", "spearman", "pearson",
                   "tau_ci_low", "tau_ci_high"):
        assert column in correlations.columns
    assert {"all", "NIN00000", "NIN11111"} == set(correlations["stratum"])
    assert {"test_acc", "gap"} == set(correlations["target"])
    baselines = {"param_count", "sum_log_fro", "sum_log_spec"}
    assert {"SQ_BE_p", "E_AE_L2", *baselines} <= set(correlations["measure"])
    for kind in ("measures", "granulated", "cmi", "early", "early_summary"):
        assert len(pd.read_csv(tmp_path / f"c.{kind}.csv")) > 0, kind
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "best_measure_scatter.png", "early_prediction.png", "strata.png", "tau_vs_epoch.png"]
    assert "SQ_" in capsys.readouterr().out


def test_cli_error_on_missing_columns(tmp_path, capsys):
    planted_zoo().drop(columns=["in_SQ_BE", "gap"]).to_csv(tmp_path / "results.csv", index=False)
    assert main(["correlate", str(tmp_path / "results.csv"), "--out", str(tmp_path / "c.csv")]) == 2
    error = capsys.readouterr().err
    assert "gap" in error and "in_SQ_BE" in error
    assert not (tmp_path / "c.csv").exists()


def test_cli_error_on_single_model_per_epoch(tmp_path, capsys):
    rows = planted_zoo()
    rows[rows["model_id"] == rows["model_id"].iloc[0]].to_csv(tmp_path / "results.csv", index=False)
    assert main(["correlate", str(tmp_path / "results.csv"), "--out", str(tmp_path / "c.csv")]) == 2
    assert "at most 1 model(s) per epoch" in capsys.readouterr().err


def test_cli_without_genprob_ids_skips_grid_outputs(tmp_path, capsys):
    rows = planted_zoo()
    rows["model_id"] = rows["model_id"].str.replace("zoo_NIN", "run", regex=False)
    rows.to_csv(tmp_path / "results.csv", index=False)
    assert main(["correlate", str(tmp_path / "results.csv"), "--out", str(tmp_path / "c.csv"),
                 "--bootstrap", "0"]) == 0
    assert "no granulated" in capsys.readouterr().err
    assert set(pd.read_csv(tmp_path / "c.csv")["stratum"]) == {"all"}
    assert not (tmp_path / "c.cmi.csv").exists()


def test_cli_error_on_unknown_scatter_epoch(tmp_path, capsys):
    planted_zoo(epochs=2).to_csv(tmp_path / "results.csv", index=False)
    assert main(["correlate", str(tmp_path / "results.csv"), "--out", str(tmp_path / "c.csv"),
                 "--scatter-epoch", "7"]) == 2
    assert "--scatter-epoch 7" in capsys.readouterr().err
