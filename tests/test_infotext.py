"""A1111 infotext: exact layout, A1111's parser semantics, round trips, PNG/JPEG/WEBP storage."""
import hashlib
import json
import os
import struct

import pytest
from PIL import Image

from sdloom.errors import SdloomError
from sdloom.infotext import (file_sha256, format_infotext, model_hash, parse_infotext, quote,
                             read_infotext, save_image, save_png)


def test_layout_order_quoting_and_omissions():
    params = {  # deliberately out of order; extra keys keep their own order after the fixed ones
        "Version": "v1.10.1", "Hires upscale": 2.0, "Seed": 1, "Model": "name",
        "Lora hashes": "a: 0123, b: 4567", "Steps": 20, "Clip skip": 1, "VAE": None,
        "Size": "512x512", "Schedule type": "Karras", "Model hash": "0123456789",
        "CFG scale": 7.0, "Sampler": "DPM++ 2M", "Denoising strength": 0.75, "Hires steps": 10,
    }
    text = format_infotext("a cat", "", params)
    assert text == (
        "a cat\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        "Size: 512x512, Model hash: 0123456789, Model: name, Denoising strength: 0.75, "
        'Hires upscale: 2, Lora hashes: "a: 0123, b: 4567", Hires steps: 10, Version: v1.10.1')


def test_negative_line_clip_skip_and_floats():
    text = format_infotext("p", "bad, ugly", {"Steps": 5, "CFG scale": 7.5, "Clip skip": 2,
                                               "Seed": 3})
    assert text == "p\nNegative prompt: bad, ugly\nSteps: 5, CFG scale: 7.5, Seed: 3, Clip skip: 2"


def test_quote_matches_a1111_and_guards_values_it_would_misread():
    assert quote("Euler a") == "Euler a"
    assert quote("a, b") == '"a, b"' and quote("x: y") == '"x: y"'
    assert quote("l1\nl2") == '"l1\\nl2"'
    assert quote("猫, 犬") == '"猫, 犬"'  # ensure_ascii=False, as A1111
    assert quote('"x"') == '"\\"x\\""' and quote(" x") == '" x"'


def test_parses_a1111_text():
    text = ("girl with an artist's beret, (coquettish), detailed\n"
            "Negative prompt: ugly, fat\n"
            "  [blurry], bad anatomy  \n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, "
            'Model hash: 45dee52b, Lora hashes: "add_detail: 7c6bad76eb54", '
            'Hires upscaler: Latent, Seed resize from: 256x384, Note: "say \\"hi\\"\\nbye"')
    p = parse_infotext(text)
    assert p["Prompt"] == "girl with an artist's beret, (coquettish), detailed"
    assert p["Negative prompt"] == "ugly, fat\n[blurry], bad anatomy"
    assert p["Steps"] == "20" and p["Sampler"] == "Euler a" and p["Seed"] == "965400086"
    assert (p["Size"], p["Size-1"], p["Size-2"]) == ("512x768", "512", "768")
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == ("256", "384")
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["Note"] == 'say "hi"\nbye'
    assert "Clip skip" not in p and parse_infotext(text, defaults=True)["Clip skip"] == "1"
    assert parse_infotext(text, defaults=True)["RNG"] == "GPU"


def test_last_line_needs_three_pairs_to_be_parameters():
    p = parse_infotext("a photo\nstyle: anime, mood: calm")
    assert p["Prompt"] == "a photo\nstyle: anime, mood: calm" and "style" not in p
    p = parse_infotext("Steps: 20, Sampler: Euler, Seed: 1")
    assert p["Prompt"] == "" and p["Seed"] == "1"


def test_round_trip():
    prompt = "a cat, (sitting:1.2)\non a mat: red"
    negative = "blurry\nNegative-ish, lowres"
    params = {"Steps": 30, "Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential",
              "CFG scale": 6.5, "Seed": 4294967293, "Size": "640x384", "Model hash": "abc",
              "Model": "my, odd: model", "Variation seed": 12, "Variation seed strength": 0.3,
              "Denoising strength": 0.5, "Clip skip": 2, "RNG": "CPU", "Mask blur": 4,
              "Lora hashes": "x: 1, y: 2", "TI hashes": 'emb: "q"', "Weird": '"quoted"',
              "Padded": "  sp  ", "Unicode": "猫", "Version": "sdloom 0.1"}
    p = parse_infotext(format_infotext(prompt, negative, params))
    assert p["Prompt"] == prompt and p["Negative prompt"] == negative
    for k, v in params.items():
        assert p[k] == (str(v) if not isinstance(v, float) or not v.is_integer() else str(int(v)))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind, data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def test_png_text_chunks_latin1_and_unicode(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    p1 = save_png(img, tmp_path / "a.png", "café, Steps: 1")
    p2 = save_png(img, tmp_path / "b.png", "猫\nSteps: 1, Seed: 2, Size: 8x8")
    chunks1, chunks2 = _png_chunks(p1.read_bytes()), _png_chunks(p2.read_bytes())
    assert (b"tEXt", b"parameters\0" + "café, Steps: 1".encode("latin-1")) in chunks1
    assert any(k == b"iTXt" and d.startswith(b"parameters\0") for k, d in chunks2)
    assert read_infotext(p1) == "café, Steps: 1"
    assert read_infotext(p2) == "猫\nSteps: 1, Seed: 2, Size: 8x8"
    assert read_infotext(p2.read_bytes()) == "猫\nSteps: 1, Seed: 2, Size: 8x8"
    assert read_infotext(save_png(img, tmp_path / "c.png", None)) is None
    assert Image.open(p1).getpixel((0, 0)) == (10, 20, 30)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png"]  # no temp files left


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_exif_user_comment(tmp_path, suffix):
    text = "猫, café\nSteps: 3, Seed: 4, Size: 8x8"
    path = save_image(Image.new("RGBA", (8, 8)), tmp_path / f"x{suffix}", text)
    assert read_infotext(path) == text


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "out.png", "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (4, 4)), path, "new")
    monkeypatch.undo()
    assert read_infotext(path) == "old" and os.listdir(tmp_path) == ["out.png"]


def test_read_errors(tmp_path):
    with pytest.raises(SdloomError, match="no such file"):
        read_infotext(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SdloomError, match="cannot read image"):
        read_infotext(tmp_path / "bad.png")


def test_model_hash_streams_and_caches(tmp_path):
    f = tmp_path / "m.safetensors"
    data = os.urandom((1 << 20) * 2 + 12345)  # crosses the 1 MiB read blocks
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    assert model_hash(f) == hashlib.sha256(data).hexdigest()[:10]
    st = f.stat()
    changed = bytes([data[0] ^ 1]) + data[1:]
    f.write_bytes(changed)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: cached value
    assert model_hash(f) == hashlib.sha256(data).hexdigest()[:10]
    # a new process (memory cache empty) reads the disk cache and never re-reads the file
    import sdloom.infotext as it
    it._HASHES.clear()
    assert model_hash(f) == hashlib.sha256(data).hexdigest()[:10]
    assert str(f.resolve()) in json.loads(it._cache_file().read_text())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_hash(f) == hashlib.sha256(changed).hexdigest()[:10]

