"""Request limits: how much one job may ask of the machine. The CLI and the server share them;
the server takes overrides from `sdloom serve --limit key=value`.

A value over a limit is refused before any work with a LimitError naming the limit.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import LimitError, SdloomError


@dataclass(frozen=True)
class Limits:
    max_side: int = 4096  # pixels, width or height of one image (also the hires target)
    max_pixels: int = 4096 * 4096  # pixels of one image
    max_batch_pixels: int = 8 * 1024 * 1024  # width·height·batch_size: what one sampling call holds
    max_images: int = 256  # batch_size · n_iter
    max_batch_size: int = 64
    max_steps: int = 1000
    max_prompt_bytes: int = 64 * 1024  # UTF-8 bytes of a prompt or negative prompt
    max_prompt_chunks: int = 32  # 75-token chunks of one prompt (2400 tokens)
    max_body_bytes: int = 64 * 1024 * 1024  # HTTP request body
    max_image_pixels: int = 6144 * 6144  # an input image, checked before it is decoded

    def with_overrides(self, items: list[str] | None) -> Limits:
        """`key=value` strings → a copy with those limits changed."""
        names = {f.name for f in fields(self)}
        out = self
        for item in items or []:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise SdloomError(f"unknown limit {item!r}; limits: {', '.join(sorted(names))}")
            try:
                v = int(value)
            except ValueError:
                raise SdloomError(f"limit {key} takes an integer, got {value!r}") from None
            if v < 1:
                raise SdloomError(f"limit {key} must be ≥ 1, got {v}")
            out = replace(out, **{key: v})
        return out

    def check(self, name: str, value: int, limit_name: str) -> None:
        """Raise LimitError when value exceeds the named limit."""
        limit = getattr(self, limit_name)
        if value > limit:
            raise LimitError(f"{name} {value} is over the limit {limit_name}={limit}")


DEFAULT_LIMITS = Limits()
