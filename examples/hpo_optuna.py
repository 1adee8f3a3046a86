"""Hyper-parameter search with Optuna, pruning trials on a probe aggregate.

    python examples/hpo_optuna.py                       # 12 trials x up to 10 epochs, each study
    python examples/hpo_optuna.py --monitor probe/E_AE_L2 --max-trials 20

Two studies of the same search space (width, learning rate, weight decay of a small CNN on
scikit-learn's digits) with the same sampler seed: one prunes unpromising trials on the
validation accuracy, the other on a probe aggregate, which needs no validation data. Both report
the final validation accuracy as the objective; the script prints, for each, the best accuracy
and the epochs spent over all trials.

Optuna's ``PyTorchLightningPruningCallback`` is written for the ``lightning`` package, so this
example uses ``lightning.pytorch`` and ``lightning_probes.lightning.ProbeCallback``.
"""
from __future__ import annotations

import argparse

import lightning.pytorch as pl
import optuna
from optuna_integration import PyTorchLightningPruningCallback

from digits import cpu_setup, classifier, digits_loaders, kaiming_init, small_cnn
from lightning_probes.lightning import ProbeCallback


def objective(trial: optuna.Trial, monitor: str, epochs: int, seed: int) -> float:
    width = trial.suggest_categorical("width", [8, 16, 32, 64])
    lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
    weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    pl.seed_everything(seed, verbose=False)
    train, val = digits_loaders(seed=seed)
    model = classifier(pl, kaiming_init(small_cnn(width)), "adam", lr, weight_decay)
    pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[ProbeCallback(), pruning], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, train, val)
    trial.set_user_attr("epochs", trainer.current_epoch)
    pruning.check_pruned()  # raises optuna.TrialPruned when the pruner stopped this trial
    return trainer.callback_metrics["val_acc"].item()


def run_study(monitor: str, args) -> optuna.Study:
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    )
    study.optimize(lambda trial: objective(trial, monitor, args.epochs, args.seed), n_trials=args.max_trials)
    return study


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--monitor", default="probe/SQ_AE_p",
                        help="probe key to prune on (higher must be better: the study maximises)")
    parser.add_argument("--max-trials", type=int, default=12, help="trials per study")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of an unpruned trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    cpu_setup(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{'pruned on':<16} {'best val_acc':>12} {'epochs spent':>12} {'pruned':>6} {'complete':>8}  best params")
    for monitor in ("val_acc", args.monitor):
        study = run_study(monitor, args)
        states = [trial.state for trial in study.trials]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"{study.best_value:12.4f}" if complete else f"{'-':>12}"
        params = study.best_params if complete else {}
        spent = sum(trial.user_attrs.get("epochs", 0) for trial in study.trials)
        print(f"{monitor:<16} {best} {spent:12d} {states.count(optuna.trial.TrialState.PRUNED):6d} "
              f"{len(complete):8d}  {params}", flush=True)


if __name__ == "__main__":
    main()
