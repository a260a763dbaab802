"""The embedded model's data set: every fully-qualified emoji rendered with Noto Color Emoji.

`python -m sdloom.training.emoji_data OUT_DIR [--size 128]` writes NNNNN.png, metadata.jsonl
(file_name, text, codepoints, holdout), holdout.jsonl and build.json. Names come from the
`emoji` package (CLDR short names); the font comes from Debian's fonts-noto-color-emoji.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image, ImageDraw, ImageFont, features

from ..errors import SdloomError

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PIXEL_SIZE = 109  # the font's only bitmap strike; any other size is "invalid pixel size"
TONES = ("light skin tone", "medium-light skin tone", "medium skin tone",
         "medium-dark skin tone", "dark skin tone")
MODIFIERS = {chr(0x1F3FB + i): tone for i, tone in enumerate(TONES)}
ZWJ, VS16 = "\u200d", "\ufe0f"
MAX_ALIASES = 2
# Emoji that take one modifier yet show two people; their mixed-tone ZWJ forms stay in
# training, so holding out one of their tones would leak the combination.
TWO_PERSON = {chr(c) for c in (0x1F48F, 0x1F491, 0x1F46B, 0x1F46C, 0x1F46D, 0x1F91D,
                               0x1F93C, 0x1F46F)}
# Two regional indicators that name no region: the font draws its "unknown flag" glyph.
UNKNOWN_FLAG = "\U0001F1FF\U0001F1FF"
_TONE_WORDS = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji with its caption and Emoji version."""
    emoji: str
    text: str
    version: float

    @property
    def codepoints(self) -> str:
        return codepoints(self.emoji)


def codepoints(e: str) -> str:
    """'👍🏽' → '1F44D 1F3FD'."""
    return " ".join(f"{ord(c):X}" for c in e)


def _order(e: str) -> list[int]:
    return [ord(c) for c in e]


def base_key(e: str) -> str:
    """The sequence without skin-tone modifiers and VS16: shared by a base and its toned forms."""
    return "".join(c for c in e if c not in MODIFIERS and c != VS16)


def tones_of(e: str) -> list[str]:
    """Distinct skin tones in the order they appear ('kiss: person, person, light, dark')."""
    return list(dict.fromkeys(MODIFIERS[c] for c in e if c in MODIFIERS))


def _clean(name: str) -> str:
    """':Côte_d’Ivoire:' → "côte d'ivoire"; ':ON!_arrow:' → 'on arrow'."""
    text = name.strip(":").replace("_", " ").replace("’", "'").replace(".", "").lower()
    # keep letters (accents too), digits, and the marks that carry meaning in names
    text = re.sub(r"[^\w\s'&#*-]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_flag(e: str) -> bool:
    """Country flags (regional-indicator pairs) and subdivision flags (black flag + tags)."""
    if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in e):
        return True
    tags = e[1:]
    return e[0] == "\U0001F3F4" and bool(tags) and all(0xE0020 <= ord(c) <= 0xE007F for c in tags)


def _unicode_name(e: str) -> str:
    """Fallback caption from unicodedata (Python's tables may predate the emoji)."""
    skip = set(MODIFIERS) | {ZWJ, VS16}
    names = [unicodedata.name(c, "").lower() for c in e
             if c not in skip and not 0xE0000 <= ord(c) <= 0xE007F]
    names = [n for n in names if n]
    return ", ".join(names) if names else f"emoji {codepoints(e).lower()}"


def _words(text: str) -> set[str]:
    """Words folded to plain ASCII, so "côte d'ivoire" and 'cote divoire' count as the same."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return set(re.split(r"[\s-]+", folded.replace("'", ""))) - {""}


def _aliases(aliases: list[str], text: str) -> list[str]:
    """Aliases that add words to the caption: at most MAX_ALIASES, no shortcode oddities."""
    words = _words(text)
    out: list[str] = []
    for a in aliases:
        a = _clean(a)
        # ':clock330:', ':+1:', ':a:', ':flag_for_x:' and long Unicode-style names add noise
        if (len(a) < 3 or re.search(r"\d", a) or a.startswith("flag for")
                or len(a.split()) > 4):
            continue
        new = _words(a) - words
        # ':thumbsup:' only glues the caption's words together
        if not new or a.replace(" ", "") in text.replace(" ", ""):
            continue
        out.append(a)
        words |= new
        if len(out) == MAX_ALIASES:
            break
    return out


@functools.cache
def _emoji_data() -> tuple[dict, dict[str, dict], tuple[str, ...]]:
    """The `emoji` package's table, its untoned entries by base_key, all fully-qualified emoji."""
    try:
        import emoji as emoji_pkg
    except ImportError:
        raise SdloomError("the emoji data set needs the `emoji` package: "
                          "pip install emoji") from None
    data = emoji_pkg.EMOJI_DATA
    fq = tuple(sorted((e for e, d in data.items()
                       if d.get("status") == emoji_pkg.STATUS["fully_qualified"]), key=_order))
    bases = {base_key(e): data[e] for e in fq if not any(c in MODIFIERS for c in e)}
    return data, bases, fq


def caption(e: str) -> str:
    """Caption of one emoji: CLDR name (+ aliases of its base), then its skin tones."""
    data, bases, _ = _emoji_data()
    d = data.get(e)
    if d and d.get("en"):
        # the tones move to the end; a bare modifier (a component) keeps its own name
        name = _clean(_TONE_WORDS.sub(" ", _clean(d["en"]))) or _clean(d["en"])
    else:
        name = _unicode_name(e)
    if _is_flag(e):
        name = f"flag of {name}"
    # toned forms carry no aliases of their own: borrow the base's, so the caption of a toned
    # emoji is exactly its base's caption plus the tone
    base = bases.get(base_key(e), d) or {}
    tones = [t for t in tones_of(e) if t != name]
    return ", ".join([name] + _aliases(list(base.get("alias", [])), name) + tones)


def emoji_entries() -> list[EmojiEntry]:
    """Every fully-qualified emoji in the `emoji` package, in codepoint order."""
    data, _, fq = _emoji_data()
    return [EmojiEntry(e, caption(e), float(data[e].get("E", 0))) for e in fq]


def select_holdout(entries: Iterable[EmojiEntry | str]) -> set[str]:
    """Person/gesture × skin-tone combinations to keep out of training (deterministic)."""
    # Candidates: one-person bases with all five single-tone forms among `entries`. Every other
    # candidate (codepoint order) gives up one tone, the tone rotating across bases, so about
    # 10% of single-tone forms are held out while each base's four other tones, and each
    # tone's other bases, stay in training: the combination is new, its parts are not.
    es = sorted({x.emoji if isinstance(x, EmojiEntry) else x for x in entries}, key=_order)
    by_base: dict[str, dict[str, str]] = {}
    mixed: set[str] = set()
    for e in es:
        mods = [c for c in e if c in MODIFIERS]
        if not mods:
            continue
        key = base_key(e)
        if not key:  # a bare modifier
            continue
        if len(mods) > 1:  # two people in one emoji (holding hands, kiss, …)
            mixed.add(key)
            continue
        by_base.setdefault(key, {})[MODIFIERS[mods[0]]] = e
    bases = [k for k in sorted(by_base, key=_order)
             if len(by_base[k]) == len(TONES) and k not in mixed and k[0] not in TWO_PERSON]
    held = set()
    for k, key in enumerate(bases):
        if k % 2 == 0:
            held.add(by_base[key][TONES[(k // 2) % len(TONES)]])
    return held


class _Renderer:
    """Draws one emoji on a transparent canvas and turns it into a size×size RGB image."""

    def __init__(self, font: Path, size: int):
        if not features.check("raqm"):
            raise SdloomError("Pillow was built without raqm (HarfBuzz layout); without it "
                              "ZWJ sequences, flags and skin tones break into several glyphs. "
                              "Install a Pillow wheel from PyPI, which bundles raqm")
        if not font.is_file():
            raise SdloomError(f"emoji font not found: {font}. Install it with "
                              "`apt-get install fonts-noto-color-emoji` (Debian/Ubuntu) or pass "
                              "--font PATH to NotoColorEmoji.ttf")
        try:
            self.font = ImageFont.truetype(str(font), FONT_PIXEL_SIZE,
                                           layout_engine=ImageFont.Layout.RAQM)
        except OSError as e:
            raise SdloomError(f"cannot load {font} at {FONT_PIXEL_SIZE} px ({e}); "
                              "use Noto Color Emoji (fonts-noto-color-emoji)") from None
        self.size = size
        self.scratch = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        # one glyph's advance: anything laid out wider is several glyphs side by side
        _, top, self.advance, bottom = self._layout("\U0001F600")
        self.height = bottom - top

    def _layout(self, e: str) -> tuple[int, int, int, int]:
        return self.scratch.textbbox((0, 0), e, font=self.font, embedded_color=True)

    def render(self, e: str) -> tuple[Image.Image | None, str]:
        """(image, '') or (None, reason) when the font has no single glyph for `e`."""
        left, top, right, bottom = self._layout(e)
        pad = 4
        canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), e, font=self.font,
                                    embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        if box is None:
            return None, "blank"
        w = box[2] - box[0]
        # one glyph is one advance (136 px) wide; sequences the font lacks fall apart into
        # 2-3 glyphs laid out 272-407 px wide, sometimes with an invisible first glyph
        if right - left > 1.5 * self.advance or w > 1.5 * self.height:
            return None, "several glyphs"
        return square_on_white(canvas.crop(box), self.size), ""


def square_on_white(glyph: Image.Image, size: int) -> Image.Image:
    """An RGBA glyph cropped to its ink, centred on a white square of its longer side,
    Lanczos-resized to size×size RGB (the layout of every image in the emoji data sets)."""
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def _digest(img: Image.Image) -> bytes:
    return hashlib.blake2b(img.tobytes(), digest_size=16).digest()


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier build (or empty)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SdloomError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "metadata.jsonl").exists():
            raise SdloomError(f"{out_dir} is not empty and holds no metadata.jsonl; "
                              "refusing to replace it")


def _fresh_sibling(out_dir: Path) -> Path:
    """An empty folder beside out_dir to build in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp in two renames: readers never see a mix of two builds."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def caption_variants(text: str, codepoints: str,
                     keywords: dict[str, list[str]] | None = None) -> list[str]:
    """Other prompts that name the emoji captioned `text`, as `sdloom eval --prompts` makes
    them (eval/adherence.prompts_of): the short name alone, each alias alone (both with the
    tones of a toned form) and its CLDR keywords; the caption itself excluded."""
    from ..eval.adherence import Entry, prompts_of
    e = Entry(Path(), text, False, codepoints)
    out = [p for kind in ("name", "alias", "keyword") for p in prompts_of(e, kind, keywords)]
    return [p for p in dict.fromkeys(out) if p != text]


def specific_keywords(keywords: dict[str, list[str]], codepoints: list[str],
                      max_emoji: int) -> dict[str, list[str]]:
    """`keywords` without those that name more than `max_emoji` of the emoji `codepoints` (the
    data set's): "face" names a hundred pictures, and trained as a caption it pulls the model
    towards their average rather than towards any one of them."""
    from ..eval.adherence import Entry, prompts_of
    count: dict[str, int] = {}
    for cp in codepoints:
        for w in set(prompts_of(Entry(Path(), "", False, cp), "keyword", keywords)):
            count[w] = count.get(w, 0) + 1
    return {k: [w for w in ws if count.get(w, 0) <= max_emoji] for k, ws in keywords.items()}


def build_emoji_dataset(out_dir: Path, size: int = 128, font: Path | None = None,
                        holdout: bool = True, *, only: list[str] | None = None,
                        limit: int | None = None, keywords: Path | None = None,
                        keyword_max_emoji: int | None = None) -> dict:
    """Render the emoji data set into out_dir (replaced as a whole); returns the counts.
    Every row gets a `variants` column (caption_variants; with CLDR keywords from the
    annotations file `keywords` when given, only those naming at most `keyword_max_emoji` of
    the set's emoji when that is given), which training draws from with
    caption_variants=true."""
    if size < 8:
        raise SdloomError(f"image size must be at least 8, got {size}")
    out_dir, font = Path(out_dir).resolve(), Path(font) if font is not None else DEFAULT_FONT
    _check_out_dir(out_dir)
    renderer = _Renderer(font, size)
    entries = emoji_entries()
    import emoji as emoji_pkg  # importable: emoji_entries() explains a missing package
    if only is not None:
        wanted = set(only)
        entries = [x for x in entries if x.emoji in wanted]
    if limit is not None:
        entries = entries[:limit]

    unknown, _ = renderer.render(UNKNOWN_FLAG)
    unknown_digest = _digest(unknown) if unknown is not None else None
    rendered: list[tuple[EmojiEntry, Image.Image, bytes]] = []
    skipped: list[dict] = []
    for x in entries:
        img, reason = renderer.render(x.emoji)
        if img is not None and _digest(img) == unknown_digest:
            img, reason = None, "fallback glyph"  # e.g. a flag newer than the font
        if img is None:
            skipped.append({"codepoints": x.codepoints, "text": x.text, "reason": reason})
        else:
            rendered.append((x, img, _digest(img)))

    # Identical pictures under different captions (the snowboarder's tones, flags shared by
    # territories) would teach nothing and make identity evaluation ambiguous: keep the oldest
    # emoji, then the shortest name.
    best: dict[bytes, EmojiEntry] = {}
    for x, _, dg in rendered:
        cur = best.get(dg)
        if cur is None or (x.version, len(x.text), _order(x.emoji)) < \
                (cur.version, len(cur.text), _order(cur.emoji)):
            best[dg] = x
    kept = []
    for x, img, dg in rendered:
        if best[dg] is x:
            kept.append((x, img))
        else:
            skipped.append({"codepoints": x.codepoints, "text": x.text,
                            "reason": f"duplicate of {best[dg].codepoints}"})
    skipped.sort(key=lambda r: [int(c, 16) for c in r["codepoints"].split()])

    held = select_holdout(x for x, _ in kept) if holdout else set()
    kw = None
    if keywords is not None:
        from ..eval.adherence import read_cldr_keywords
        kw = read_cldr_keywords(keywords)
        if keyword_max_emoji is not None:
            kw = specific_keywords(kw, [x.codepoints for x, _ in kept], keyword_max_emoji)
    tmp = _fresh_sibling(out_dir)
    try:
        rows = []
        for i, (x, img) in enumerate(kept):
            name = f"{i:05d}.png"
            img.save(tmp / name, format="PNG")
            rows.append({"file_name": name, "text": x.text, "codepoints": x.codepoints,
                         "holdout": x.emoji in held,
                         "variants": caption_variants(x.text, x.codepoints, kw)})
        (tmp / "metadata.jsonl").write_text(_jsonl(rows), encoding="utf-8")
        (tmp / "holdout.jsonl").write_text(_jsonl([r for r in rows if r["holdout"]]),
                                           encoding="utf-8")
        reasons: dict[str, int] = {}
        for r in skipped:
            k = "duplicate" if r["reason"].startswith("duplicate") else r["reason"]
            reasons[k] = reasons.get(k, 0) + 1
        stats = {"rendered": len(rows), "skipped": len(skipped),
                 "holdout": sum(r["holdout"] for r in rows), "skipped_by_reason": reasons}
        # provenance, without timestamps or absolute paths so that a rebuild is byte-identical
        info = {"size": size, "font": font.name,
                "font_sha256": hashlib.sha256(font.read_bytes()).hexdigest(),
                "font_pixel_size": FONT_PIXEL_SIZE, "emoji_package": emoji_pkg.__version__,
                "pillow": PIL.__version__, "stats": stats, "skipped": skipped,
                "keywords": ({"file": Path(keywords).name, "sha256": hashlib.sha256(
                    Path(keywords).read_bytes()).hexdigest(), "max_emoji": keyword_max_emoji}
                             if keywords else None)}
        (tmp / "build.json").write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def main(argv: list[str] | None = None) -> int:
    """Command line: build the data set and print counts and time."""
    ap = argparse.ArgumentParser(prog="python -m sdloom.training.emoji_data",
                                 description="Render the emoji training set (Noto Color Emoji).")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--font", type=Path, help=f"font file (default {DEFAULT_FONT})")
    ap.add_argument("--no-holdout", action="store_true", help="train on every emoji")
    ap.add_argument("--limit", type=int, help="only the first N emoji (for quick checks)")
    ap.add_argument("--keywords", type=Path, metavar="EN_XML",
                    help="CLDR annotations (Debian unicode-cldr-core: /usr/share/unicode/cldr/"
                         "common/annotations/en.xml): keywords join each row's variants")
    ap.add_argument("--keyword-max-emoji", type=int, metavar="N",
                    help="with --keywords: leave out keywords that name more than N of the "
                         "set's emoji (\"face\", \"hand\")")
    a = ap.parse_args(argv)
    if a.keyword_max_emoji is not None and (a.keywords is None or a.keyword_max_emoji < 1):
        print("error: --keyword-max-emoji takes a count of at least 1 and needs --keywords",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        s = build_emoji_dataset(a.out_dir, a.size, a.font, not a.no_holdout, limit=a.limit,
                                keywords=a.keywords, keyword_max_emoji=a.keyword_max_emoji)
    except SdloomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    why = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped_by_reason"].items()))
    print(f"rendered {s['rendered']}, skipped {s['skipped']}" + (f" ({why})" if why else "")
          + f", held out {s['holdout']} in {time.perf_counter() - t0:.1f} s -> {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
