"""txt2img and img2img requests: the request's images decoded within the limits, the A1111
request → GenerationParams (styles, prompt LoRAs, ControlNet units, override_settings), and the
job's result → A1111's response body (`images`, `parameters`, `info`). The routes are app.py's.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import __version__
from ..errors import LimitError, NotFoundError, SdloomError
from ..images import flatten
from ..infotext import encode_image, model_hash, parse_infotext
from ..limits import Limits
from ..models.lora import extract_prompt_loras
from ..pipelines.engine import Engine
from ..pipelines.params import GenerationParams
from ..sampling.samplers import resolve_sampler
from ..styles import StyleDB
from .controlnet_api import units_from_scripts
from .guard import log
from .jobs import Generated
from .options import check_options
from .schema import Img2ImgRequest, Txt2ImgRequest

if TYPE_CHECKING:
    from .app import Server


# ---------------------------------------------------------------------- images
def decode_image(data: Any, what: str, limits: Limits) -> Image.Image:
    """A base64 string or data URL → an image. Its size is read from the header and checked
    against max_image_pixels before a pixel is decoded; anything unreadable is a 422."""
    if not isinstance(data, str):
        raise SdloomError(f"{what}: expected a base64 string")
    if data.startswith(("http://", "https://")):
        raise SdloomError(f"{what}: image URLs are not fetched; send base64")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise SdloomError(f"{what}: not a base64-encoded image") from None
    over = f"{what}: image is over the limit max_image_pixels={limits.max_image_pixels}"
    try:
        img = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError:
        raise LimitError(over) from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise SdloomError(f"{what}: not a readable image ({type(e).__name__})") from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise LimitError(f"{what}: image of {w}x{h} pixels is over the limit "
                         f"max_image_pixels={limits.max_image_pixels}")
    if w < 1 or h < 1:
        raise SdloomError(f"{what}: image has no pixels")
    try:
        img.load()
    except (Image.DecompressionBombError, MemoryError):
        raise LimitError(over) from None
    except Exception as e:
        raise SdloomError(f"{what}: not a readable image ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    return img


def as_mask(img: Image.Image) -> Image.Image:
    """The mask as decoded, for the pipeline's A1111 rule (alpha if not all opaque, else
    luminance): modes with alpha become RGBA, odd modes (16-bit, float, palette) L."""
    if img.mode in ("RGBA", "RGB", "L"):
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("L")


# ---------------------------------------------------------------------- requests → params
def _prompt_loras(texts: list[str]) -> None:
    """<lora:name:w> tags: a weight that is not a finite number is a 422 here, before the
    job (the names are resolved by the engine, inside lora_dir only)."""
    for t in texts:
        try:
            _, found = extract_prompt_loras(t)
        except ValueError:
            raise SdloomError("a <lora:name:weight> tag has a weight that is not a number") \
                from None
        for name, w in found:
            if not -1e4 < w < 1e4:  # also NaN and ±inf
                raise SdloomError(f"LoRA weight {w} of {name!r} is not a usable number")


def apply_styles(req: Txt2ImgRequest, styles: StyleDB) -> tuple[str, str, str, str]:
    """The prompts with the request's styles merged in, in order (A1111's setup_prompts):
    prompt, negative prompt, and the hires prompts when set ("" stays "": the hires pass then
    uses the styled first-pass prompt, as A1111). Unknown names merge nothing, as A1111;
    the server log names them."""
    names = list(req.styles or [])
    if not names:
        return req.prompt, req.negative_prompt, req.hr_prompt, req.hr_negative_prompt
    unknown = styles.unknown(names)
    if unknown:
        log.warning("styles not found (ignored, as A1111): %s", ", ".join(map(repr, unknown)))
    hr_prompt = styles.apply_prompt(req.hr_prompt, names) if req.hr_prompt else ""
    hr_negative = styles.apply_negative(req.hr_negative_prompt, names) \
        if req.hr_negative_prompt else ""
    return (styles.apply_prompt(req.prompt, names),
            styles.apply_negative(req.negative_prompt, names), hr_prompt, hr_negative)


def to_params(req: Txt2ImgRequest, server: Server, img2img: bool
              ) -> tuple[GenerationParams, dict[str, Any], Path | None]:
    """An A1111 request → GenerationParams, the job's options, and the model it asks for
    (override_settings.sd_model_checkpoint), refusing what sdloom does not do."""
    has = set(GenerationParams.__dataclass_fields__)
    unsupported = [name for name, on in (
        ("restore_faces", req.restore_faces), ("tiling", req.tiling),
        ("script_name", req.script_name),
        ("seed_resize_from_w/h", "seed_resize_from_w" not in has
         and (req.seed_resize_from_w > 0 or req.seed_resize_from_h > 0)))
        if on]
    if unsupported:
        raise SdloomError(f"not supported by sdloom: {', '.join(unsupported)}")
    overrides = req.override_settings or {}
    opts = {**server.options, **check_options(overrides, server.vaes())}
    model = None
    if "sd_model_checkpoint" in overrides:
        model = server.find_model(overrides["sd_model_checkpoint"])
    prompt, negative, hr_prompt, hr_negative = apply_styles(req, server.styles)
    _prompt_loras([prompt, negative, hr_prompt, hr_negative])
    units, ip_units = units_from_scripts(req.alwayson_scripts, server, decode_image, img2img)
    p = GenerationParams(
        prompt=prompt, negative_prompt=negative, width=req.width,
        height=req.height, steps=req.steps, cfg_scale=req.cfg_scale,
        sampler_name=req.sampler_name or req.sampler_index or "Euler",
        scheduler=req.scheduler or "automatic", seed=req.seed, subseed=req.subseed,
        subseed_strength=req.subseed_strength, batch_size=req.batch_size, n_iter=req.n_iter,
        clip_skip=opts["CLIP_stop_at_last_layers"], eta=req.eta, s_noise=req.s_noise,
        controlnets=units, ip_adapters=ip_units)
    # A1111 1.9+ splits a legacy combined name ("DPM++ 2M Karras") into sampler and scheduler
    # before it runs, so `info` and the echoed parameters name the sampler alone
    try:
        spec, sched = resolve_sampler(p.sampler_name, p.scheduler)
    except SdloomError as e:  # A1111's validate_sampler_name: 404 "Sampler not found"
        raise NotFoundError(f"Sampler not found: {e}") from None
    if spec.name != p.sampler_name and spec.name.lower() != p.sampler_name.strip().lower():
        p.sampler_name, p.scheduler = spec.name, sched
    if "seed_resize_from_w" in has:
        p.seed_resize_from_w, p.seed_resize_from_h = req.seed_resize_from_w, \
            req.seed_resize_from_h
    if "eta_noise_seed_delta" in has:
        p.eta_noise_seed_delta = opts["eta_noise_seed_delta"]
    if not img2img:
        p.enable_hr = req.enable_hr
        p.hr_scale, p.hr_second_pass_steps = req.hr_scale, req.hr_second_pass_steps
        p.hr_resize_x, p.hr_resize_y = req.hr_resize_x, req.hr_resize_y
        p.hr_upscaler = req.hr_upscaler or "Latent"
        p.hr_sampler_name, p.hr_scheduler = req.hr_sampler_name or None, req.hr_scheduler or None
        p.hr_prompt, p.hr_negative_prompt = hr_prompt, hr_negative
        p.denoising_strength = 0.75 if req.denoising_strength is None else req.denoising_strength
        return p, opts, model
    assert isinstance(req, Img2ImgRequest)
    if not req.init_images:
        raise NotFoundError("Init image not found")
    init = decode_image(req.init_images[0], "init_images[0]", server.limits)
    try:
        p.init_image = flatten(init)  # transparency over white, as A1111's img2img
    except (ValueError, OSError) as e:
        raise SdloomError(f"init_images[0]: cannot convert a {init.mode} image ({e})") from None
    p.denoising_strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    p.resize_mode = req.resize_mode
    if p.width is None and p.height is None:  # keep the input's size, rounded down to 8
        p.width, p.height = p.init_image.width // 8 * 8, p.init_image.height // 8 * 8
    if req.mask:
        p.mask = as_mask(decode_image(req.mask, "mask", server.limits))
        if "mask_blur_x" in has:
            p.mask_blur_x, p.mask_blur_y = req.mask_blur_x, req.mask_blur_y
            p.mask_blur = req.mask_blur
        else:
            p.mask_blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
        p.inpainting_fill = req.inpainting_fill
        p.inpaint_full_res = req.inpaint_full_res
        p.inpaint_full_res_padding = req.inpaint_full_res_padding
        p.inpainting_mask_invert = bool(req.inpainting_mask_invert)
    return p, opts, model


def _extra_params(infos: list[str]) -> dict[str, Any]:
    """A1111's extra_generation_params of the first image: here the ControlNet N entries
    the extension adds (the infotext has them all)."""
    if not infos:
        return {}
    return {k: v for k, v in parse_infotext(infos[0]).items() if k.startswith("ControlNet ")}


# ---------------------------------------------------------------------- result → response
def response_body(req: Txt2ImgRequest, p: GenerationParams, opts: dict[str, Any],
                  eng: Engine, out: Generated, img2img: bool) -> dict[str, Any]:
    images, infos, seeds, subseeds = out.images, out.infotexts, out.seeds, out.subseeds
    fmt = opts["samples_format"]
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * len(images),
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * len(images),
        "seed": seeds[0] if seeds else None, "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else None, "all_subseeds": subseeds,
        "subseed_strength": p.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": p.sampler_name, "cfg_scale": p.cfg_scale, "steps": p.steps,
        "batch_size": p.batch_size,
        "denoising_strength": p.denoising_strength if img2img or p.enable_hr else None,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": eng.name, "sd_model_hash": eng.hash,
        "sd_vae_name": eng.vae_override.name if eng.vae_override else None,
        "sd_vae_hash": model_hash(eng.vae_override) if eng.vae_override else None,
        "seed_resize_from_w": getattr(p, "seed_resize_from_w", -1),
        "seed_resize_from_h": getattr(p, "seed_resize_from_h", -1),
        "extra_generation_params": _extra_params(infos),
        "index_of_first_image": 0, "infotexts": infos,
        "styles": list(req.styles or []), "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": eng.family.inpaint_channels(eng.config),
        "version": f"sdloom {__version__}"}
    params = req.model_dump()
    if img2img and not params.get("include_init_images"):
        params["init_images"], params["mask"] = None, None
    images_b64 = [base64.b64encode(encode_image(im, fmt, t)).decode("ascii")
                  for im, t in zip(images, infos)] if req.send_images else []
    return {"images": images_b64, "parameters": params, "info": json.dumps(info)}
