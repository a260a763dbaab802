"""Image helpers shared by pipelines, CLI and server: tensors ⇄ PIL, resize modes, grids, masks,
output names. Geometry follows A1111 (modules/images.py, processing.py) so results line up."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import SdloomError

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill"}


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → RGB images: clamp((x+1)/2, 0, 1)·255, rounded to nearest.

    Rounded like diffusers (VaeImageProcessor.numpy_to_pil). A1111 truncates instead
    (astype(uint8)), which darkens by half a level on average and turns 63 of the 256 levels
    into the level below on a from_pil → to_pil round trip; rounding keeps every level."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W], got {tuple(x.shape)}")
    y = torch.clamp((x.detach().float().cpu() + 1.0) / 2.0, 0.0, 1.0)
    arr = (y * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def from_pil(img: Image.Image, width: int | None = None, height: int | None = None
             ) -> torch.Tensor:
    """Image → [1, 3, H, W] in [-1, 1] (A1111: 2·(v/255) − 1), resized first to a given size.

    A given size is reached with "Just resize" (Lanczos); use resize_image for other modes."""
    img = img.convert("RGB")
    w, h = width or img.width, height or img.height
    if (w, h) != img.size:
        img = img.resize((w, h), Image.LANCZOS)
    a = 2.0 * (np.asarray(img, dtype=np.float32) / 255.0) - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def flatten(img: Image.Image, background: str | tuple[int, int, int] = "#ffffff"
            ) -> Image.Image:
    """RGB image with any transparency composited over `background` (A1111 images.flatten)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:
    """Open an image, upright (EXIF orientation, as A1111 does for img2img inputs).

    mode="RGB" flattens transparency over white (A1111's img2img background colour);
    mode=None keeps the stored mode, e.g. RGBA for masks whose alpha marks the area."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise SdloomError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise SdloomError(f"cannot read image {path}: it is a folder") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise SdloomError(f"cannot read image {path}: {e}") from None
    if mode is None:
        return im
    return flatten(im) if mode == "RGB" else im.convert(mode)


def resize_image(img: Image.Image, w: int, h: int, mode: int = 0) -> Image.Image:
    """A1111's resize modes (images.resize_image, Lanczos): 0 just resize, 1 crop and resize
    (cover, centre crop), 2 resize and fill (fit, borders filled by stretching the edges).

    Unlike A1111, which returns RGB for modes 1 and 2, the image keeps its mode (masks stay L)."""
    if mode == 0:
        return img.resize((w, h), Image.LANCZOS)
    if mode not in (1, 2):
        raise SdloomError(f"resize mode must be 0, 1 or 2 "
                          f"({', '.join(f'{k} {v}' for k, v in RESIZE_MODES.items())}), "
                          f"got {mode}")
    ratio, src_ratio = w / h, img.width / img.height
    cover = (ratio > src_ratio) if mode == 1 else (ratio < src_ratio)
    # A1111's integer arithmetic: one side equals the target, the other keeps the aspect ratio
    sw = w if cover else img.width * h // img.height
    sh = h if not cover else img.height * w // img.width
    resized = img.resize((sw, sh), Image.LANCZOS)
    out = Image.new(img.mode, (w, h))
    out.paste(resized, (w // 2 - sw // 2, h // 2 - sh // 2))
    # the bands are the edge row/column stretched (a zero-height box), with Pillow's default
    # bicubic filter as in A1111
    if mode == 2 and ratio < src_ratio:  # bands above and below
        fill = h // 2 - sh // 2
        if fill > 0:
            out.paste(resized.resize((w, fill), Image.BICUBIC, box=(0, 0, w, 0)), (0, 0))
            out.paste(resized.resize((w, fill), Image.BICUBIC, box=(0, sh, w, sh)),
                      (0, fill + sh))
    elif mode == 2 and ratio > src_ratio:  # bands left and right
        fill = w // 2 - sw // 2
        if fill > 0:
            out.paste(resized.resize((fill, h), Image.BICUBIC, box=(0, 0, 0, h)), (0, 0))
            out.paste(resized.resize((fill, h), Image.BICUBIC, box=(sw, 0, sw, h)),
                      (fill + sw, 0))
    return out


def image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Images in a grid on black, row by row, cells the size of the first image.

    Default rows = round(√n), A1111's default (n_rows -1): 2 → 1×2, 3 → 2×2, 5 → 2×3."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    rows = min(rows or max(1, round(math.sqrt(n))), n)
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def _gaussian_blur_1d(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    # A1111 blurs with cv2.GaussianBlur, kernel 2·int(2.5σ + 0.5) + 1 along one axis at a time,
    # borders reflected without repeating the edge (cv2's BORDER_REFLECT_101 = numpy "reflect")
    r = int(2.5 * sigma + 0.5)
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2.0 * sigma * sigma))
    k /= k.sum()
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="reflect")
    out = np.zeros_like(a)
    n = a.shape[axis]
    for i, wgt in enumerate(k):
        out += wgt * np.take(p, range(i, i + n), axis=axis)
    return out


def mask_from_image(img: Image.Image, blur: int | tuple[int, int] = 0, invert: bool = False
                    ) -> Image.Image:
    """An inpainting mask (L, 255 = repaint) from a mask image, as A1111's img2img prepares it.

    An RGBA image with any transparency gives its alpha, thresholded at 128
    (create_binary_mask); anything else its luminance. Then inverted if asked, then blurred:
    blur is σ in pixels, or (σx, σy) (A1111's mask_blur_x / mask_blur_y)."""
    if img.mode == "RGBA" and img.getextrema()[-1] != (255, 255):
        mask = img.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    else:
        mask = img.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    bx, by = (blur, blur) if isinstance(blur, (int, float)) else blur
    if bx <= 0 and by <= 0:
        return mask
    a = np.asarray(mask, dtype=np.float64)
    if bx > 0:
        a = _gaussian_blur_1d(a, float(bx), axis=1)
    if by > 0:
        a = _gaussian_blur_1d(a, float(by), axis=0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def masked_overlay(image: Image.Image, overlay_mask: Image.Image) -> Image.Image:
    """The original as an RGBA layer that shows where the mask does not (A1111's overlay image:
    alpha = inverted mask, pasted through premultiplied RGBa as A1111 does)."""
    out = Image.new("RGBa", image.size)
    out.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    return out.convert("RGBA")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"fill" masked content (A1111 masking.fill): the masked area painted with ever less
    blurred colours of what surrounds it, by alpha-compositing blurs of the unmasked pixels."""
    layer = masked_overlay(image, mask).convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def crop_region(mask: Image.Image, pad: int, width: int, height: int
                ) -> tuple[int, int, int, int] | None:
    """"Only masked" inpainting: the mask's bounding box plus `pad`, then grown to the
    processing aspect ratio and slid back inside the image (A1111 masking.get_crop_region_v2
    and expand_crop_region). None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if pad:
        x1, y1 = max(x1 - pad, 0), max(y1 - pad, 0)
        x2, y2 = min(x2 + pad, mask.width), min(y2 + pad, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _grow(a: int, b: int, by: int, limit: int) -> tuple[int, int]:
    a, b = a - by // 2, b + by - by // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def unique_output_path(directory: str | Path, prefix: str = "", suffix: str = "",
                       ext: str = ".png", *, reserve: bool = True) -> Path:
    """The next free `<prefix>NNNNN<suffix><ext>` in directory, e.g. 00042-1234.png for
    suffix="-1234" (A1111's "[number]-[seed]" names).

    NNNNN is one more than the highest number already used after `prefix` (A1111's
    get_next_sequence_number), so numbers only grow. reserve=True creates the file empty with
    O_EXCL, so two writers (server workers) never get the same name; write it atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pat = re.compile(re.escape(prefix) + r"(\d+)(?!\d)")
    used = [int(m.group(1)) for name in os.listdir(d) if (m := pat.match(name))]
    n = max(used, default=-1) + 1
    while True:
        p = d / f"{prefix}{n:05d}{suffix}{ext}"
        if not reserve:
            if not p.exists():
                return p
        else:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return p
            except FileExistsError:
                pass
        n += 1
