"""Trains the tiny digits classifier on 2 CPU processes (gloo) with ProbeCallback; not a test module.

Usage: python callback_distributed_script.py {ddp|fsdp2} OUT_DIR

Every rank saves what its callbacks ended with (``rank{r}.pt``: the per-layer tables, spectra,
the probe keys of ``trainer.callback_metrics``) and the full final weights, for the test to
compare with a single-process ``probe()``.
"""
import sys

import torch
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from callback_support import classifier_class, digits_loaders
from lightning_probes.pytorch_lightning import ProbeCallback


class FullyShardedClassifier(classifier_class(pl)):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full_state(module: nn.Module) -> dict:
    state = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        state[name] = value.detach().cpu().clone()
    return state


def main(kind: str, out_dir: str) -> None:
    torch.manual_seed(0)
    strategies = {
        "ddp": "ddp",
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }
    strategy = strategies[kind]() if callable(strategies[kind]) else strategies[kind]
    model = FullyShardedClassifier() if kind == "fsdp2" else classifier_class(pl)()
    probes = ProbeCallback(log_spectra=True)
    # A second probe with other options: its only layer leaves one rank with nothing to probe.
    classifier_probe = ProbeCallback(layers=["net.7.weight"], aggregates=["SR_BE_L1"], log_layers=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, callbacks=[probes, classifier_probe],
        logger=TensorBoardLogger(out_dir, name="tb"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    train, val = digits_loaders()
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("probe/")}
    torch.save(
        {
            "table": probes.last_result.layers,
            "metrics": metrics,
            "aggregates": probes.last_result.aggregates,
            "classifier_table": classifier_probe.last_result.layers,
            "spectra": probes.last_result.spectra,
            "weights": full_state(model),
            "global_step": trainer.global_step,
            "log_dir": trainer.logger.log_dir if trainer.global_rank == 0 else None,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
