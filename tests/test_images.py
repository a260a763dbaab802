"""Image helpers: tensor ⇄ PIL, A1111 resize modes and grids, masks, names, atomic IO."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdloom.errors import SdloomError
from sdloom.images import (from_pil, image_grid, load_image, mask_from_image, resize_image,
                           to_pil, unique_output_path)
from sdloom.io import atomic_path, atomic_write_bytes


def test_to_pil_layout_clamp_and_rounding():
    x = torch.full((2, 3, 4, 6), -1.0)
    x[0, 0, 1, 5] = 2.0            # clamped to 255
    x[0, 1, 1, 5] = 2 * 127.6 / 255 - 1  # 127.6 → 128 (A1111's truncation would give 127)
    x[1, 2, 3, 0] = 1.0
    a, b = to_pil(x)
    assert a.size == (6, 4) and a.mode == "RGB"
    assert a.getpixel((5, 1)) == (255, 128, 0) and a.getpixel((0, 0)) == (0, 0, 0)
    assert b.getpixel((0, 3)) == (0, 0, 255)


def test_from_pil_values_layout_and_lossless_round_trip():
    arr = np.zeros((2, 256, 3), dtype=np.uint8)
    arr[0, :, 0] = np.arange(256)
    arr[1, :, 2] = np.arange(256)[::-1]
    img = Image.fromarray(arr)
    x = from_pil(img)
    assert x.shape == (1, 3, 2, 256)
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, 255] == 1
    assert x[0, 0, 0, 51].item() == pytest.approx(-0.6, abs=1e-6)
    assert x[0, 2, 1, 0] == 1 and x[0, 1].abs().max() == 1  # channel order R, G, B
    assert np.array_equal(np.asarray(to_pil(x)[0]), arr)  # every level survives
    assert from_pil(img, 64, 8).shape == (1, 3, 8, 64)


def _bands(w=200, h=50):
    """Red, green and blue vertical bands in 1 : 2 : 1 proportions."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4: 3 * w // 4, 1] = 255
    a[:, 3 * w // 4:, 2] = 255
    return Image.fromarray(a)


def _hue(px):
    return "rgb"[int(np.argmax(px))] if max(px) > 128 else "k"


def test_resize_modes_like_a1111():
    src = _bands()  # 200x50, aspect 4
    just = resize_image(src, 64, 64, 0)  # squashed: all three bands visible
    assert [_hue(just.getpixel((x, 32))) for x in (4, 32, 60)] == ["r", "g", "b"]
    crop = resize_image(src, 64, 64, 1)  # 256x64 then centre crop: only the green middle
    assert crop.size == (64, 64)
    assert [_hue(crop.getpixel((x, 32))) for x in (2, 32, 61)] == ["g", "g", "g"]
    fill = resize_image(src, 64, 64, 2)  # 64x16 in the middle, edges stretched above/below
    assert [_hue(fill.getpixel((x, 32))) for x in (4, 32, 60)] == ["r", "g", "b"]
    assert [_hue(fill.getpixel((x, 2))) for x in (4, 32, 60)] == ["r", "g", "b"]
    assert [_hue(fill.getpixel((x, 61))) for x in (4, 32, 60)] == ["r", "g", "b"]
    tall = resize_image(src.rotate(90, expand=True), 64, 64, 2)  # fill left and right
    assert _hue(tall.getpixel((1, 4))) == _hue(tall.getpixel((32, 4))) != "k"
    mask = resize_image(Image.new("L", (10, 20), 255), 16, 16, 1)
    assert mask.mode == "L"
    with pytest.raises(SdloomError, match="resize mode"):
        resize_image(src, 8, 8, 3)


@pytest.mark.parametrize("n,rows,cols", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2),
                                         (5, 2, 3), (6, 2, 3), (7, 3, 3), (9, 3, 3)])
def test_grid_default_shape(n, rows, cols):
    imgs = [Image.new("RGB", (4, 3), (i * 20, 0, 0)) for i in range(n)]
    g = image_grid(imgs)
    assert g.size == (cols * 4, rows * 3)
    assert g.getpixel(((n - 1) % cols * 4, (n - 1) // cols * 3)) == ((n - 1) * 20, 0, 0)
    if n < rows * cols:
        assert g.getpixel((cols * 4 - 1, rows * 3 - 1)) == (0, 0, 0)  # empty cell is black


def test_grid_explicit_rows():
    g = image_grid([Image.new("RGB", (2, 2))] * 4, rows=4)
    assert g.size == (2, 8)


def test_mask_binary_invert_and_gaussian_blur():
    img = Image.new("L", (41, 41), 0)
    img.putpixel((20, 20), 255)
    assert mask_from_image(img).getpixel((20, 20)) == 255
    inv = mask_from_image(img, invert=True)
    assert inv.getpixel((20, 20)) == 0 and inv.getpixel((0, 0)) == 255
    sigma = 2
    r = int(2.5 * sigma + 0.5)  # A1111's kernel: 2·int(2.5σ + 0.5) + 1 taps
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    blurred = np.asarray(mask_from_image(img, blur=sigma), dtype=float)
    assert blurred[20, 20] == pytest.approx(255 * w[r] ** 2, abs=0.51)
    assert blurred[20, 20 + r] == pytest.approx(255 * w[r] * w[0], abs=0.51)
    assert blurred[20, 20 + r + 1] == 0  # nothing beyond the kernel
    only_x = np.asarray(mask_from_image(img, blur=(sigma, 0)), dtype=float)
    assert only_x[21, 20] == 0 and only_x[20, 21] == pytest.approx(255 * w[r + 1], abs=0.51)


def test_mask_from_transparency():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))
    rgba.putpixel((2, 2), (255, 255, 255, 100))  # alpha ≤ 128 → not kept
    m = mask_from_image(rgba)
    assert m.getpixel((0, 0)) == 255 and m.getpixel((1, 1)) == 0 and m.getpixel((2, 2)) == 0
    opaque = Image.new("RGBA", (2, 2), (255, 255, 255, 255))
    opaque.putpixel((0, 0), (0, 0, 0, 255))
    assert mask_from_image(opaque).getpixel((0, 0)) == 0  # fully opaque: the luminance counts


def test_load_image(tmp_path):
    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    flat = load_image(tmp_path / "t.png")
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "t.png", mode=None).mode == "RGBA"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.new("RGB", (30, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)
    with pytest.raises(SdloomError, match=r"cannot read image .*missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(SdloomError, match="cannot read image"):
        load_image(tmp_path / "bad.png")


def test_unique_output_path_numbers_grow_and_never_collide(tmp_path):
    assert unique_output_path(tmp_path, suffix="-77").name == "00000-77.png"
    (tmp_path / "00041-5.png").write_bytes(b"")
    (tmp_path / "grid-00100.png").write_bytes(b"")  # another prefix: not counted
    (tmp_path / "notes.txt").write_bytes(b"")
    a = unique_output_path(tmp_path, suffix="-9")
    b = unique_output_path(tmp_path, suffix="-9")  # reserved, so a second caller moves on
    assert (a.name, b.name) == ("00042-9.png", "00043-9.png")
    assert unique_output_path(tmp_path, prefix="grid-").name == "grid-00101.png"
    (tmp_path / "00000-77.png").unlink()  # a gap is not reused: numbers only grow
    assert unique_output_path(tmp_path, reserve=False).name == "00044.png"


def test_atomic_write_and_cleanup(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"one")
    assert p.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            assert tmp.parent == p.parent and tmp.suffix == ".bin"
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"one" and os.listdir(p.parent) == ["f.bin"]
    with atomic_path(p) as tmp:
        tmp.write_bytes(b"two")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["f.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600


def test_fill_masked_keeps_the_rest_and_paints_the_hole_from_its_surroundings():
    from sdloom.images import fill_masked
    img = Image.new("RGB", (64, 64), (20, 40, 200))
    img.paste((255, 255, 255), (24, 24, 40, 40))  # what the mask hides must not leak
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = fill_masked(img, mask)
    assert out.getpixel((2, 2)) == (20, 40, 200)
    r, g, b = out.getpixel((32, 32))
    assert abs(r - 20) <= 3 and abs(g - 40) <= 3 and abs(b - 200) <= 3
