import os

# Megatron/torch print CUDA warnings on CPU-only machines; keep test output readable.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
