"""xLSTM for Megatron-Core.

Tiers (imports point one way): ``ops`` (pure torch/Triton math, no Megatron) -> ``layers`` (Megatron modules and
ModuleSpecs) -> ``models`` / ``training`` / ``convert`` / ``inference``. Importing this package imports nothing
heavier than torch.
"""

__version__ = "0.1.0.dev0"
