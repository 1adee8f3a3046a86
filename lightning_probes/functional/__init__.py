"""Pure tensor functions behind every probe: no Lightning, no I/O, no global state.

Everything is batched over a leading dim of same-shape matrices and runs on the input's device.
"""
from lightning_probes.functional.aggregates import AGGREGATIONS, Aggregates, aggregate
from lightning_probes.functional.evbmf import (
    EVBMFResult,
    evbmf,
    evbmf_objective,
    minimize_scalar_bounded,
    noise_variance_bounds,
)
from lightning_probes.functional.metrics import SpectralMetrics, spectral_metrics
from lightning_probes.functional.spectra import GRAM_MAX_CONDITION, singular_values
from lightning_probes.functional.unfold import channel_weights, unfold_in, unfold_out, unfolded_shapes

__all__ = [
    "AGGREGATIONS",
    "Aggregates",
    "EVBMFResult",
    "GRAM_MAX_CONDITION",
    "SpectralMetrics",
    "aggregate",
    "channel_weights",
    "evbmf",
    "evbmf_objective",
    "minimize_scalar_bounded",
    "noise_variance_bounds",
    "singular_values",
    "spectral_metrics",
    "unfold_in",
    "unfold_out",
    "unfolded_shapes",
]
