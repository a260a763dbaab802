"""The A1111 options sdloom has (`/sdapi/v1/options`, `override_settings`): each value checked
and normalised before it is used or kept, the --vae-dir listing sd_vae names from, and the
--device list (a worker per device)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import SdloomError
from .guard import log

SAMPLE_FORMATS = ("png", "jpg", "jpeg", "webp")
CLIP_SKIP_MAX = 12  # A1111's "Clip skip" slider range is 1..12


def _int_option(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SdloomError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")
    try:
        f = float(v)
        n = int(f)
    except (ValueError, OverflowError):
        raise SdloomError(f"{name} must be an integer from {lo} to {hi}, not {v!r}") from None
    if n != f or not lo <= n <= hi:
        raise SdloomError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")
    return n


def _samples_format(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in SAMPLE_FORMATS:
        raise SdloomError("samples_format must be png, jpg or webp")
    return v.lower()


def _sd_vae(v: Any) -> str:
    """"Automatic" and "None" (the model's own VAE, as sdloom has no per-model VAE files) or a
    name from --vae-dir, which check_options looks up."""
    if v in (None, ""):
        return "Automatic"
    if not isinstance(v, str):
        raise SdloomError("sd_vae must be a VAE name")
    return v


# the options sdloom has: each value is checked (and normalised) before it is used or kept,
# so one request can never store a value that makes later requests fail
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "CLIP_stop_at_last_layers": lambda v: _int_option("CLIP_stop_at_last_layers", v, 1,
                                                      CLIP_SKIP_MAX),
    "samples_format": _samples_format,
    "eta_noise_seed_delta": lambda v: _int_option("eta_noise_seed_delta", v, 0, 2 ** 32),
    "sd_vae": _sd_vae,
    # A1111's "Live preview display period": every N steps; -1 (or 0) = no preview
    "show_progress_every_n_steps": lambda v: _int_option("show_progress_every_n_steps", v,
                                                         -1, 1000),
    "show_progress_type": lambda v: _choice("show_progress_type", v,
                                            ("Approx cheap", "Full"),
                                            "(Approx NN and TAESD need weights sdloom lacks)"),
    "live_previews_image_format": lambda v: _choice("live_previews_image_format",
                                                    str(v).lower(), ("png", "jpeg", "webp")),
}


def _choice(name: str, v: Any, allowed: tuple[str, ...], why: str = "") -> str:
    if v not in allowed:
        raise SdloomError(f"{name} must be one of {', '.join(allowed)}, got {v!r} {why}"
                          .rstrip())
    return v


HANDLED_ELSEWHERE = {"sd_model_checkpoint"}  # read by the routes themselves
_REPORTED: set[str] = set()


def check_options(values: dict[str, Any], vaes: dict[str, Path] | None = None
                  ) -> dict[str, Any]:
    """The options sdloom knows, checked; the others are left out (A1111 has hundreds) and
    each named once in the log. `vaes`: the names sd_vae may take besides Automatic and None
    (Server.vaes)."""
    for k in values:
        if k not in OPTIONS and k not in HANDLED_ELSEWHERE and k not in _REPORTED:
            _REPORTED.add(k)
            log.warning("option %r is not one sdloom has; ignored", k[:100])
    out = {k: OPTIONS[k](v) for k, v in values.items() if k in OPTIONS}
    vae = out.get("sd_vae")
    if vae not in (None, "Automatic", "None") and vae not in (vaes or {}):
        raise SdloomError(f"sd_vae: VAE not found: {vae!r}; GET /sdapi/v1/sd-vae lists them")
    return out


VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def list_vaes(folder: Path | None) -> dict[str, Path]:
    """VAE files directly in --vae-dir by file name, as A1111's sd_vae lists them."""
    if folder is None or not folder.is_dir():
        return {}
    return {f.name: f for f in sorted(folder.iterdir())
            if f.suffix.lower() in VAE_SUFFIXES and f.is_file()}


# ---------------------------------------------------------------------- the server
def devices_of(device: str) -> list[str]:
    """`--device`: one device, a comma-separated list (a worker each), or `all` (every CUDA
    device; the default device when there is none)."""
    if device == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["auto"]
    out = [d.strip() for d in str(device).split(",") if d.strip()]
    if not out:
        raise SdloomError("--device names no device")
    return out
