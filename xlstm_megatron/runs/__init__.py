"""A run's shared plumbing, below its users: Megatron arguments (with the xLSTM family applied), the model built
from them, and the Megatron checkpoints a run writes. `training`, `convert`, `inference` and `bench` all use this
package; it imports none of them."""
