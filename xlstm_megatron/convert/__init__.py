"""Weight mapping between xLSTM checkpoints of the official packages / Hugging Face and our Megatron models."""
