"""Pure torch math of xLSTM: no Megatron import here, so the ops can be used (and tested) on their own.

The sLSTM cell is imported from its subpackage (`from xlstm_megatron.ops.slstm import slstm`): re-exporting the
function here would shadow the subpackage `xlstm_megatron.ops.slstm` itself.
"""

from xlstm_megatron.ops.conv import causal_conv1d, causal_conv1d_step
from xlstm_megatron.ops.init import (
    mlstm_forget_gate_bias,
    normal_init_method,
    slstm_forget_gate_bias,
    small_init_std,
    wang_init_std,
)
from xlstm_megatron.ops.mlstm import (
    MLSTMState,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_recurrent_step,
)
from xlstm_megatron.ops.norms import head_norm, layer_norm, rms_norm
from xlstm_megatron.ops.softcap import soft_cap

__all__ = [
    "MLSTMState",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_recurrent_step",
    "causal_conv1d",
    "causal_conv1d_step",
    "head_norm",
    "layer_norm",
    "mlstm_forget_gate_bias",
    "normal_init_method",
    "rms_norm",
    "slstm_forget_gate_bias",
    "small_init_std",
    "soft_cap",
    "wang_init_std",
]
