"""The GenProb study of benchmarks/GENPROB_STUDY.md, in one command.

    python benchmarks/genprob_study.py ZOO OUT [--figures benchmarks/figures] [--generate-option ...]

Runs, each step resumable: ``lightning-probes generate ZOO`` (the default zoo; finished models
are skipped), ``lightning-probes replay ZOO --out OUT/results.csv``, the ``dist_init`` step below
(writing OUT/results_dist_init.csv), ``lightning-probes correlate OUT/results_dist_init.csv
--out OUT/correlations.csv --plots FIGURES``, and writes the study's markdown tables to
OUT/tables.md.

``dist_init``: the generated zoo stores no epoch-0 weights, so this rebuilds each model's
initial network with the generator's own ``initial_network(code, seed)`` and adds, per replayed
row, ``dist_init`` = ||W_epoch - W_init||_F of that layer (``correlate`` uses the column when
present). It checks the rebuild: after one epoch every model must be much closer to its
rebuilt init than to the init of another seed. Drop this step once the generator writes an
epoch-0 checkpoint and the replay adds the column itself.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lightning_probes import HEADLINE_AGGREGATES, select_weights
from lightning_probes.analysis import WEIGHT_BASELINES, kendall_null_halfwidth, model_hyperparameters
from lightning_probes.generate import initial_network
from lightning_probes.genprob import read_checkpoint


@functools.lru_cache(maxsize=None)
def initial_weights(channel_code: str, seed: int) -> dict[str, torch.Tensor]:
    """The GenProb-selected weights of a generated model before training (generate's init)."""
    selected = select_weights(initial_network(channel_code, seed).state_dict(), "genprob")
    return {name: weight.detach().double() for name, weight in selected}


def add_dist_init(zoo: Path, results: Path, out: Path) -> None:
    rows = pd.read_csv(results)
    distances = {}
    check = []
    for path in sorted(zoo.glob("*.pth.tar")):
        checkpoint = read_checkpoint(path)
        hyperparameters = model_hyperparameters(checkpoint.name.model_id)
        init = initial_weights(hyperparameters["channels"], int(hyperparameters["seed"]))
        for layer, reference in init.items():
            weight = checkpoint.state_dict[layer].double()
            key = (checkpoint.name.model_id, checkpoint.name.epoch, layer)
            distances[key] = float((weight - reference).norm())
        if checkpoint.name.epoch == 1:
            other = initial_weights(hyperparameters["channels"], int(hyperparameters["seed"]) + 1)
            check.append(_distance(checkpoint.state_dict, init) / _distance(checkpoint.state_dict, other))
    if not check or max(check) > 0.5:
        sys.exit(f"init rebuild does not match the zoo (distance ratio own/foreign seed: {check})")
    keys = zip(rows["model_id"], rows["epoch"].astype(int), rows["layer"])
    rows["dist_init"] = [distances.get(key, np.nan) for key in keys]
    if rows["dist_init"].isna().any():
        sys.exit(f"{int(rows['dist_init'].isna().sum())} rows have no checkpoint in {zoo}")
    rows.to_csv(out, index=False)
    print(f"dist_init added to {len(rows)} rows in {out}; epoch-1 distance to own init / to another seed's: "
          f"max {max(check):.3f}, median {np.median(check):.3f}")


def _distance(state_dict: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return float(np.sqrt(sum(float((state_dict[k].double() - v).norm() ** 2) for k, v in reference.items())))


def print_tables(out: Path) -> None:
    correlations = pd.read_csv(out / "correlations.csv")
    measures = pd.read_csv(out / "correlations.measures.csv")
    early = pd.read_csv(out / "correlations.early_summary.csv").set_index("measure")
    granulated = pd.read_csv(out / "correlations.granulated.csv")
    cmi = pd.read_csv(out / "correlations.cmi.csv")
    final = int(measures["epoch"].max())
    n = measures["model_id"].nunique()
    print(f"{n} models, epochs {int(measures['epoch'].min())}..{final}; "
          f"95% noise half-width of tau for n={n}: {kendall_null_halfwidth(n):.3f}\n")
    shown = HEADLINE_AGGREGATES + [m for m in WEIGHT_BASELINES if m in set(correlations["measure"])]
    pooled = correlations[(correlations["stratum"] == "all") & (correlations["epoch"] == final)]
    print(f"### Final epoch ({final}), all models\n")
    print("| measure | tau test_acc [95% CI] | Spearman | Pearson | tau gap [95% CI] | psi mean (test_acc) "
          "| CMI (test_acc) | epoch tau>=0.5 first / for good | tau>=0.7 first / for good |")
    print("|---|---|---|---|---|---|---|---|---|")
    for measure in shown + ["test_acc", "train_acc"]:
        summary = early.loc[measure] if measure in early.index else None
        row_acc = pooled[(pooled["measure"] == measure) & (pooled["target"] == "test_acc")]
        row_gap = pooled[(pooled["measure"] == measure) & (pooled["target"] == "gap")]
        psi = granulated[(granulated["epoch"] == final) & (granulated["measure"] == measure)
                         & (granulated["target"] == "test_acc") & (granulated["hyperparameter"] == "mean")]
        information = cmi[(cmi["epoch"] == final) & (cmi["measure"] == measure)
                          & (cmi["target"] == "test_acc")]
        cells = [f"`{measure}`" + (" (at epoch k)" if measure in ("test_acc", "train_acc") else "")]
        if len(row_acc):
            r = row_acc.iloc[0]
            g = row_gap.iloc[0]
            cells += [_tau_with_interval(r), f"{r.spearman:+.2f}", f"{r.pearson:+.2f}", _tau_with_interval(g),
                      f"{psi['psi'].iloc[0]:+.2f}" if len(psi) else "", f"{information['cmi'].iloc[0]:.3f}"
                      if len(information) else ""]
        else:
            cells += ["(1 by definition)", "", "", "", "", ""]
        if summary is not None:
            cells += [_epoch(summary[f"first_epoch_tau_{t}"]) + " / " + _epoch(summary[f"stable_epoch_tau_{t}"])
                      for t in ("0.5", "0.7")]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")

    print(f"\n### Granulated Kendall psi per hyper-parameter at epoch {final} (target test_acc)\n")
    table = granulated[(granulated["epoch"] == final) & (granulated["target"] == "test_acc")
                       & granulated["measure"].isin(shown)]
    wide = table.pivot(index="measure", columns="hyperparameter", values="psi").reindex(shown)
    print(_markdown(wide))

    print(f"\n### Within width strata at epoch {final} (tau with test_acc)\n")
    strata = correlations[(correlations["epoch"] == final) & (correlations["target"] == "test_acc")
                          & correlations["measure"].isin(shown)]
    wide = strata.pivot(index="measure", columns="stratum", values="kendall_tau").reindex(shown)
    print(_markdown(wide))

    print("\n### Top 10 aggregates by |tau| with test_acc at the final epoch\n")
    top = pooled[(pooled["target"] == "test_acc") & ~pooled["measure"].isin(WEIGHT_BASELINES)]
    top = top.reindex(top["kendall_tau"].abs().sort_values(ascending=False).index).head(10)
    print(_markdown(top.set_index("measure")[["kendall_tau", "tau_ci_low", "tau_ci_high", "spearman"]]))

    print("\n### Sign flips: headline measures whose pooled tau with test_acc changes sign over epochs "
          "outside the noise band\n")
    band = kendall_null_halfwidth(n)
    curves = correlations[(correlations["stratum"] == "all") & (correlations["target"] == "test_acc")]
    for measure in shown:
        tau = curves[curves["measure"] == measure].set_index("epoch")["kendall_tau"]
        above, below = tau[tau > band], tau[tau < -band]
        if len(above) and len(below):
            print(f"- `{measure}`: tau > +{band:.2f} at epochs {list(above.index)}, "
                  f"< -{band:.2f} at {list(below.index)}")


def _tau_with_interval(row) -> str:
    return f"{row.kendall_tau:+.2f} [{row.tau_ci_low:+.2f}, {row.tau_ci_high:+.2f}]"


def _epoch(value: float) -> str:
    return "never" if np.isnan(value) else str(int(value))


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join([str(frame.index.name or "")] + [str(c) for c in frame.columns]) + " |"
    lines = [header, "|" + "---|" * (len(frame.columns) + 1)]
    for index, row in frame.iterrows():
        values = [f"{v:+.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([f"`{index}`"] + values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zoo", type=Path, help="zoo directory (generated when incomplete)")
    parser.add_argument("out", type=Path, help="directory for results.csv, correlations*.csv, tables.md")
    parser.add_argument("--figures", type=Path, default=Path(__file__).parent / "figures")
    parser.add_argument("--generate-option", action="append", default=[], metavar="ARG",
                        help="extra argument for generate, repeatable (e.g. --generate-option=--quick)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    with_distances = args.out / "results_dist_init.csv"

    def lightning_probes(*arguments) -> None:
        subprocess.run([sys.executable, "-m", "lightning_probes", *map(str, arguments)], check=True)

    lightning_probes("generate", args.zoo, *args.generate_option)
    lightning_probes("replay", args.zoo, "--out", results, "--no-progress")
    add_dist_init(args.zoo, results, with_distances)
    lightning_probes("correlate", with_distances, "--out", args.out / "correlations.csv",
                     "--plots", args.figures)
    tables = io.StringIO()
    with contextlib.redirect_stdout(tables):
        print_tables(args.out)
    (args.out / "tables.md").write_text(tables.getvalue())
    print(f"tables in {args.out / 'tables.md'}, figures in {args.figures}")


if __name__ == "__main__":
    main()
