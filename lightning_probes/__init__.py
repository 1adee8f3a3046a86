"""lightning_probes: layer-wise probeable generalization measures for PyTorch and Lightning.

>>> import torch
>>> from lightning_probes import probe
>>> res = probe(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4)))
>>> list(res.layers["layer"])
['0.weight', '2.weight']
>>> sorted(res.aggregates)[:2]
['C_AE_L1', 'C_AE_L2']
"""
from __future__ import annotations

import sys

from lightning_probes.probe import (
    HEADLINE_AGGREGATES,
    TABLE_COLUMNS,
    ProbeResult,
    ProbeWarning,
    aggregates_from_table,
    probe,
    select_weights,
)

__all__ = [
    "HEADLINE_AGGREGATES",
    "TABLE_COLUMNS",
    "ProbeCallback",
    "ProbeResult",
    "ProbeWarning",
    "aggregates_from_table",
    "probe",
    "select_weights",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Resolved lazily so that importing lightning_probes imports no Lightning package, and so
    # the callback subclasses the Callback of the Lightning flavour the user has imported:
    # ``lightning.pytorch`` when only that one is loaded, ``pytorch_lightning`` otherwise.
    if name == "ProbeCallback":
        if "lightning" in sys.modules and "pytorch_lightning" not in sys.modules:
            from lightning_probes.lightning import ProbeCallback
        else:
            from lightning_probes.pytorch_lightning import ProbeCallback
        return ProbeCallback
    raise AttributeError(f"module 'lightning_probes' has no attribute {name!r}")
