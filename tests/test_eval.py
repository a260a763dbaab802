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
