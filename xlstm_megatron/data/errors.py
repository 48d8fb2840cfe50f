"""The one exception type the data pipeline raises for bad input."""


class DataConfigError(ValueError):
    """Bad data/tokenizer input. The message is one line that names the offending path or value and the fix.

    Raised before any output is written, so a failed call never leaves partial or clobbered files behind.
    """
