"""The converters' one error type: its message is one line that names the problem (the CLI prints `error: ...`)."""


class ConvertError(ValueError):
    """Bad converter input: wrong architecture, missing or inconsistent files, unsupported settings."""
