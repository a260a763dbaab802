"""sdloom's error types: below the HTTP layer only these are raised for anything a user caused.

The CLI prints one as one line and exits non-zero; the server maps each to A1111's JSON error
body (`error`, `detail`, `body`, `errors`) with the class's `http_status`.
"""


class SdloomError(Exception):
    """A user-facing error: a bad value, file or request. CLI: one line, exit 1; HTTP: 422."""
    http_status = 422


class ModelFileError(SdloomError):
    """A model, LoRA, embedding or VAE file that cannot be read or does not fit the model."""


class NotFoundError(SdloomError):
    """A named thing (model, LoRA, sampler, file) that does not exist where it was looked for."""
    http_status = 404


class LimitError(SdloomError):
    """A request over a configured limit (prompt size, pixels, steps, body size)."""
    http_status = 413
