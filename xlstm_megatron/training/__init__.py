"""Training entry points built on megatron-core (optimizer, schedules, dist checkpointing, datasets)."""
