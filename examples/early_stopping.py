"""Early stopping and checkpoint selection on a probe aggregate instead of a validation metric.

    python examples/early_stopping.py                                # stop when SQ_AE_p stops rising
    python examples/early_stopping.py --monitor probe/E_BE_L2 --mode min --patience 5

The probes are computed from the weights alone, so this works when no labelled validation data
can be spared. ``ModelCheckpoint`` needs ``auto_insert_metric_name=False`` because the keys
contain a ``/``. At the end the best checkpoint is validated and its accuracy printed.
"""
from __future__ import annotations

import argparse

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from digits import cpu_setup, classifier, digits_loaders, kaiming_init, small_cnn
from lightning_probes import ProbeCallback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--monitor", default="probe/SQ_AE_p", help="a probe/{M}_{BE|AE}_{agg} key")
    parser.add_argument("--mode", choices=["min", "max"], default="max")
    parser.add_argument("--patience", type=int, default=3, help="probes without improvement before stopping")
    parser.add_argument("--min-delta", type=float, default=1e-3, help="smallest change that counts as improvement")
    parser.add_argument("--epochs", type=int, default=40, help="at most this many epochs")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/early_stopping", help="logs and checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    cpu_setup(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    train, val = digits_loaders(seed=args.seed)
    model = classifier(pl, kaiming_init(small_cnn(args.width)), "adam", args.lr)
    key = args.monitor.removeprefix("probe/")
    probes = ProbeCallback(aggregates=sorted({key, "SQ_AE_p", "E_BE_L2"}))
    stopping = EarlyStopping(args.monitor, mode=args.mode, patience=args.patience, min_delta=args.min_delta)
    checkpoint = ModelCheckpoint(
        dirpath=f"{args.out}/checkpoints", monitor=args.monitor, mode=args.mode,
        filename=f"epoch{{epoch:02d}}-{key}{{{args.monitor}:.4f}}", auto_insert_metric_name=False,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=[probes, stopping, checkpoint], default_root_dir=args.out,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )
    trainer.fit(model, train, val)
    epochs = trainer.current_epoch
    stopped_early = stopping.stopped_epoch > 0
    print(f"trained {epochs} epochs; " + (f"stopped early: no improvement of {args.monitor} in the last "
                                          f"{args.patience} probe(s)" if stopped_early else "reached --epochs"))
    print(f"best {args.monitor} = {checkpoint.best_model_score.item():.4f}: {checkpoint.best_model_path}")
    (best,) = trainer.validate(model, val, ckpt_path=checkpoint.best_model_path, verbose=False)
    print(f"validation accuracy of that checkpoint: {best['val_acc']:.4f}")


if __name__ == "__main__":
    main()
