"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class SdloomError(Exception):
    """A user-facing error: printed as one line, exit code 1."""
