"""Figures of the correlation analysis, as PNG files.

Each function draws one self-explanatory figure from the tables of
:mod:`lightning_probes.analysis` and writes it to ``path``. Drawing uses matplotlib's
``Figure`` with the Agg canvas directly: pyplot and matplotlib's global state are left alone.

>>> import tempfile, pathlib, pandas as pd
>>> table = pd.DataFrame({"epoch": [0, 1], "measure": ["F_BE_p"] * 2, "target": ["test_acc"] * 2,
...                       "n": [8, 8], "kendall_tau": [0.1, 0.6]})
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tau.png"
>>> plot_tau_vs_epoch(table, ["F_BE_p"], path)
>>> path.stat().st_size > 0
True
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_probes.analysis import WEIGHT_BASELINES, correlation, kendall_null_halfwidth

TARGET_LABELS = {"test_acc": "test accuracy", "gap": "gap (test acc - train acc)"}
_DPI = 100


def plot_tau_vs_epoch(correlations: pd.DataFrame, measures: Sequence[str], path: str | Path,
                      targets: Sequence[str] = ("test_acc", "gap")) -> None:
    """Kendall's tau of each measure with each target vs epoch, one panel per target (the
    paper's evolution figure), with the band where |tau| is indistinguishable from noise.

    ``correlations``: rows of :func:`~lightning_probes.analysis.correlation_table` for one
    population of models (e.g. the pooled rows). Probe measures are solid (BE) or dashed (AE);
    weight baselines are dotted.
    """
    targets = [t for t in targets if t in set(correlations["target"])]
    figure = _figure(10, 3.6 * len(targets))
    axes = figure.subplots(len(targets), 1, sharex=True, squeeze=False)[:, 0]
    colors = _colors(measures)
    for ax, target in zip(axes, targets):
        rows = correlations[correlations["target"] == target]
        for measure in measures:
            curve = rows[rows["measure"] == measure].sort_values("epoch")
            ax.plot(curve["epoch"], curve["kendall_tau"], label=measure, color=colors[measure],
                    linestyle=_line_style(measure), marker=".", linewidth=1.4)
        _noise_band(ax, rows["n"])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Kendall's tau")
        ax.set_title(f"Kendall's tau of each measure with {TARGET_LABELS.get(target, target)}, per epoch")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                   title="measure (--- AE, ··· baseline)")
    _save(figure, path)


def plot_measure_scatter(measures: pd.DataFrame, measure: str, epoch: int, path: str | Path,
                         target: str = "test_acc", color_by: str | None = "stratum") -> None:
    """Scatter of one measure against the target at one epoch, one color per ``color_by`` group
    (e.g. the width stratum), tau in the title (the paper's scatter figure)."""
    models = measures[measures["epoch"] == epoch]
    figure = _figure(7, 5)
    ax = figure.subplots()
    groups = models.groupby(color_by, sort=True) if color_by in models.columns else [("all models", models)]
    for label, group in groups:
        ax.scatter(group[measure], group[target], label=str(label), s=28, alpha=0.8)
    result = correlation(models[measure], models[target])
    ax.set_xlabel(measure)
    ax.set_ylabel(TARGET_LABELS.get(target, target))
    ax.set_title(f"{measure} vs {TARGET_LABELS.get(target, target)} at epoch {epoch}\n"
                 f"({result.n} models, Kendall's tau = {result.kendall_tau:.2f})")
    ax.legend(title=color_by or "", fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)


def plot_early_prediction(early: pd.DataFrame, measures: Sequence[str], path: str | Path,
                          thresholds: Sequence[float] = (0.5, 0.7),
                          baselines: Sequence[str] = ("test_acc", "train_acc")) -> None:
    """Oriented tau between each measure at epoch k and the final test accuracy, vs k, next to
    the accuracy at epoch k itself (black/grey: the baseline an HPO scheduler uses)."""
    figure = _figure(10, 4.5)
    ax = figure.subplots()
    colors = _colors(measures)
    for measure in measures:
        curve = early[early["measure"] == measure].sort_values("epoch")
        ax.plot(curve["epoch"], curve["oriented_tau"], label=measure, color=colors[measure],
                linestyle=_line_style(measure), marker=".", linewidth=1.3)
    for baseline, color in zip(baselines, ("black", "grey")):
        curve = early[early["measure"] == baseline].sort_values("epoch")
        ax.plot(curve["epoch"], curve["oriented_tau"], label=f"{baseline} at epoch k (baseline)",
                color=color, linewidth=2.6)
    for threshold in thresholds:
        ax.axhline(threshold, color="red", linewidth=0.8, linestyle=":")
    _noise_band(ax, early["n"])
    ax.set_ylim(-1, 1)
    ax.set_xlabel("epoch k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("oriented Kendall's tau with final test accuracy")
    final = int(early["epoch"].max())
    ax.set_title(f"Early prediction: each measure at epoch k vs test accuracy at epoch {final}\n"
                 f"(sign fixed by the final epoch; red: tau = {', '.join(f'{t:g}' for t in thresholds)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)


def plot_strata(correlations: pd.DataFrame, measures: Sequence[str], epoch: int, path: str | Path,
                target: str = "test_acc") -> None:
    """Bars of tau per measure at one epoch: pooled over the zoo next to inside each width
    stratum (``stratum`` column; ``"all"`` = pooled), with the noise band of one stratum's size.
    Scale measures can win pooled and lose within a width."""
    rows = correlations[(correlations["epoch"] == epoch) & (correlations["target"] == target)]
    strata = ["all"] + sorted(s for s in rows["stratum"].unique() if s != "all")
    figure = _figure(min(14, 3 + 0.3 * len(measures) * len(strata)), 4.8)
    ax = figure.subplots()
    width = 0.8 / len(strata)
    positions = np.arange(len(measures))
    for k, stratum in enumerate(strata):
        values = rows[rows["stratum"] == stratum].set_index("measure")["kendall_tau"].reindex(measures)
        n = rows.loc[rows["stratum"] == stratum, "n"].max()
        label = f"pooled (n={n})" if stratum == "all" else f"{stratum} (n={n})"
        ax.bar(positions + (k - (len(strata) - 1) / 2) * width, values, width, label=label,
               color="black" if stratum == "all" else None)
    _noise_band(ax, rows.loc[rows["stratum"] != "all", "n"])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(positions, measures, rotation=45, ha="right")
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Kendall's tau")
    ax.set_title(f"Kendall's tau with {TARGET_LABELS.get(target, target)} at epoch {epoch}: "
                 "pooled vs within each width stratum")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3, axis="y")
    _save(figure, path)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)


def _line_style(measure: str) -> str:
    if measure in WEIGHT_BASELINES:
        return ":"
    return "--" if "_AE_" in measure else "-"


def _colors(measures: Sequence[str]) -> dict[str, tuple]:
    # BE and AE of the same metric share a color; baselines get their own.
    families = list(dict.fromkeys(m.split("_")[0] if "_BE_" in m or "_AE_" in m else m for m in measures))
    palette = [f"C{i % 10}" for i in range(len(families))]
    family_color = dict(zip(families, palette))
    return {m: family_color[m.split("_")[0] if "_BE_" in m or "_AE_" in m else m] for m in measures}


def _noise_band(ax, n: pd.Series) -> None:
    n_models = int(np.nanmedian(n)) if len(n) else 0
    if n_models > 2:
        halfwidth = kendall_null_halfwidth(n_models)
        ax.axhspan(-halfwidth, halfwidth, color="grey", alpha=0.15,
                   label=f"|tau| < {halfwidth:.2f}: noise for n={n_models} (95%)")
