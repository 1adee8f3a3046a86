"""``ProbeCallback`` for the ``lightning`` package, ``lightning.pytorch`` (see :mod:`lightning_probes._callback_core`)."""
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_probes._callback_core import CALLBACK_DOC, ProbeCallbackCore, log_probe_result

__all__ = ["ProbeCallback", "log_probe_result"]


class ProbeCallback(ProbeCallbackCore, Callback):
    __doc__ = CALLBACK_DOC.format(package="lightning.pytorch", module="lightning")
    _rank_zero_only = staticmethod(rank_zero_only)
