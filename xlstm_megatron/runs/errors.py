"""The one error type for bad run input (arguments, YAML, checkpoints): its message is one line naming the fix."""


class ConfigError(ValueError):
    """A bad run configuration; the message is one line naming the fix."""
