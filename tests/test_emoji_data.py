"""The emoji data set: captions, hold-out selection, rendering, determinism and the loader."""
import collections
import json
import random

import numpy as np
import pytest
from PIL import Image

from sdloom.errors import SdloomError
from sdloom.training.emoji_data import (DEFAULT_FONT, MODIFIERS, TONES, TWO_PERSON, _Renderer,
                                        base_key, build_emoji_dataset, caption, emoji_entries,
                                        main, select_holdout, tones_of)


@pytest.fixture
def noto_font():
    """Rendering needs the Noto Color Emoji font: without it the test fails saying what to
    install, never skips."""
    if not DEFAULT_FONT.is_file():
        pytest.fail(f"rendering needs {DEFAULT_FONT}: run `sudo apt-get install "
                    f"fonts-noto-color-emoji` (scripts/install.sh --test does it when run as "
                    f"root)", pytrace=False)


needs_font = pytest.mark.usefixtures("noto_font")

# a few of each kind: plain, toned, flag, two-tone ZWJ, keycap, the base of a toned set
SAMPLE = ["😀", "👍", "👍🏽", "🇨🇴", "🧑🏽‍🤝‍🧑🏾", "#️⃣", "🐈", "🏂",
          "🏂🏽"]


@pytest.fixture(scope="module")
def entries():
    return emoji_entries()


def n_modifiers(e: str) -> int:
    return sum(c in MODIFIERS for c in e)


# ---- captions (pure) ----

def test_known_captions():
    assert caption("😀") == "grinning face"
    assert caption("👍") == "thumbs up"
    t = caption("👍🏽")
    assert "thumbs up" in t and "medium skin tone" in t
    assert t == "thumbs up, medium skin tone"
    assert caption("🇨🇴") == "flag of colombia"
    assert caption("🏴󠁧󠁢󠁳󠁣󠁴󠁿") == "flag of scotland"
    # the tone sits mid-name in CLDR ('man: medium-light skin tone, curly hair'); it moves last
    t = caption("👨🏼‍🦱")
    assert t.startswith("man curly hair") and t.endswith(", medium-light skin tone")
    assert caption("🧑🏽‍🤝‍🧑🏾") == \
        "people holding hands, medium skin tone, medium-dark skin tone"
    assert caption("🧑🏽‍🤝‍🧑🏽") == "people holding hands, medium skin tone"
    assert caption("👞") == "man's shoe"  # curly apostrophe made plain
    assert caption("🅰️") == "a button blood type"
    assert caption("💩").startswith("pile of poo, ")  # aliases that add words are kept


def test_all_captions_clean_and_unique(entries):
    texts = [x.text for x in entries]
    assert len(entries) > 3500
    assert len(set(texts)) == len(texts)
    for t in texts:
        assert t == t.lower() and t == t.strip() and "  " not in t
        assert not set(t) & set(":_()!.’\""), t
        assert t.count(", ") <= 4, t


def test_toned_caption_is_base_caption_plus_tone(entries):
    by_key = {base_key(x.emoji): x.text for x in entries if not tones_of(x.emoji)}
    n = 0
    for x in entries:
        if n_modifiers(x.emoji) == 1 and base_key(x.emoji) in by_key:
            assert x.text == f"{by_key[base_key(x.emoji)]}, {tones_of(x.emoji)[0]}"
            n += 1
    assert n > 1000


def test_entries_sorted_and_fully_qualified(entries):
    keys = [[ord(c) for c in x.emoji] for x in entries]
    assert keys == sorted(keys)
    assert "☝️" in {x.emoji for x in entries} and "☝" not in {x.emoji for x in entries}


# ---- hold-out selection (pure, on the full emoji list) ----

def test_holdout_selection_properties(entries):
    held = select_holdout(entries)
    toned = [x.emoji for x in entries if n_modifiers(x.emoji) == 1]
    assert held <= set(toned)
    assert 0.08 <= len(held) / len(toned) <= 0.12
    keys = [base_key(e) for e in held]
    assert len(keys) == len(set(keys))  # one tone per base at most
    assert not any(k[0] in TWO_PERSON for k in keys)
    training = [e for e in toned if e not in held]
    tones_by_base = collections.defaultdict(set)
    bases_by_tone = collections.defaultdict(set)
    for e in training:
        tones_by_base[base_key(e)].add(tones_of(e)[0])
        bases_by_tone[tones_of(e)[0]].add(base_key(e))
    for e in held:
        k, tone = base_key(e), tones_of(e)[0]
        assert tone not in tones_by_base[k]
        assert tones_by_base[k] == set(TONES) - {tone}  # the base's other four tones train
        assert len(bases_by_tone[tone] - {k}) >= 50  # the tone trains with many other bases
    counts = collections.Counter(tones_of(e)[0] for e in held)
    assert set(counts) == set(TONES) and max(counts.values()) - min(counts.values()) <= 1


def test_holdout_selection_deterministic(entries):
    held = select_holdout(entries)
    shuffled = [x.emoji for x in entries]
    random.Random(0).shuffle(shuffled)
    assert select_holdout(shuffled) == held
    assert select_holdout(list(entries)) == held


def test_holdout_needs_all_five_tones():
    thumbs = [f"👍{m}" for m in MODIFIERS]
    assert len(select_holdout(thumbs)) == 1
    assert select_holdout(thumbs[:4]) == set()
    assert select_holdout(["💏" + m for m in MODIFIERS]) == set()  # two people: excluded


# ---- errors and loader (pure) ----

def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(SdloomError, match="fonts-noto-color-emoji"):
        build_emoji_dataset(tmp_path / "out", font=tmp_path / "missing.ttf")
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SdloomError, match="refusing"):
        build_emoji_dataset(tmp_path, only=["😀"])
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---- rendering (needs the font) ----

@needs_font
def test_renderer_rejects_blank_and_several_glyphs():
    r = _Renderer(DEFAULT_FONT, 64)
    assert r.render(" ") == (None, "blank")
    assert r.render("😀😀") == (None, "several glyphs")
    img, reason = r.render("😀")
    assert reason == "" and img.size == (64, 64) and img.mode == "RGB"


@needs_font
def test_build_small(tmp_path):
    out = tmp_path / "set"
    stats = build_emoji_dataset(out, size=64, only=SAMPLE)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert stats["rendered"] == len(rows) and stats["rendered"] + stats["skipped"] == len(SAMPLE)
    by_text = {r["text"]: r for r in rows}
    assert by_text["grinning face"]["codepoints"] == "1F600"
    assert "thumbs up, medium skin tone" in by_text
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(len(rows))]
    assert all(set(r) == {"file_name", "text", "codepoints", "holdout", "variants"}
               for r in rows)
    # what `sdloom eval --prompts name|alias` prompts with, the caption itself left out
    assert by_text["keycap #, hash"]["variants"] == ["keycap #", "hash"]
    assert by_text["grinning face"]["variants"] == []  # no alias; keywords not asked for
    pictures, corners_checked = set(), 0
    for r in rows:
        with Image.open(out / r["file_name"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            a = np.asarray(im).astype(int)
        assert a.std() > 10  # not blank
        pictures.add(a.tobytes())
        if r["codepoints"] in ("1F600", "1F44D", "1F408"):  # round-ish shapes
            for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
                assert a[y, x].min() >= 245, (r["text"], a[y, x])  # white corners
            corners_checked += 1
    assert corners_checked == 3
    # no two captions share a picture (Noto draws the snowboarder's tones like the base)
    assert len(pictures) == len(rows)
    held = [json.loads(line) for line in (out / "holdout.jsonl").read_text().splitlines()]
    assert held == [r for r in rows if r["holdout"]]
    info = json.loads((out / "build.json").read_text())
    assert info["size"] == 64 and info["font_pixel_size"] == 109


def test_caption_variants_with_keywords(tmp_path):
    from sdloom.training.emoji_data import caption_variants
    kw = {"1F34E": ["apple", "fruit", "red apple"], "1F44D": ["+1", "thumbs up"]}
    assert caption_variants("red apple", "1F34E", kw) == ["apple", "fruit"]
    assert caption_variants("thumbs up, thumbs", "1F44D", kw) == ["thumbs up", "thumbs", "+1"]
    # toned forms: CLDR has no entry for the sequence, tones stay on name and alias
    assert caption_variants("thumbs up, thumbs, dark skin tone", "1F44D 1F3FF", kw) == [
        "thumbs up, dark skin tone", "thumbs, dark skin tone"]
    assert caption_variants("red apple", "1F34E") == []


def test_specific_keywords_leave_out_words_that_many_emoji_share(tmp_path, capsys):
    from sdloom.training.emoji_data import main, specific_keywords
    kw = {"1F34E": ["apple", "fruit", "red"], "1F34F": ["apple", "fruit", "green"],
          "1F34C": ["banana", "fruit"], "2764": ["heart", "red"], "1F30B": ["volcano"]}
    # counted over the data set's emoji only (no volcano here); VS16 does not matter
    cps = ["1F34E", "1F34F", "1F34C", "2764 FE0F", "1F44D 1F3FF"]
    assert specific_keywords(kw, cps, 2) == {
        "1F34E": ["apple", "red"], "1F34F": ["apple", "green"], "1F34C": ["banana"],
        "2764": ["heart", "red"], "1F30B": ["volcano"]}
    assert specific_keywords(kw, cps, 1)["1F34E"] == []
    assert specific_keywords(kw, cps, 3) == kw
    assert main([str(tmp_path / "x"), "--keyword-max-emoji", "2"]) == 2
    assert "needs --keywords" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@needs_font
def test_build_is_deterministic(tmp_path):
    def files(d):
        return {p.name: p.read_bytes() for p in sorted(d.iterdir())}
    build_emoji_dataset(tmp_path / "a", size=32, only=SAMPLE)
    build_emoji_dataset(tmp_path / "b", size=32, only=SAMPLE)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # rebuilding in place replaces the folder whole: no stale files or cache survive
    (tmp_path / "a" / "images.npy").write_bytes(b"a stale cache")
    build_emoji_dataset(tmp_path / "a", size=32, only=SAMPLE[:2])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        ["00000.png", "00001.png", "build.json", "holdout.jsonl", "metadata.jsonl"]


@needs_font
def test_holdout_marked_and_switchable(tmp_path):
    tones = [f"👍{m}" for m in MODIFIERS] + ["👍"]
    build_emoji_dataset(tmp_path / "h", size=16, only=tones)
    rows = [json.loads(x) for x in (tmp_path / "h" / "metadata.jsonl").read_text().splitlines()]
    caps, mask = [r["text"] for r in rows], [bool(r.get("holdout")) for r in rows]
    assert len(rows) == 6 and sum(mask) == 1
    assert "thumbs up" in caps and caps[mask.index(True)].startswith("thumbs up, ")
    build_emoji_dataset(tmp_path / "n", size=16, only=tones, holdout=False)
    rows = [json.loads(x) for x in (tmp_path / "n" / "metadata.jsonl").read_text().splitlines()]
    assert not any(r.get("holdout") for r in rows)
    assert (tmp_path / "n" / "holdout.jsonl").read_text() == ""


@needs_font
def test_main(tmp_path, capsys):
    assert main([str(tmp_path / "m"), "--size", "32", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "rendered 3" in out and "held out 0" in out
    assert len(list((tmp_path / "m").glob("*.png"))) == 3
