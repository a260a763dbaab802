"""One registry of image upscalers, named as A1111 names them: "None", "Lanczos", "Nearest",
sdloom's embedded upscalers whose files are in assets/ (docs/embedded-model.md: the compact
ESRGAN "sdloom-emoji-esrgan-x4" ships; the latent x4 "sdloom-emoji-x4" is listed once a GPU
run has trained one), and every model file in the upscaler folder by its stem:
ESRGAN-family networks
(models/esrgan.py), SD x4 upscaler checkpoints (families/x4_upscaler.py, told by shapes) and
LDSR models (families/ldsr.py): a file, or a subfolder named as the entry holding A1111's
`model.ckpt` / `model.safetensors` (its models/LDSR/ folder) or a diffusers LDSR folder.

`upscale(image, name, width, height)` is what extras, the CLI and the hires fix call. A model
scales by its factor repeatedly (at most 3 passes, A1111's Upscaler.upscale) until the image
reaches or exceeds width×height, then Lanczos resizes to exactly width×height. Loaded models
are cached per file (path, size, mtime) and device.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import LimitError, NotFoundError, SdloomError
from .models import esrgan

BUILTIN = ("None", "Lanczos", "Nearest")
# the embedded upscalers, each listed when its file exists; the kind is told by shapes
_ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED: tuple[tuple[str, Path], ...] = tuple(
    (name, _ASSETS / f"{name}.safetensors") for name in ("sdloom-emoji-esrgan-x4",
                                                          "sdloom-emoji-x4"))
MAX_PASSES = 3  # A1111 Upscaler.upscale
TILE, TILE_OVERLAP = 192, 8  # A1111's ESRGAN_tile / ESRGAN_tile_overlap defaults
# SD x4: tiles of the model's native 128 low-res pixels (512 out); no prompt, diffusers'
# default noise level, 20 DDIM steps (diffusers' published scheduler is DDIM, 75 steps)
X4_TILE, X4_OVERLAP, X4_STEPS, X4_SAMPLER = 128, 16, 20, "DDIM"
LDSR_STEPS = 100  # A1111's ldsr_steps default (its DDIM, eta 1: families/ldsr.py)
SUFFIXES = (*esrgan.SUFFIXES, ".ckpt")
CACHE_SIZE = 2


@dataclass(frozen=True)
class Upscaler:
    """An entry of the list: a built-in resampler (path None) or a model file."""
    name: str
    path: Path | None = None
    scale: int | None = None  # the model's factor, None if built in or unreadable
    x4: bool = False  # an SD x4 upscaler checkpoint (a diffusion model), not an ESRGAN network
    ldsr: bool = False  # an LDSR model (file or folder)

    @property
    def is_model(self) -> bool:
        return self.path is not None


_scales: dict[tuple[str, int, int], tuple[int | None, bool, bool]] = {}


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _is_x4(path: Path) -> bool:
    """Whether a file is an SD x4 upscaler, from its tensor names and shapes."""
    from .checkpoints.load import open_file
    from .families.x4_upscaler import X4UpscalerFamily
    try:
        return X4UpscalerFamily().claims(open_file(path).shapes)
    except SdloomError:
        return False


def _ldsr_factor(path: Path) -> int | None:
    """The factor of an LDSR model file or diffusers folder (from shapes or vqvae/config.json);
    None when it is not one."""
    from .checkpoints.load import open_file
    from .families.ldsr import LDSRFamily, detect, vq_config_from_diffusers
    try:
        if path.is_dir():
            vc = json.loads((path / "vqvae" / "config.json").read_text())
            return vq_config_from_diffusers(vc).downscale
        if path.suffix.lower() not in (".ckpt", ".safetensors"):  # .pth/.pt: ESRGAN's
            return None
        shapes = open_file(path).shapes
        return detect(shapes).vae.downscale if LDSRFamily().claims(shapes) else None
    except (SdloomError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _ldsr_in(folder: Path) -> Path | None:
    """The model an upscaler subfolder holds: a diffusers LDSR folder itself, or A1111's
    models/LDSR layout (model.safetensors or model.ckpt; project.yaml is not read)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        if isinstance(index, dict) and index.get("_class_name") == "LDMSuperResolutionPipeline":
            return folder
    except (OSError, ValueError):
        pass
    return next((folder / n for n in ("model.safetensors", "model.ckpt")
                 if (folder / n).is_file()), None)


def _scale_of(path: Path) -> tuple[int | None, bool, bool]:
    """(factor, is an SD x4 upscaler, is LDSR) of a model file; (None, False, False) if
    unreadable."""
    key = _key(path)
    if key not in _scales:
        f = _ldsr_factor(path)
        if f is not None:
            _scales[key] = (f, False, True)
        elif _is_x4(path):
            _scales[key] = (4, True, False)
        else:
            try:
                _scales[key] = (esrgan.file_config(path).scale, False, False)
            except SdloomError:
                _scales[key] = (None, False, False)  # listed; using it gives the reason
    return _scales[key]


def describe(path: str | Path, name: str | None = None) -> Upscaler:
    """The entry of one model file (or LDSR folder), named `name` (default: its stem); its
    kind and factor are told by tensor shapes."""
    path = Path(path)
    return Upscaler(name or path.stem, path, *_scale_of(path))


def available(upscaler_dir: str | Path | None = None) -> list[Upscaler]:
    """None, Lanczos, Nearest, the embedded upscalers that are installed, then the model files
    of upscaler_dir (.pth/.pt/.safetensors, and .ckpt for SD x4 upscalers; sorted; for one
    stem in several formats, .safetensors wins)."""
    out = [Upscaler(n) for n in BUILTIN]
    out += [describe(path, name) for name, path in EMBEDDED if path.is_file()]
    taken = {e.name for e in out}
    d = Path(upscaler_dir) if upscaler_dir else None
    if d is None or not d.is_dir():
        return out
    files: dict[str, Path] = {}
    for p in sorted(d.iterdir(), key=lambda p: (p.stem.lower(), p.suffix != ".safetensors")):
        if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file():
            if p.stem not in files and p.stem not in taken:
                files[p.stem] = p
    for p in sorted(d.iterdir()):  # subfolders: LDSR models, named by the folder
        if (p.is_dir() and not p.name.startswith(".")
                and p.name not in files and p.name not in taken):
            if (inner := _ldsr_in(p)) is not None:
                files[p.name] = inner
    entries = [describe(p, stem) for stem, p in files.items()]
    # a .ckpt is listed only when it is a diffusion upscaler (other .ckpt files are SD
    # models), and a subfolder only when it holds an LDSR model
    return out + [e for e in entries if e.ldsr or (e.path.parent == d and (
        e.x4 or e.path.suffix.lower() != ".ckpt"))]


def find(name: str, upscaler_dir: str | Path | None = None) -> Upscaler:
    """The entry called `name` (exact, else case-insensitive); NotFoundError lists the names."""
    if not isinstance(name, str):
        raise SdloomError("upscaler name must be a string")
    entries = available(upscaler_dir)
    for match in (lambda e: e.name == name, lambda e: e.name.lower() == name.lower()):
        for e in entries:
            if match(e):
                return e
    shown = name if len(name) <= 80 else name[:80] + "…"
    raise NotFoundError(f"upscaler not found: {shown!r}; available: "
                        + ", ".join(e.name for e in entries))


_cache: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_lock = threading.Lock()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """The network of an upscaler file on `device`, cached (the last CACHE_SIZE used)."""
    path = Path(path)
    dev = torch.device(device) if device is not None else default_device()
    key = (*_key(path), str(dev))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        if any(_scale_of(path)[1:]):  # a diffusion upscaler (SD x4, LDSR)
            from .checkpoints.load import load_model
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
            model = load_model(path, dtype=dtype, device=dev).model.eval()
        else:
            model = esrgan.load_upscaler(path).to(dev)
        _cache[key] = model
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return model


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → [1, 3, H, W] in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def to_image(x: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [0, 1] → RGB image, clamped and rounded to the nearest level."""
    a = (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


def run_model(model: torch.nn.Module, img: Image.Image, *, tile: int = TILE,
              overlap: int = TILE_OVERLAP) -> Image.Image:
    """One pass of a network over an RGB image (tiled, models/esrgan.upscale_tensor)."""
    return to_image(esrgan.upscale_tensor(model, to_tensor(img), tile=tile, overlap=overlap))


def run_x4(model: torch.nn.Module, img: Image.Image, *, prompt: str = "",
           noise_level: int | None = None, steps: int = X4_STEPS, seed: int = 0,
           tile: int = X4_TILE, overlap: int = X4_OVERLAP) -> Image.Image:
    """One 4× pass of an SD x4 upscaler over an RGB image (tiled over the low-res image)."""
    from .families.x4_upscaler import DEFAULT_NOISE_LEVEL, upscale_image
    x = to_tensor(img) * 2 - 1
    y = upscale_image(model, x, prompt=prompt, steps=steps, sampler=X4_SAMPLER, seed=seed,
                      noise_level=DEFAULT_NOISE_LEVEL if noise_level is None else noise_level,
                      tile=tile, overlap=overlap)
    return to_image((y + 1) / 2)


def run_ldsr(model: torch.nn.Module, img: Image.Image, scale: float, *,
             steps: int | None = None, seed: int = 0) -> Image.Image:
    """One LDSR pass as A1111's (ldsr_model_arch.super_resolution): the image resized by
    scale/f with Lanczos (sides rounded up), then the model's f× (f = 4 for LDSR), so one pass
    reaches `scale`."""
    from .families.ldsr import upscale_image
    f = model.config.vae.downscale
    if scale != f:
        img = img.resize((max(1, math.ceil(img.width * scale / f)),
                          max(1, math.ceil(img.height * scale / f))), Image.LANCZOS)
    y = upscale_image(model, to_tensor(img) * 2 - 1, seed=seed,
                      steps=LDSR_STEPS if steps is None else steps)
    return to_image((y + 1) / 2)


def upscale(image: Image.Image, name: str, width: int, height: int, *,
            upscaler_dir: str | Path | None = None, device: str | torch.device | None = None,
            tile: int = TILE, overlap: int = TILE_OVERLAP,
            max_pixels: int | None = None) -> Image.Image:
    """`image` resized to exactly width×height by the upscaler `name` (A1111 semantics:
    "None" and "Lanczos" resize with Lanczos, "Nearest" with nearest neighbour; a model runs
    up to 3 passes until the size is reached, or once when the size is unchanged, then
    Lanczos to the exact size). Transparency is resized with Lanczos and kept. `max_pixels`
    bounds every intermediate image (LimitError before the pass that would exceed it)."""
    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
        raise SdloomError(f"upscale target must be positive integers, got {width}x{height}")
    up = find(name, upscaler_dir)
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    rgb = image.convert("RGB")
    size = (width, height)
    if not up.is_model:
        resample = Image.NEAREST if up.name == "Nearest" else Image.LANCZOS
        out = rgb.resize(size, resample) if rgb.size != size else rgb.copy()
    else:
        model = load(up.path, device)
        s = 4 if up.x4 else up.scale if up.ldsr else model.config.scale
        out = rgb
        for i in range(MAX_PASSES):
            if out.width >= width and out.height >= height and (i > 0 or size != rgb.size):
                break
            if up.ldsr:  # LDSR resizes its input first and reaches the target in one pass
                s = max(width / out.width, height / out.height)
            if max_pixels is not None and out.width * out.height * s * s > max_pixels:
                raise LimitError(f"upscaling {out.width}x{out.height} with {up.name} (×{s}) "
                                 f"makes {out.width * s}x{out.height * s} pixels, over the limit "
                                 f"of {max_pixels}")
            before = out.size
            out = (run_x4(model, out) if up.x4 else run_ldsr(model, out, s) if up.ldsr
                   else run_model(model, out, tile=tile, overlap=overlap))
            if out.size == before:
                break
        if out.size != size:
            out = out.resize(size, Image.LANCZOS)
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(alpha.resize(size, Image.LANCZOS) if alpha.size != size else alpha)
    return out


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's "upscale by" target (Upscaler.upscale): int(side·scale) rounded down to a
    multiple of 8; a side under 8 pixels is kept unrounded (A1111 would ask for 0)."""
    def side(n: int) -> int:
        t = int(n * scale)
        return t // 8 * 8 if t >= 8 else max(1, t)
    return side(width), side(height)
