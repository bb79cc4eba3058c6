"""The one exception type users see: a one-line message that names the file or key and the fix."""


class DtrainError(ValueError):
    """Bad input or environment. The CLI prints `dtrain: error: <message>` and exits with status 2."""
