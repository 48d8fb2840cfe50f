"""sLSTM cell (xLSTM v1): per-step reference and fast pure-torch path with a hand-written backward."""

from .common import SLSTMState
from .fused_torch import slstm
from .reference import slstm_reference

__all__ = ["SLSTMState", "slstm", "slstm_reference"]
