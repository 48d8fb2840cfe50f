"""Triton kernels of the chunkwise mLSTM (TFLA-like), with the contract of `mlstm_chunkwise`.

Import-guarded: without triton this package still imports; `TRITON_AVAILABLE` is False and calling
`mlstm_chunkwise_triton` raises ImportError. Not imported by the torch path (dispatch is wired elsewhere).
"""

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    TRITON_AVAILABLE = False

    def mlstm_chunkwise_triton(*args, **kwargs):
        raise ImportError("mlstm_chunkwise_triton needs the `triton` package; use xlstm_megatron.ops.mlstm_chunkwise")

else:
    TRITON_AVAILABLE = True
    from xlstm_megatron.ops.mlstm.triton.function import mlstm_chunkwise_triton

__all__ = ["TRITON_AVAILABLE", "mlstm_chunkwise_triton"]
