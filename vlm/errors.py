"""The one exception type users see: a clear, one-line message about bad input."""


class VlmError(Exception):
    """Bad input or an unusable model file. The message is a single line meant for the user."""
