"""A1111's `parameters` text: write it in A1111's layout, parse it back, store it in images.

Layout (A1111 `processing.create_infotext`):

    <prompt, any number of lines>
    Negative prompt: <negative, any number of lines>      ← only when non-empty
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, …

Number formatting. A1111 writes `str(value)`, so the text depends on how the value reached it:
the web UI sends JSON numbers (7.0 arrives as the int 7 → "CFG scale: 7"), the API's pydantic
floats give "CFG scale: 7.0". We write integral floats as integers ("7", "Hires upscale: 2"),
which is what the web UI, the source of most infotexts in the wild, writes; other floats use
Python's shortest repr ("7.5", "0.75"), as A1111 does.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import SdloomError
from .io import atomic_write_bytes, atomic_write_text

# A1111's fixed keys, in its order; every other key follows in insertion order, then these last
ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
         "Face restoration", "Size", "Model hash", "Model", "FP8 weight",
         "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
         "Variation seed strength", "Seed resize from", "Denoising strength",
         "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
         "Token merging ratio hr", "Init image hash", "RNG", "Tiling")
LAST = ("Version", "User")

# A1111's infotext_utils.re_param and re_imagesize
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"

# What A1111's parse_generation_parameters assumes for keys an infotext leaves out
# (e.g. no "RNG" means GPU noise, no "Clip skip" means 1). Values as strings, like parsed ones.
A1111_DEFAULTS = {
    "Clip skip": "1", "Hires resize-1": "0", "Hires resize-2": "0",
    "Hires sampler": "Use same sampler", "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "", "Hires negative prompt": "", "Mask mode": "Inpaint masked",
    "Masked content": "original", "Inpaint area": "Whole picture", "Masked area padding": "32",
    "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": "0",
    "Schedule min sigma": "0", "Schedule rho": "0", "VAE Encoder": "Full", "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def format_value(v: object) -> str:
    """A parameter value as text: integral floats without ".0" (see the module docstring)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return str(v)


def quote(v: object) -> str:
    """A1111's infotext_utils.quote: JSON-quote a value that contains ',', a newline or ':'.

    Also quoted, where A1111 writes the value bare and then misreads it: a value starting with
    '"' or with leading/trailing spaces. A1111's parser reads both forms the same way."""
    s = format_value(v)
    if any(c in s for c in ",\n:") or s.startswith('"') or s != s.strip():
        return json.dumps(s, ensure_ascii=False)
    return s


def unquote(s: str) -> str:
    """A1111's infotext_utils.unquote: JSON-decode a quoted value; leave anything else as is."""
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        try:
            out = json.loads(s)
            return out if isinstance(out, str) else s
        except ValueError:
            return s
    return s


def _omit(key: str, v: object) -> bool:
    if v is None:
        return True
    if key == "Clip skip":  # A1111 writes it only when it changes something (> 1)
        try:
            return int(v) <= 1  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
    return False


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Prompt, "Negative prompt: …" (when non-empty), then "Key: value, …" in A1111's order.

    None values are left out; a value equal to its key is written as the bare key (A1111)."""
    keys = ([k for k in ORDER if k in params]
            + [k for k in params if k not in ORDER and k not in LAST]
            + [k for k in LAST if k in params])
    parts = []
    for k in keys:
        v = params[k]
        if _omit(k, v):
            continue
        parts.append(k if k == v else f"{k}: {quote(v)}")
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def parse_infotext(text: str, *, defaults: bool = False) -> dict[str, str]:
    """A1111's parse_generation_parameters: {"Prompt", "Negative prompt", key: value, …}.

    The last line is the parameter line when PARAM_RE finds at least 3 pairs in it. Values stay
    strings, as in A1111 (it converts them only when filling UI fields). A "WxH" value also
    gives "<key>-1" = W and "<key>-2" = H, as in A1111; unlike A1111 the "<key>" itself is kept
    too. Each prompt line is stripped (A1111). defaults=True adds A1111_DEFAULTS for missing keys.
    """
    *lines, last = text.strip().split("\n")
    if len(PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in PARAM_RE.findall(last):
        v = unquote(v) if v[:1] == '"' else v
        res[k] = v
        m = SIZE_RE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
    if defaults:
        for k, v in A1111_DEFAULTS.items():
            res.setdefault(k, v)
    return res


# ---------------------------------------------------------------- images with infotext

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _user_comment(text: str) -> bytes:
    # EXIF UserComment: 8-byte charset prefix, then the text (piexif's "unicode" = UTF-16-BE)
    return b"UNICODE\0" + text.encode("utf-16-be")


def _decode_user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw or None
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16") or None
        # no BOM: the zero high bytes of ASCII characters tell the byte order
        le = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if le else "utf-16-be", errors="replace") or None
    if head == b"ASCII\0\0\0":
        return body.decode("ascii", errors="replace").rstrip("\0") or None
    return raw.decode("utf-8", errors="replace").strip("\0") or None


def encode_image(image: Image.Image, fmt: str = "png", infotext: str | None = None,
                 *, quality: int = 80) -> bytes:
    """Encode as PNG (text chunk `parameters`), JPEG or WEBP (EXIF UserComment), like A1111."""
    fmt = fmt.lower().lstrip(".")
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            # add_text writes tEXt, or iTXt (UTF-8) when the text is not Latin-1: A1111 relies
            # on exactly this Pillow behaviour
            info.add_text("parameters", infotext)
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt in ("jpg", "jpeg", "webp"):
        exif = Image.Exif()
        if infotext:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(infotext)
        if fmt != "webp" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha
        image.save(buf, format="WEBP" if fmt == "webp" else "JPEG", quality=quality, exif=exif)
    else:
        raise SdloomError(f"unsupported image format {fmt!r}: use png, jpg or webp")
    return buf.getvalue()


def save_image(image: Image.Image, path: str | Path, infotext: str | None = None) -> Path:
    """Save with the infotext embedded (format from the suffix), atomically; return the path."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SdloomError(f"cannot save {path}: use a .png, .jpg or .webp name")
    return atomic_write_bytes(path, encode_image(image, fmt, infotext))


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> Path:
    """PNG with a `parameters` text chunk, written atomically (temp file + os.replace)."""
    return atomic_write_bytes(Path(path), encode_image(image, "png", infotext))


def infotext_of(image: Image.Image) -> str | None:
    """The infotext of an opened image: PNG `parameters` chunk, else EXIF UserComment."""
    text = image.info.get("parameters")
    if isinstance(text, str) and text:
        return text
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a broken EXIF block is no infotext, not a failure to read the image
        return None
    return _decode_user_comment(raw) if raw else None


def read_infotext(source: str | Path | bytes) -> str | None:
    """The infotext stored in an image file (or its bytes); None when it has none."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return infotext_of(im)
    except FileNotFoundError:
        raise SdloomError(f"cannot read image {name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SdloomError(f"cannot read image {name}: {e}") from None


# ---------------------------------------------------------------- model hashes

_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()
HASH_CACHE_ENV = "SDLOOM_CACHE_DIR"


def _cache_file() -> Path:
    """Where hashes are kept across runs (A1111's cache.json): $SDLOOM_CACHE_DIR, else
    $XDG_CACHE_HOME/sdloom, else ~/.cache/sdloom."""
    root = os.environ.get(HASH_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "sdloom")
    return Path(root) / "hashes.json"


def _read_cache() -> dict:
    try:
        d = json.loads(_cache_file().read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: it is only a cache


def known_sha256(path: str | Path) -> str | None:
    """The file's sha256 if it was hashed before (memory or the disk cache), else None —
    never reads the file (A1111 lists a checkpoint's sha256 only once it has one)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return None
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
        hit = _read_cache().get(str(p))
        if isinstance(hit, dict) and (hit.get("size"), hit.get("mtime_ns")) == key[1:] \
                and isinstance(hit.get("sha256"), str):
            _HASHES[key] = hit["sha256"]
            return hit["sha256"]
    return None


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks. Cached by (path, size, mtime) in memory
    and on disk, so a multi-GB checkpoint is hashed once, not on every run."""
    known = known_sha256(path)
    if known is not None:
        return known
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    with _HASH_LOCK:
        _HASHES[key] = h.hexdigest()
        cache = _read_cache()
        cache[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _HASHES[key]}
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_cache_file(), json.dumps(cache, indent=1), durable=False)
        except OSError:
            pass  # a read-only home: hashed again next run, nothing else changes
    return _HASHES[key]


def model_hash(path: str | Path) -> str:
    """A1111's "Model hash" (CheckpointInfo.shorthash): the first 10 hex digits of the sha256."""
    return file_sha256(path)[:10]
