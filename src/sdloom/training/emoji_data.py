"""The embedded model's data set: Noto Color Emoji rendered with Pillow, captioned from CLDR names.

`python -m sdloom.training.emoji_data OUT_DIR [--size 128]` writes NNNNN.png, metadata.jsonl
(file_name, text, codepoints, holdout) and holdout.jsonl. The font (SIL OFL 1.1) comes from
Debian's fonts-noto-color-emoji at build time; names come from the `emoji` package.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from ..errors import SdloomError

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
TONES = ["light skin tone", "medium-light skin tone", "medium skin tone",
         "medium-dark skin tone", "dark skin tone"]
_TONE_RE = re.compile(r"(?:medium-)?(?:light|dark|medium)(?:-(?:light|dark))? skin tone")


def caption(cldr: str) -> str:
    """':thumbs_up_medium-dark_skin_tone:' → 'thumbs up, medium-dark skin tone'."""
    text = cldr.strip(":").replace("_", " ").lower()
    text = re.sub(r"[“”\"’'!]", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    m = _TONE_RE.search(text)
    if m and m.start() > 0:
        base = text[:m.start()].rstrip(" ,:")
        tones = _TONE_RE.findall(text)
        text = base + ", " + " and ".join(dict.fromkeys(tones))
    return text


def entries() -> list[tuple[str, str]]:
    """(emoji, caption) for every fully-qualified emoji, in codepoint order."""
    import emoji
    out = []
    for e, d in emoji.EMOJI_DATA.items():
        if d.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        out.append((e, caption(d["en"])))
    out.sort(key=lambda t: [ord(c) for c in t[0]])
    # keep captions unique: the first emoji with a caption wins
    seen, uniq = set(), []
    for e, c in out:
        if c not in seen:
            seen.add(c)
            uniq.append((e, c))
    return uniq


def select_holdout(items: list[tuple[str, str]]) -> set[str]:
    """Person/gesture × skin-tone combinations kept out of training to measure composition.

    For every base with all five single-tone variants, one variant is held out, the tone
    rotating from base to base; each held-out base and tone still appears in training."""
    by_base: dict[str, dict[str, str]] = {}
    for e, c in items:
        if ", " in c and c.split(", ", 1)[1] in TONES:
            base, tone = c.split(", ", 1)
            by_base.setdefault(base, {})[tone] = e
    held = set()
    for k, base in enumerate(sorted(b for b, t in by_base.items() if len(t) == 5)):
        if k % 2:  # every other base: about 10% of the skin-tone variants
            continue
        held.add(by_base[base][TONES[(k // 2) % 5]])
    return held


def render(e: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """One emoji as size×size RGB on white, or None if it is not a single glyph."""
    canvas = Image.new("RGBA", (400, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), e, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    w, h = box[2] - box[0], box[3] - box[1]
    if w > 1.4 * max(h, 1) or h < 40:  # several glyphs side by side, or an empty sliver
        return None
    glyph = canvas.crop(box)
    side = max(w, h)
    sq = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    sq.paste(glyph, ((side - w) // 2, (side - h) // 2))
    bg = Image.new("RGB", (side, side), (255, 255, 255))
    bg.paste(sq, mask=sq.split()[-1])
    return bg.resize((size, size), Image.LANCZOS)


def build_emoji_dataset(out_dir: Path, size: int = 128, font: Path | None = None,
                        limit: int | None = None, only: list[str] | None = None) -> dict:
    font_path = font or FONT
    if not font_path.exists():
        raise SdloomError(f"emoji font not found at {font_path}: install Debian's "
                          "fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji)")
    if not features.check("raqm"):
        raise SdloomError("Pillow was built without raqm: emoji sequences cannot be laid out")
    f = ImageFont.truetype(str(font_path), 109)  # the only size this bitmap font offers
    items = entries()
    held = select_holdout(items)
    if only is not None:
        items = [t for t in items if t[0] in only]
    if limit is not None:
        items = items[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    for e, c in items:
        img = render(e, f, size)
        if img is None:
            skipped += 1
            continue
        name = f"{len(rows):05d}.png"
        img.save(out_dir / name, optimize=False)
        rows.append({"file_name": name, "text": c,
                     "codepoints": " ".join(f"{ord(ch):X}" for ch in e), "holdout": e in held})
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "holdout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                   if r["holdout"]))
    cache = out_dir / "images.npy"
    cache.unlink(missing_ok=True)
    return {"rendered": len(rows), "skipped": skipped, "holdout": sum(r["holdout"] for r in rows)}


def load_emoji_arrays(d: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(uint8 [N,H,W,3], captions, holdout mask), cached as images.npy beside the PNGs."""
    rows = [json.loads(x) for x in (d / "metadata.jsonl").read_text().splitlines() if x]
    cache = d / "images.npy"
    if cache.exists():
        arr = np.load(cache)
    else:
        arr = np.stack([np.asarray(Image.open(d / r["file_name"]).convert("RGB")) for r in rows])
        np.save(cache, arr)
    return arr, [r["text"] for r in rows], np.array([r["holdout"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="render the emoji data set")
    ap.add_argument("out_dir")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--font", type=Path)
    a = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        stats = build_emoji_dataset(Path(a.out_dir), a.size, a.font)
    except SdloomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{stats['rendered']} rendered, {stats['skipped']} skipped, {stats['holdout']} held out "
          f"in {time.perf_counter() - t:.1f} s → {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
