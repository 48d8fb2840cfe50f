"""mLSTM cell: parallel (quadratic reference), recurrent (step and loop) and chunkwise (linear memory) forms."""

from xlstm_megatron.ops.mlstm.chunkwise import mlstm_chunkwise
from xlstm_megatron.ops.mlstm.common import MLSTMState
from xlstm_megatron.ops.mlstm.parallel import mlstm_parallel
from xlstm_megatron.ops.mlstm.recurrent import mlstm_recurrent, mlstm_recurrent_step

__all__ = ["MLSTMState", "mlstm_chunkwise", "mlstm_parallel", "mlstm_recurrent", "mlstm_recurrent_step"]
