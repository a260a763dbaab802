"""Prompt-adherence evaluation: the feature space, nearest neighbours and the whole loop."""
import json

import numpy as np
from PIL import Image, ImageDraw

from sdloom.checkpoints.save import save_model
from sdloom.eval.adherence import (evaluate, features, nearest, read_dataset,
                                   reference_features)
from sdloom.pipelines.engine import Engine

from tiny import TINY_SD1, tiny_model

COLORS = [(220, 30, 30), (30, 180, 60), (40, 60, 220), (240, 220, 30), (0, 0, 0)]


def shapes() -> list[Image.Image]:
    out = []
    for i, rgb in enumerate(COLORS):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, 56, 56 - 4 * i), fill=rgb)
        out.append(im)
    return out


def test_features_and_nearest():
    imgs = shapes()
    bank = features(imgs)
    assert bank.shape == (5, 32 * 32 * 3) and bank.min() >= 0 and bank.max() <= 1
    assert list(nearest(bank, bank)) == [0, 1, 2, 3, 4]
    noisy = [Image.fromarray(np.clip(np.asarray(im, np.int16) + 20 * (k % 2), 0, 255)
                             .astype(np.uint8)) for k, im in enumerate(imgs[::-1])]
    assert list(nearest(features(noisy), bank)) == [4, 3, 2, 1, 0]
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparency is white, as in the data
    assert np.allclose(features([rgba]), 1.0)


def test_bad_metadata_is_one_clear_error(tmp_path):
    import pytest

    from sdloom.errors import SdloomError
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"text": 1}\n')
    with pytest.raises(SdloomError, match=r"metadata.jsonl line 2: .*KeyError: 'file_name'"):
        read_dataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(SdloomError, match="lists no images"):
        read_dataset(tmp_path)


def test_evaluate_runs_batched_and_reads_images_npy(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rows = []
    for i, im in enumerate(shapes()):
        im.save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"shape {i}", "holdout": i == 4})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    eng = Engine.load(path, device="cpu", precision="fp32")
    kw = dict(steps=2, progress=False)
    res = evaluate(eng, data, grid_path=tmp_path / "grid.png", batch=3, **kw)
    assert res["train"]["n"] == 4 and res["holdout"]["n"] == 1
    # batched and one-at-a-time give the same images, hence the same numbers
    one = evaluate(eng, data, grid_path=tmp_path / "grid1.png", batch=1, **kw)
    for split in ("train", "holdout"):
        assert one[split]["nearest"] == res[split]["nearest"]
        assert one[split]["top1"] == res[split]["top1"] == sum(
            g == i for g, i in zip(res[split]["nearest"], ([0, 1, 2, 3], [4])[split == "holdout"])
        ) / res[split]["n"]
    a = np.asarray(Image.open(tmp_path / "grid.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "grid1.png"), np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2, np.abs(a - b).max()
    assert a.std() > 5  # real images, not a blank grid
    assert evaluate(eng, data, limit=2, batch=3, **kw)["train"]["n"] == 2
    # a fresh images.npy is the reference bank; a stale one is ignored
    entries = read_dataset(data)
    pngs = reference_features(data, entries)
    assert np.array_equal(pngs, features(shapes()))
    rolled = np.stack([np.asarray(im) for im in shapes()])[[1, 2, 3, 4, 0]]
    np.save(data / "images.npy", rolled)
    import os
    t = (data / "metadata.jsonl").stat().st_mtime
    os.utime(data / "images.npy", (t + 10, t + 10))
    assert np.array_equal(reference_features(data, entries), pngs[[1, 2, 3, 4, 0]])
    os.utime(data / "images.npy", (t - 10, t - 10))
    assert np.array_equal(reference_features(data, entries), pngs)


# five discs; the last is a held-out composition. Captions as emoji_data writes them.
DISCS = [("red disc, scarlet", "1F534"), ("green disc", "1F7E2"),
         ("blue disc, navy, dark skin tone", "1F535"), ("yellow disc, lemon", "1F7E1 FE0F"),
         ("black disc, dark skin tone", "26AB")]
CLDR_XML = """<ldml><annotations>
<annotation cp="🔴">circle | red</annotation><annotation cp="🔴" type="tts">red circle</annotation>
<annotation cp="🟢">circle | green</annotation>
<annotation cp="🟡">circle | yellow</annotation>
<annotation cp="🔵" type="tts">blue circle</annotation>
</annotations></ldml>"""


def test_prompt_kinds_from_captions_and_cldr(tmp_path):
    import pytest

    from sdloom.errors import SdloomError
    from sdloom.eval.adherence import (Entry, caption_parts, prompts_of,
                                       read_cldr_keywords)
    assert caption_parts("thumbs up, thumbs, medium-dark skin tone") == (
        "thumbs up", ["thumbs"], ["medium-dark skin tone"])
    assert caption_parts("kiss man man, light skin tone, dark skin tone") == (
        "kiss man man", [], ["light skin tone", "dark skin tone"])
    (tmp_path / "en.xml").write_text(CLDR_XML)
    kw = read_cldr_keywords(tmp_path / "en.xml")
    # tts lines are short names, not keywords; VS16 is ignored when matching
    assert kw == {"1F534": ["circle", "red"], "1F7E2": ["circle", "green"],
                  "1F7E1": ["circle", "yellow"]}
    es = [Entry(tmp_path / "x.png", t, False, cp) for t, cp in DISCS]
    got = {k: [prompts_of(e, k, kw) for e in es] for k in ("caption", "name", "alias", "keyword")}
    assert got["caption"] == [[t] for t, _ in DISCS]
    assert got["name"] == [["red disc"], ["green disc"], ["blue disc, dark skin tone"],
                           ["yellow disc"], ["black disc, dark skin tone"]]
    assert got["alias"] == [["scarlet"], [], ["navy, dark skin tone"], ["lemon"], []]
    assert got["keyword"] == [["circle", "red"], ["circle", "green"], [],
                              ["circle", "yellow"], []]
    with pytest.raises(SdloomError, match="prompts must be one of"):
        prompts_of(es[0], "shortname")
    with pytest.raises(SdloomError, match="unicode-cldr-core"):
        read_cldr_keywords(tmp_path / "missing.xml")


def test_evaluate_scores_each_prompt_kind(tmp_path, monkeypatch):
    """A stand-in generator that draws a chosen data-set image per prompt: the hits, misses,
    prompt lists and seeds are then known exactly."""
    import sdloom.pipelines.generate as gen
    data = tmp_path / "d"
    data.mkdir()
    imgs = shapes()
    rows = []
    for i, (im, (text, cp)) in enumerate(zip(imgs, DISCS)):
        im.save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": text, "codepoints": cp, "holdout": i == 4})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "en.xml").write_text(CLDR_XML)
    draws = {"red disc": 0, "green disc": 2, "blue disc, dark skin tone": 2, "yellow disc": 3,
             "black disc, dark skin tone": 4, "scarlet": 0, "navy, dark skin tone": 0,
             "lemon": 3, "circle": 1, "red": 3, "green": 1, "yellow": 3}
    seeds = []

    def fake_generate(engine, params):
        seeds.append(params.seed)
        return gen.GenerationResult(images=[imgs[draws[p]] for p in params.all_prompts],
                                    **{k: None for k in gen.GenerationResult.__dataclass_fields__
                                       if k != "images"})
    monkeypatch.setattr(gen, "generate", fake_generate)
    kw = dict(batch=3, progress=False, keywords=tmp_path / "en.xml")
    name = evaluate(None, data, prompts="name", **kw)
    assert name["train"]["prompts"] == ["red disc", "green disc", "blue disc, dark skin tone",
                                        "yellow disc"]
    assert name["train"]["top1"] == 0.75 and name["holdout"]["top1"] == 1.0
    assert seeds == [0, 3, 0]  # seed + index of the prompt within its split
    (miss,) = name["train"]["misses"]
    assert miss["prompt"] == "green disc" and miss["nearest"] == DISCS[2][0]
    assert miss["distance_own"] > 5 > 0.1 > miss["distance_nearest"]  # it drew image 2 itself
    alias = evaluate(None, data, prompts="alias", splits=("train",), **kw)
    assert list(alias) == ["train"] and alias["train"]["emoji"] == 3
    assert alias["train"]["prompts"] == ["scarlet", "navy, dark skin tone", "lemon"]
    assert alias["train"]["top1"] == 2 / 3
    # "circle" names three discs: drawing the green one is a hit; "red" drawn yellow is not
    words = evaluate(None, data, prompts="keyword", **kw)
    assert words["train"]["prompts"] == ["circle", "red", "green", "yellow"]
    assert words["train"]["top1"] == 0.75 and words["train"]["emoji"] == 3
    assert [m["prompt"] for m in words["train"]["misses"]] == ["red"]
    assert words["holdout"]["n"] == 0
    # the default is the training caption, one prompt per emoji
    seeds.clear()
    draws.update({t: i for i, (t, _) in enumerate(DISCS)})
    cap = evaluate(None, data, limit=2, **kw)
    assert cap["train"]["prompts"] == [DISCS[0][0], DISCS[2][0]]  # evenly spaced
    assert cap["train"]["top1"] == 1.0 and cap["train"]["nearest"] == [0, 2]


def test_eval_cli_flags():
    import pytest

    from sdloom.cli import build_parser
    p = build_parser()
    a = p.parse_args(["eval", "--data", "d"])
    assert (a.prompts, a.keywords, a.split, a.show_misses) == ("caption", None, "both", 10)
    assert a.grid is None  # no picture written unless asked for
    a = p.parse_args(["eval", "--data", "d", "--prompts", "keyword", "--keywords", "k.xml",
                      "--split", "train"])
    assert (a.prompts, a.keywords, a.split) == ("keyword", "k.xml", "train")
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--data", "d", "--prompts", "shortname"])
