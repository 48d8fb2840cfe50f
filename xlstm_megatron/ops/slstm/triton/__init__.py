"""Fused Triton sLSTM (time loop inside the kernel), with the contract of `xlstm_megatron.ops.slstm.slstm`.

Import-guarded: without triton this package still imports; `TRITON_AVAILABLE` is False and calling `slstm_triton`
raises ImportError. Not imported by the torch path (dispatch is wired elsewhere). Any head size runs (see launch.py).
"""

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    TRITON_AVAILABLE = False

    def slstm_triton(*args, **kwargs):
        raise ImportError("slstm_triton needs the `triton` package; use xlstm_megatron.ops.slstm.slstm")

else:
    TRITON_AVAILABLE = True
    from xlstm_megatron.ops.slstm.triton.function import slstm_triton

__all__ = ["TRITON_AVAILABLE", "slstm_triton"]
