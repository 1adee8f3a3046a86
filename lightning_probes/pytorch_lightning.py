"""``ProbeCallback`` for the ``pytorch_lightning`` package (see :mod:`lightning_probes._callback_core`)."""
from pytorch_lightning import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from lightning_probes._callback_core import CALLBACK_DOC, ProbeCallbackCore, log_probe_result

__all__ = ["ProbeCallback", "log_probe_result"]


class ProbeCallback(ProbeCallbackCore, Callback):
    __doc__ = CALLBACK_DOC.format(package="pytorch_lightning", module="pytorch_lightning")
    _rank_zero_only = staticmethod(rank_zero_only)
