"""Which probe measures rank the models of a zoo by test accuracy and gap, and how early.

Reads the replay table (one row per checkpoint and layer, from
`lightning-probes replay ZOO --out results.csv`), aggregates each checkpoint's layer rows into
every SPEC §4 measure (the same function probe() uses) plus weight baselines, and writes:

  OUT                          per epoch, measure, target (test_acc, gap) and stratum ("all" =
                               every model; "NIN<code>" = one width): n, kendall_tau, kendall_p,
                               spearman, pearson, tau_ci_low, tau_ci_high (bootstrap 95%
                               percentile interval of tau over models, fixed seed)
  <OUT stem>.measures.csv      the aggregated table: one row per (model_id, epoch)
  <OUT stem>.granulated.csv    granulated Kendall (Jiang et al. 2020): epoch, measure, target,
                               hyperparameter (an axis, or "mean"), psi, n_groups
  <OUT stem>.cmi.csv           PGDL-style conditional mutual information: epoch, measure,
                               target, cmi (min over conditioning sets of <= 2 axes),
                               conditioning (the minimising set)
  <OUT stem>.early.csv         early prediction: measure (test_acc/train_acc = the accuracy at
                               epoch k, the HPO baseline), epoch, n, kendall_tau, spearman,
                               orientation, oriented_tau, all against the final test accuracy
  <OUT stem>.early_summary.csv measure, final_tau, first_epoch_tau_0.5 (first epoch with
                               oriented tau >= 0.5), stable_epoch_tau_0.5 (from which it stays
                               >= 0.5), the same for 0.7

Measures: every aggregate (SQ/E/F/S/SR/C x BE/AE x L1/L2/p/wL1/wp) and the baselines
param_count (n_params column, or the NIN's parameters without the classifier),
sum_log_fro, sum_log_spec, and dist_init when the table has a per-layer dist_init column
(||W - W_epoch0||_F). Hyper-parameters (grid axes channels, optimizer, lr, batch_size,
weight_decay; seed held fixed) come from GenProb model ids; other ids get the pooled and
early-prediction outputs only. An axis nested in an earlier one (the generator writes
lr = optimizer base rate x scale) is replaced by its rank within it (lr_within_optimizer).

With --plots DIR (needs matplotlib): tau_vs_epoch.png, best_measure_scatter.png,
early_prediction.png, strata.png. Exit status 2 on an unusable table (missing columns, fewer than 3 models at
every epoch).

example:
  lightning-probes correlate results.csv --out correlations.csv --plots figures/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lightning_probes import HEADLINE_AGGREGATES
from lightning_probes.analysis import (
    ACCURACY_BASELINES,
    REQUIRED_COLUMNS,
    TARGETS,
    WEIGHT_BASELINES,
    checkpoint_measures,
    correlation_table,
    early_prediction,
    first_epochs_reaching,
    grid_tables,
    kendall_null_halfwidth,
    measure_columns,
    with_hyperparameters,
)

MIN_MODELS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="replay table (CSV): SPEC §5 columns, model_id, epoch, performance")
    parser.add_argument("--out", required=True, help="correlations CSV; the other outputs go next to it")
    parser.add_argument("--plots", metavar="DIR", help="also write the PNG figures into DIR")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the tau interval (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--scatter-epoch", type=int, metavar="E",
                        help="epoch of the scatter and strata figures (default: the final epoch)")


def run(args: argparse.Namespace) -> int:
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plots needs matplotlib (pip install matplotlib)")
    try:
        rows = pd.read_csv(args.table)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        return _fail(f"cannot read {args.table}: {error}")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        return _fail(f"{args.table} lacks column(s) {', '.join(missing)}; expected a replay table "
                     "(lightning-probes replay ZOO --out results.csv)")
    models_per_epoch = rows.groupby("epoch")["model_id"].nunique()
    if models_per_epoch.empty or models_per_epoch.max() < MIN_MODELS:
        return _fail(f"{args.table} has at most {models_per_epoch.max() if len(models_per_epoch) else 0} "
                     f"model(s) per epoch; ranking models needs at least {MIN_MODELS} at some epoch")
    few = models_per_epoch[models_per_epoch < MIN_MODELS]
    if len(few):
        print(f"correlate: epochs {', '.join(map(str, few.index))} have fewer than {MIN_MODELS} models: "
              "their coefficients are NaN", file=sys.stderr)

    measures = with_hyperparameters(checkpoint_measures(rows))
    if args.scatter_epoch is not None and args.scatter_epoch not in set(measures["epoch"]):
        return _fail(f"--scatter-epoch {args.scatter_epoch}: {args.table} has no such epoch")
    tested = measure_columns(measures)
    pooled = correlation_table(measures, tested, TARGETS, ("epoch",), args.bootstrap, seed=args.seed)
    tables = [pooled.assign(stratum="all")]
    if "stratum" in measures.columns:
        tables.append(correlation_table(measures, tested, TARGETS, ("stratum", "epoch"), args.bootstrap,
                                        seed=args.seed))
    correlations = pd.concat(tables, ignore_index=True)
    first = ["epoch", "measure", "target", "stratum"]
    correlations = correlations[first + [c for c in correlations.columns if c not in first]]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    correlations.to_csv(out, index=False)
    measures.to_csv(_sibling(out, "measures"), index=False)
    if "stratum" in measures.columns:
        granulated, cmi = grid_tables(measures, tested)
        granulated.to_csv(_sibling(out, "granulated"), index=False)
        cmi.to_csv(_sibling(out, "cmi"), index=False)
    else:
        print("correlate: model ids are not GenProb ids: no hyper-parameters, so no granulated "
              "Kendall, CMI or width strata", file=sys.stderr)
    early = early_prediction(measures, tested + list(ACCURACY_BASELINES))
    summary = first_epochs_reaching(early)
    early.to_csv(_sibling(out, "early"), index=False)
    summary.to_csv(_sibling(out, "early_summary"), index=False)

    final_epoch = int(early["epoch"].max())
    if args.plots:
        _write_figures(Path(args.plots), measures, correlations, early, tested,
                       args.scatter_epoch if args.scatter_epoch is not None else final_epoch)
    _print_summary(pooled, summary, final_epoch)
    return 0


def _write_figures(directory: Path, measures, correlations, early, tested, epoch: int) -> None:
    from lightning_probes.figures import (
        plot_early_prediction,
        plot_measure_scatter,
        plot_strata,
        plot_tau_vs_epoch,
    )

    shown = [m for m in HEADLINE_AGGREGATES if m in tested] + [m for m in WEIGHT_BASELINES if m in tested]
    pooled = correlations[correlations["stratum"] == "all"]
    plot_tau_vs_epoch(pooled, shown, directory / "tau_vs_epoch.png")
    at_epoch = pooled[(pooled["epoch"] == epoch) & (pooled["target"] == "test_acc")
                      & ~pooled["measure"].isin(WEIGHT_BASELINES)].dropna(subset=["kendall_tau"])
    if len(at_epoch):
        best = at_epoch.loc[at_epoch["kendall_tau"].abs().idxmax(), "measure"]
        plot_measure_scatter(measures, best, epoch, directory / "best_measure_scatter.png",
                             color_by="stratum" if "stratum" in measures.columns else None)
    else:
        print(f"correlate: no measure ranks the models at epoch {epoch}: no scatter figure", file=sys.stderr)
    plot_early_prediction(early, shown, directory / "early_prediction.png")
    plot_strata(correlations, shown, epoch, directory / "strata.png")


def _print_summary(pooled: pd.DataFrame, summary: pd.DataFrame, final_epoch: int) -> None:
    final = pooled[(pooled["epoch"] == final_epoch) & (pooled["target"] == "test_acc")]
    final = final.dropna(subset=["kendall_tau"])
    n = int(final["n"].max()) if len(final) else 0
    if n < MIN_MODELS:
        print(f"epoch {final_epoch}: no measure ranks {MIN_MODELS} or more models")
        return
    print(f"epoch {final_epoch}, {n} models; |tau| < {kendall_null_halfwidth(n):.2f} is noise (95%)")
    top = final.reindex(final["kendall_tau"].abs().sort_values(ascending=False).index).head(5)
    first = summary.set_index("measure")["first_epoch_tau_0.5"]
    for row in top.itertuples():
        epoch = first.get(row.measure, float("nan"))
        print(f"  {row.measure:<14} tau with test_acc {row.kendall_tau:+.3f} "
              f"[{row.tau_ci_low:+.2f}, {row.tau_ci_high:+.2f}]; first epoch with tau >= 0.5 "
              f"against the final test accuracy: {'never' if epoch != epoch else int(epoch)}")


def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f"{out.stem}.{kind}.csv")


def _fail(message: str) -> int:
    print(f"correlate: error: {message}", file=sys.stderr)
    return 2
