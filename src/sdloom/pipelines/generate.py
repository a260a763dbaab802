"""txt2img, img2img, inpainting/outpainting and hires fix as thin compositions over an Engine.

Semantics follow A1111: seeds seed+i per image, noise from per-image CPU generators, img2img
start step int(strength·steps), inpaint masked content modes, "only masked" crops, hires fix.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .. import __version__
from ..errors import SdloomError
from ..images import image_grid, resize_image, to_pil, from_pil
from ..infotext import format_infotext
from ..models.lora import extract_prompt_loras
from ..sampling.denoisers import sigmas_for_img2img
from ..sampling.samplers import resolve_sampler
from ..sampling.schedules import scheduler_label
from ..seeds import all_seeds, fix_seed, image_noise, sampler_generators
from .engine import Engine
from .params import FILL_NAMES, GenerationParams

LATENT_UPSCALERS = {"latent": "bilinear", "latent (antialiased)": "bilinear-aa",
                    "latent (bicubic)": "bicubic", "latent (bicubic antialiased)": "bicubic-aa",
                    "latent (nearest)": "nearest", "latent (nearest-exact)": "nearest-exact"}


class Interrupted(Exception):
    """Raised from the progress callback to stop a job (A1111's /interrupt)."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    params: GenerationParams
    extra: dict = field(default_factory=dict)

    def grid(self) -> Image.Image:
        return image_grid(self.images)


ProgressFn = Callable[[int, int, torch.Tensor | None], None]  # (step, total, x̂0 latents)


@dataclass
class _Mask:
    """A prepared inpainting mask: pixel mask for the overlay, latent masks for sampling."""
    overlay: Image.Image  # L, blurred, at output size: 255 = generated
    latent: torch.Tensor  # [1,1,h,w] 1 = repaint
    crop: tuple[int, int, int, int] | None = None  # "only masked": region in the original
    original: Image.Image | None = None  # the full original, for pasting back


def _blur(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def _crop_region(mask: Image.Image, pad: int, w: int, h: int) -> tuple[int, int, int, int]:
    """Bounding box of the mask plus padding, grown to the output aspect ratio, inside the image."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        raise SdloomError("the mask is empty: nothing to inpaint")
    x1, y1, x2, y2 = box
    x1, y1 = max(0, x1 - pad), max(0, y1 - pad)
    x2, y2 = min(mask.width, x2 + pad), min(mask.height, y2 + pad)
    ratio = w / h
    cw, ch = x2 - x1, y2 - y1
    if cw / ch < ratio:  # too tall: widen
        grow = int(ch * ratio) - cw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = int(cw / ratio) - ch
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # slide back inside the image, clipping only when the region is larger than the image
    if x1 < 0:
        x2, x1 = min(mask.width, x2 - x1), 0
    if x2 > mask.width:
        x1, x2 = max(0, x1 - (x2 - mask.width)), mask.width
    if y1 < 0:
        y2, y1 = min(mask.height, y2 - y1), 0
    if y2 > mask.height:
        y1, y2 = max(0, y1 - (y2 - mask.height)), mask.height
    return x1, y1, x2, y2


def _prepare_init(p: GenerationParams) -> tuple[Image.Image, _Mask | None]:
    """The init image at output size, and the mask (with the 'only masked' crop) if any."""
    init = p.init_image.convert("RGB")
    if p.mask is None:
        return resize_image(init, p.width, p.height, p.resize_mode), None
    mask = p.mask.convert("L")
    if p.inpainting_mask_invert:
        mask = mask.point(lambda v: 255 - v)
    blurred = _blur(mask, p.mask_blur)
    if p.inpaint_full_res:
        box = _crop_region(blurred, p.inpaint_full_res_padding, p.width, p.height)
        crop_img = init.crop(box).resize((p.width, p.height), Image.LANCZOS)
        overlay = blurred.crop(box).resize((p.width, p.height), Image.LANCZOS)
        return crop_img, _Mask(overlay, _latent_mask(overlay), box, init)
    img = resize_image(init, p.width, p.height, p.resize_mode)
    overlay = resize_image(blurred, p.width, p.height, p.resize_mode)
    return img, _Mask(overlay, _latent_mask(overlay))


def _latent_mask(overlay: Image.Image) -> torch.Tensor:
    m = torch.from_numpy(__import__("numpy").asarray(overlay, dtype="float32") / 255.0)
    m = F.interpolate(m[None, None], size=(overlay.height // 8, overlay.width // 8), mode="area")
    return m.round()  # A1111 rounds the latent mask (mask_round)


def _fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """'fill' masked content: the masked area painted with blurred colours of its surroundings."""
    keep = mask.point(lambda v: 0 if v > 127 else 255)
    out = image.copy()
    for radius in (256, 64, 16, 4, 1):  # coarse to fine, like A1111's masking.fill
        blurred = Image.composite(image, Image.new("RGB", image.size), keep).filter(
            ImageFilter.GaussianBlur(radius))
        weight = keep.filter(ImageFilter.GaussianBlur(radius))
        import numpy as np
        b = np.asarray(blurred, dtype=np.float32)
        wgt = np.asarray(weight, dtype=np.float32)[..., None] / 255.0
        est = np.clip(b / np.maximum(wgt, 1e-3), 0, 255).astype(np.uint8)
        out = Image.composite(out, Image.fromarray(est), keep)
    return out


def _run_sampler(engine: Engine, p: GenerationParams, den, x: torch.Tensor,
                 sigmas: torch.Tensor, seeds: list[int], progress: ProgressFn | None,
                 step_offset: int, total: int) -> torch.Tensor:
    spec, _ = resolve_sampler(p.sampler_name, p.scheduler)
    opts = {}
    if p.eta is not None:
        opts["eta"] = p.eta
    if p.s_noise is not None:
        opts["s_noise"] = p.s_noise

    def cb(d: dict) -> None:
        if progress is not None:
            progress(step_offset + d["i"] + 1, total, d.get("denoised"))

    # each image's A1111 generator, moved past its starting noise
    gen = sampler_generators(seeds, tuple(x.shape[1:]))
    return spec.fn(den, x, sigmas.to(x.device), extra_args={}, callback=cb, generator=gen, **opts)


def _sigmas(engine: Engine, p: GenerationParams, steps: int) -> torch.Tensor:
    spec, scheduler = resolve_sampler(p.sampler_name, p.scheduler)
    # A1111 drops the next-to-last sigma for DPM2 / DPM2 a / DPM++ 3M SDE
    return spec.sigmas(scheduler, steps, engine.schedule)


def _infotext(engine: Engine, p: GenerationParams, prompt: str, negative: str, seed: int,
              subseed: int, width: int, height: int, extra: dict) -> str:
    spec, scheduler = resolve_sampler(p.sampler_name, p.scheduler)
    params: dict[str, object] = {
        "Steps": p.steps, "Sampler": spec.name,
        "Schedule type": scheduler_label(scheduler) if scheduler else None,
        "CFG scale": p.cfg_scale, "Seed": seed, "Size": f"{width}x{height}",
        "Model hash": engine.hash, "Model": engine.name,
        "Variation seed": subseed if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Denoising strength": (p.denoising_strength if p.init_image is not None or p.enable_hr
                               else None),
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "RNG": "CPU",
    }
    params.update(extra)
    params["Version"] = f"sdloom {__version__}"
    return format_infotext(prompt, negative, params)


def generate(engine: Engine, p: GenerationParams, progress: ProgressFn | None = None
             ) -> GenerationResult:
    """Run one job (txt2img, img2img or inpaint; hires fix optional) and return the images."""
    p.validate(engine.config.default_size)
    resolve_sampler(p.sampler_name, p.scheduler)  # fail fast on an unknown name
    prompt, tagged = extract_prompt_loras(p.prompt)
    negative, _ = extract_prompt_loras(p.negative_prompt)
    lora_names = engine.set_loras(list(p.loras) + tagged)
    seed = fix_seed(p.seed)
    subseed = fix_seed(p.subseed) if p.subseed_strength else -1
    n = p.batch_size * p.n_iter
    seeds, subseeds = all_seeds(seed, n, subseed, p.subseed_strength)
    img2img = p.init_image is not None
    init_img, mask = _prepare_init(p) if img2img else (None, None)
    if mask is not None and p.inpainting_fill == 0:
        init_img = _fill(init_img, mask.overlay)
    hr = p.enable_hr and not img2img
    hr_w, hr_h = p.hr_size() if hr else (p.width, p.height)
    extra: dict[str, object] = {}
    if mask is not None:
        extra.update({"Mask blur": p.mask_blur, "Masked content": FILL_NAMES[p.inpainting_fill],
                      "Inpaint area": "Only masked" if p.inpaint_full_res else "Whole picture"})
        if p.inpaint_full_res:
            extra["Masked area padding"] = p.inpaint_full_res_padding
    if hr:
        hp = _hires_params(p)
        hr_spec, hr_key = resolve_sampler(hp.sampler_name, hp.scheduler)  # fail fast
        extra.update({"Hires upscale": p.hr_scale, "Hires steps": p.hr_second_pass_steps or None,
                      "Hires upscaler": p.hr_upscaler})
        # as A1111: recorded only where the second pass differs from the first
        if hp.sampler_name != p.sampler_name:
            extra["Hires sampler"] = hr_spec.name
        if hp.scheduler != p.scheduler:
            extra["Hires schedule type"] = scheduler_label(hr_key)
        if hp.prompt != p.prompt:
            extra["Hires prompt"] = hp.prompt
        if hp.negative_prompt != p.negative_prompt:
            extra["Hires negative prompt"] = hp.negative_prompt
    if lora_names:
        extra["Lora weights"] = ", ".join(f"{n_}: {w:g}" for n_, (_, w)
                                         in zip(lora_names, list(p.loras) + tagged))
    images, infotexts = [], []
    hr_steps = p.hr_second_pass_steps or p.steps
    total = p.n_iter * ((int(min(p.denoising_strength, 0.999) * p.steps) if img2img else p.steps)
                        + (int(min(p.denoising_strength, 0.999) * hr_steps) if hr else 0))
    done = 0
    for k in range(p.n_iter):
        bs = seeds[k * p.batch_size:(k + 1) * p.batch_size]
        bss = subseeds[k * p.batch_size:(k + 1) * p.batch_size]
        prompts, negs = [prompt] * len(bs), [negative] * len(bs)
        if p.all_prompts is not None:
            prompts = [extract_prompt_loras(q)[0]
                       for q in p.all_prompts[k * p.batch_size:(k + 1) * p.batch_size]]
        lat, done = _first_pass(engine, p, prompts, negs, bs, bss, init_img, mask, progress,
                                done, total)
        if hr:
            hr_prompts = prompts if hp.prompt == p.prompt else \
                [extract_prompt_loras(hp.prompt)[0]] * len(bs)
            hr_negs = [extract_prompt_loras(hp.negative_prompt)[0]] * len(bs)
            lat, done = _hires_pass(engine, hp, hr_prompts, hr_negs, bs, bss, lat, hr_w, hr_h,
                                    progress, done, total)
        pix = engine.decode(lat)
        for j, im in enumerate(to_pil(pix)):
            if mask is not None:
                im = _overlay(im, init_img, mask)
            images.append(im)
            # A1111 records the first-pass processing size, whatever the final size
            shown = p.prompt if p.all_prompts is None else p.all_prompts[k * p.batch_size + j]
            infotexts.append(_infotext(engine, p, shown, p.negative_prompt, bs[j], bss[j],
                                       p.width, p.height, extra))
    return GenerationResult(images, infotexts, seeds, subseeds, p)


def _noise(engine: Engine, seeds, subseeds, p: GenerationParams, w: int, h: int) -> torch.Tensor:
    c = engine.config.vae.embed_dim
    return image_noise(seeds, (c, h // 8, w // 8), subseeds=subseeds,
                       subseed_strength=p.subseed_strength).to(engine.device, torch.float32)


def _inpaint_concat(engine: Engine, init_img, mask: _Mask | None, seeds, n: int, w: int,
                    h: int) -> torch.Tensor | None:
    """9-channel models: [repaint mask, latent of the image with the masked area blanked]."""
    if not engine.config.is_inpaint:
        return None
    if init_img is None:  # txt2img with an inpainting model: everything is to be painted
        m = torch.ones(n, 1, h // 8, w // 8)
        masked = torch.zeros(n, 3, h, w)
    else:
        m = mask.latent.expand(n, -1, -1, -1) if mask is not None else torch.zeros(
            n, 1, h // 8, w // 8)
        px = from_pil(init_img)
        if mask is not None:
            import numpy as np
            pm = torch.from_numpy((np.asarray(mask.overlay) > 127).astype("float32"))
            px = px * (1 - pm[None, None])
        masked = px.expand(n, -1, -1, -1)
    lat = engine.encode(masked, seeds)
    return torch.cat([m.to(lat), lat], dim=1).to(engine.device)


def _first_pass(engine, p, prompts, negs, seeds, subseeds, init_img, mask, progress, done,
                total):
    w, h = p.width, p.height
    noise = _noise(engine, seeds, subseeds, p, w, h)
    sigmas = _sigmas(engine, p, p.steps)
    extra = {}
    concat = _inpaint_concat(engine, init_img, mask, seeds, len(seeds), w, h)
    if concat is not None:
        extra["c_concat"] = concat
    if init_img is None:
        x = noise * sigmas[0]
        init_lat = None
    else:
        sigmas = sigmas_for_img2img(sigmas, p.denoising_strength, p.steps)
        init_lat = engine.encode(from_pil(init_img).expand(len(seeds), -1, -1, -1), seeds)
        init_lat = init_lat.to(engine.device)
        if mask is not None and p.inpainting_fill in (2, 3):
            keep = 1 - mask.latent.to(init_lat)
            fill = noise if p.inpainting_fill == 2 else torch.zeros_like(init_lat)
            init_lat = init_lat * keep + fill * (1 - keep)
        x = init_lat + noise * sigmas[0]
    den = engine.cfg_denoiser(prompts, negs, p.steps, p.cfg_scale, p.clip_skip, w, h, sigmas,
                              p.aesthetic_score, extra)
    if mask is not None and not engine.config.is_inpaint:
        den = _blend(den, init_lat, 1 - mask.latent.to(init_lat))
    out = _run_sampler(engine, p, den, x, sigmas, seeds, progress, done, total)
    if mask is not None and not engine.config.is_inpaint:
        keep = 1 - mask.latent.to(out)
        out = init_lat * keep + out * (1 - keep)
    return out, done + len(sigmas) - 1


def _blend(den, init_lat: torch.Tensor, keep: torch.Tensor):
    """Latent blending for ordinary models: outside the mask, x̂0 is the original latent."""
    def blended(x, sigma, **kw):
        return init_lat * keep + den(x, sigma, **kw) * (1 - keep)
    return blended


def _hires_params(p: GenerationParams) -> GenerationParams:
    """The job as the hires pass sees it: its own sampler, schedule and prompts where set."""
    return replace(p, sampler_name=p.hr_sampler_name or p.sampler_name,
                   scheduler=p.hr_scheduler or p.scheduler,
                   prompt=p.hr_prompt or p.prompt,
                   negative_prompt=p.hr_negative_prompt or p.negative_prompt)


def _hires_pass(engine, p, prompts, negs, seeds, subseeds, lat, w, h, progress, done, total):
    """Upscale the first pass (in latent or pixel space) and denoise it again at the new size."""
    mode = LATENT_UPSCALERS.get(p.hr_upscaler.lower())
    if mode is not None:
        aa = mode.endswith("-aa")
        m = mode.removesuffix("-aa")
        up = F.interpolate(lat.float(), size=(h // 8, w // 8), mode=m, antialias=aa,
                           **({} if m.startswith("nearest") else {"align_corners": False}))
    elif p.hr_upscaler.lower() in ("lanczos", "nearest", "none"):
        rs = Image.LANCZOS if p.hr_upscaler.lower() != "nearest" else Image.NEAREST
        imgs = [im.resize((w, h), rs) for im in to_pil(engine.decode(lat))]
        up = engine.encode(torch.cat([from_pil(im) for im in imgs]), seeds).to(engine.device)
    else:
        raise SdloomError(f"unknown hires upscaler {p.hr_upscaler!r}; use one of: "
                          + ", ".join(["Latent", *[k.title() for k in LATENT_UPSCALERS][1:],
                                       "Lanczos", "Nearest"]))
    steps = p.hr_second_pass_steps or p.steps
    sigmas = sigmas_for_img2img(_sigmas(engine, p, steps), p.denoising_strength, steps)
    noise = _noise(engine, seeds, subseeds, p, w, h)
    x = up.to(engine.device) + noise * sigmas[0]
    extra = {}
    concat = _inpaint_concat(engine, None, None, seeds, len(seeds), w, h)
    if concat is not None:
        extra["c_concat"] = concat
    den = engine.cfg_denoiser(prompts, negs, steps, p.cfg_scale, p.clip_skip, w, h, sigmas,
                              p.aesthetic_score, extra)
    out = _run_sampler(engine, p, den, x, sigmas, seeds, progress, done, total)
    return out, done + len(sigmas) - 1


def _overlay(generated: Image.Image, init_img: Image.Image, mask: _Mask) -> Image.Image:
    """Paste the generated pixels over the original through the blurred mask (A1111 overlay)."""
    if mask.crop is None:
        return Image.composite(generated, init_img, mask.overlay)
    x1, y1, x2, y2 = mask.crop
    size = (x2 - x1, y2 - y1)
    patch = generated.resize(size, Image.LANCZOS)
    m = mask.overlay.resize(size, Image.LANCZOS)
    out = mask.original.copy()
    out.paste(patch, (x1, y1), m)
    return out


def outpaint_canvas(image: Image.Image, left: int = 0, right: int = 0, top: int = 0,
                    bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas: (image on a larger canvas, mask that is white on the new area)."""
    if min(left, right, top, bottom) < 0:
        raise SdloomError("outpaint margins must be ≥ 0")
    w = image.width + left + right
    h = image.height + top + bottom
    w8, h8 = math.ceil(w / 8) * 8, math.ceil(h / 8) * 8
    right += w8 - w
    bottom += h8 - h
    canvas = Image.new("RGB", (w8, h8), (127, 127, 127))
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", (w8, h8), 255)
    # keep a few pixels of overlap so the seam is repainted, not the old content
    mask.paste(0, (left + 8 if left else 0, top + 8 if top else 0,
                   left + image.width - (8 if right else 0),
                   top + image.height - (8 if bottom else 0)))
    return canvas, mask
