"""High-resolution targets for the embedded upscaler: the Noto emoji art rendered from its
vector source, so that 512² targets carry detail a 128² image lacks.

Noto Color Emoji's only bitmap strike is 136 px, so a 512² render of the font is an upscaled
bitmap (emoji_data.py). The same art as SVG comes in the npm package `@svgmoji/noto` (one
sprite, `sprites/all.svg`, a nested <svg id="1F600"> per emoji; Noto Emoji's images are
Apache-2.0, the package MIT). Fetch it once at build time (`npm pack @svgmoji/noto`, then
unpack the tarball) and render it with the PyPI package `resvg-py`; neither is needed at run
time nor by training, which reads the PNGs.

`python -m sdloom.training.emoji_svg_data OUT_DIR --sprite package/sprites/all.svg` writes
NNNNN.png (size², default 512), metadata.jsonl (file_name, text, codepoints, holdout) and
build.json. Emoji are matched to the `emoji` package's fully-qualified set by codepoints
(ignoring VS16), captioned as in emoji_data, laid out as there (ink cropped, centred on
white); only the art drawn on Noto's 128-unit canvas is used (flags come from another source
in the sprite and differ from the font's waved flags). `--count N` takes N evenly spaced
emoji in codepoint order; every `--holdout-every`-th of them is marked holdout.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from ..errors import SdloomError
from .emoji_data import (VS16, _check_out_dir, _fresh_sibling, _jsonl, _swap_in, codepoints,
                         emoji_entries, square_on_white)

SVG_NS = "http://www.w3.org/2000/svg"
NOTO_CANVAS = "0 0 128 128"  # the viewBox of Noto's own emoji art
OVERSAMPLE = 1.25  # render larger, then Lanczos down: the crop to the ink is never upscaled
LICENSE = ("Noto Emoji images: Apache License 2.0 (googlefonts/noto-emoji); sprite packaging "
           "@svgmoji/noto: MIT")


def _key(cps: str) -> str:
    """'1F3CB-1F3FD-200D-2642-FE0F' or '1F3CB 1F3FD 200D 2642 FE0F' → '1F3CB 1F3FD 200D 2642'."""
    return " ".join(c.lstrip("0") or "0" for c in cps.replace("-", " ").upper().split()
                    if c != f"{ord(VS16):X}")


def read_sprite(path: Path) -> dict[str, str]:
    """{codepoint key: standalone SVG text} of the sprite's emoji drawn on Noto's canvas."""
    ET.register_namespace("", SVG_NS)
    ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise SdloomError(f"cannot read the emoji sprite {path}: {e}") from None
    out = {}
    for el in root:
        if el.tag == f"{{{SVG_NS}}}svg" and el.get("id") and el.get("viewBox") == NOTO_CANVAS:
            out[_key(el.get("id"))] = ET.tostring(el, encoding="unicode")
    if not out:
        raise SdloomError(f"{path} holds no <svg id=…> emoji on a {NOTO_CANVAS} canvas: "
                          "expected @svgmoji/noto's sprites/all.svg")
    return out


def render_svg(svg: str, size: int) -> Image.Image:
    """One emoji SVG → size×size RGB, laid out as the font renders (emoji_data)."""
    try:
        import resvg_py
    except ImportError:
        raise SdloomError("rendering SVG emoji needs the `resvg-py` package (build time only): "
                          "pip install resvg-py") from None
    n = round(size * OVERSAMPLE)
    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=n, height=n))
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise SdloomError("the SVG draws nothing")
    return square_on_white(rgba.crop(box), size)


def build_svg_dataset(out_dir: Path, sprite: Path, size: int = 512, count: int | None = None,
                      holdout_every: int = 8) -> dict:
    """Render `count` evenly spaced emoji of the sprite into out_dir (replaced as a whole)."""
    if size < 8 or holdout_every < 2 or (count is not None and count < 1):
        raise SdloomError("size must be ≥ 8, holdout_every ≥ 2 and count ≥ 1")
    out_dir, sprite = Path(out_dir).resolve(), Path(sprite)
    _check_out_dir(out_dir)
    svgs = read_sprite(sprite)
    found = [x for x in emoji_entries() if _key(x.codepoints) in svgs]
    matched = len(found)
    if count is not None and count < len(found):
        found = [found[i * len(found) // count] for i in range(count)]
    tmp = _fresh_sibling(out_dir)
    try:
        rows = []
        for i, x in enumerate(found):
            name = f"{i:05d}.png"
            render_svg(svgs[_key(x.codepoints)], size).save(tmp / name, format="PNG",
                                                            optimize=True)
            rows.append({"file_name": name, "text": x.text, "codepoints": codepoints(x.emoji),
                         "holdout": i % holdout_every == holdout_every - 1})
        (tmp / "metadata.jsonl").write_text(_jsonl(rows), encoding="utf-8")
        stats = {"rendered": len(rows), "holdout": sum(r["holdout"] for r in rows),
                 "in_sprite": len(svgs), "matched": matched}
        pkg = sprite.parent.parent / "package.json"
        source = json.loads(pkg.read_text()) if pkg.is_file() else {}
        info = {"size": size, "source": f"{source.get('name', '?')} {source.get('version', '?')}",
                "sprite_sha256": hashlib.sha256(sprite.read_bytes()).hexdigest(),
                "license": LICENSE, "stats": stats}
        (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line: build the set and print counts and time."""
    ap = argparse.ArgumentParser(prog="python -m sdloom.training.emoji_svg_data",
                                 description="Render emoji targets from Noto's SVG art.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sprite", type=Path, required=True,
                    help="sprites/all.svg of the npm package @svgmoji/noto")
    ap.add_argument("--size", type=int, default=512, help="image side (default 512)")
    ap.add_argument("--count", type=int, help="only N evenly spaced emoji (default: all)")
    ap.add_argument("--holdout-every", type=int, default=8,
                    help="mark every N-th image holdout (default 8)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = build_svg_dataset(a.out_dir, a.sprite, a.size, a.count, a.holdout_every)
    except SdloomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"rendered {s['rendered']} of {s['matched']} matched ({s['in_sprite']} in the "
          f"sprite), held out "
          f"{s['holdout']} in {time.perf_counter() - t0:.1f} s -> {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
