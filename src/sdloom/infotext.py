"""A1111's `parameters` text: write it in A1111's layout, parse it back, store it in PNGs."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import SdloomError

ORDER = ["Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
         "Face restoration", "Size", "Model hash", "Model", "FP8 weight",
         "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
         "Variation seed strength", "Seed resize from", "Denoising strength",
         "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Init image hash",
         "RNG", "Tiling"]
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(v: object) -> str:
    """A1111's quoting: JSON-quote values containing ',', newline or ':'."""
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if any(c in s for c in ",\n:") else s


def _fmt(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else str(v)
    return str(v)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Prompt, optional "Negative prompt:" line, then "Key: value, …" in A1111's key order."""
    keys = [k for k in ORDER if k in params] + [k for k in params if k not in ORDER
                                                 and k != "Version"]
    if "Version" in params:
        keys.append("Version")
    line = ", ".join(f"{k}: {quote(_fmt(params[k]))}" for k in keys if params[k] is not None)
    neg = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{neg}\n{line}"


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters: {"Prompt", "Negative prompt", key: value, …};
    "Size" is also split into "Size-1" / "Size-2". Values stay strings."""
    lines = text.strip().split("\n")
    res: dict[str, str] = {}
    params_line = lines[-1] if lines else ""
    if len(_PARAM.findall(params_line)) >= 3:
        lines = lines[:-1]
    else:
        params_line = ""
    prompt, negative, in_neg = [], [], False
    for ln in lines:
        if ln.startswith("Negative prompt:"):
            in_neg = True
            ln = ln[len("Negative prompt:"):].strip()
        (negative if in_neg else prompt).append(ln)
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for k, v in _PARAM.findall(params_line):
        v = _unquote(v.strip())
        res[k] = v
        m = re.fullmatch(r"(\d+)x(\d+)", v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
    return res


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> Path:
    """PNG with the `parameters` text chunk, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if infotext:
        try:
            infotext.encode("latin-1")
            info.add_text("parameters", infotext)
        except UnicodeEncodeError:  # A1111 (through Pillow) writes iTXt for non-Latin-1 text
            info.add_itxt("parameters", infotext)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_infotext(path: str | Path) -> str | None:
    try:
        with Image.open(path) as im:
            im.load()
            text = im.info.get("parameters")
            if text is None and hasattr(im, "text"):
                text = im.text.get("parameters")
            if text is None:
                exif = im.getexif().get_ifd(0x8769).get(0x9286)  # EXIF UserComment
                if isinstance(exif, bytes):
                    text = exif[8:].decode("utf-16-be" if exif.startswith(b"UNICODE")
                                           else "latin-1", errors="ignore") or None
                elif isinstance(exif, str):
                    text = exif
            return text
    except FileNotFoundError:
        raise SdloomError(f"no such image: {path}") from None
    except OSError as e:
        raise SdloomError(f"cannot read image {path}: {e}") from None


_HASHES: dict[tuple[str, int, float], str] = {}


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:10]
    return _HASHES[key]
