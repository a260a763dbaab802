"""txt2img, img2img, inpainting/outpainting and hires fix as thin compositions over an Engine.

Semantics follow A1111 (processing.py, sd_samplers_kdiffusion.py, docs/a1111.md): seeds
seed+i per image, each image's noise from its own CPU generator (ImageRNG: variation seeds,
seed resize, ENSD); img2img runs t_enc + 1 = int(min(strength, 0.999)·steps) + 1 steps of the
schedule and the hires pass exactly its requested steps (setup_img2img_steps); prompt editing
counts A1111's denoiser calls from 0 in each pass, the hires pass on the hires schedule; masks
by A1111's alpha rule, blur, crop, fill, latent blend and overlay.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import __version__, upscalers
from ..controlnet import ControlClock, ControlSet, prepare_units
from ..errors import SdloomError
from ..images import (crop_region, fill_masked, from_pil, image_grid, mask_from_image,
                      masked_overlay, resize_image, to_pil)
from ..infotext import format_infotext
from ..limits import DEFAULT_LIMITS, Limits
from ..models.lora import extract_prompt_loras
from ..prompts import prompt_schedule
from ..sampling.denoisers import sample, sampling_sigmas
from .fastpath import eager
from ..sampling.samplers import resolve_sampler
from ..sampling.schedules import scheduler_label
from ..seeds import ImageRNG, all_seeds, fix_seed
from .engine import Engine
from .params import FILL_NAMES, GenerationParams

LATENT_UPSCALERS = {"latent": "bilinear", "latent (antialiased)": "bilinear-aa",
                    "latent (bicubic)": "bicubic", "latent (bicubic antialiased)": "bicubic-aa",
                    "latent (nearest)": "nearest", "latent (nearest-exact)": "nearest-exact"}


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    params: GenerationParams

    def grid(self) -> Image.Image:
        return image_grid(self.images)


ProgressFn = Callable[[int, int, torch.Tensor | None], None]  # (step, total, x̂0 latents)


@dataclass
class _Inpaint:
    """A prepared inpainting mask (A1111 StableDiffusionProcessingImg2Img.init)."""
    mask: Image.Image  # L at processing size, blurred: what the latent mask is made from
    overlay: Image.Image  # RGBA: the original where the mask does not repaint, at output size
    paste_to: tuple[int, int, int, int] | None = None  # "only masked": (x, y, w, h)


def _prepare_init(p: GenerationParams) -> tuple[Image.Image, _Inpaint | None]:
    """The init image at processing size (filled where masked, for "fill"), and the mask."""
    init = p.init_image.convert("RGB")
    if p.mask is None:  # resize mode 3 scales the init latent instead (first_pass)
        return (init if p.resize_mode == 3 else
                resize_image(init, p.width, p.height, p.resize_mode)), None
    mask = mask_from_image(p.mask, (p.mask_blur_x, p.mask_blur_y), p.inpainting_mask_invert)
    if p.inpaint_full_res and mask.size != init.size:  # a mask of another size (A1111 fails)
        mask = mask.resize(init.size, Image.BILINEAR)
    box = crop_region(mask, p.inpaint_full_res_padding, p.width, p.height) \
        if p.inpaint_full_res else None  # an empty mask falls back to the whole picture
    if box is not None:
        x1, y1, x2, y2 = box
        inp = _Inpaint(resize_image(mask.crop(box), p.width, p.height, 2),
                       masked_overlay(init, mask), (x1, y1, x2 - x1, y2 - y1))
        image = resize_image(init.crop(box), p.width, p.height, 2)
    else:
        m = resize_image(mask, p.width, p.height, p.resize_mode)
        # the overlay lets the generated pixels through at twice the blurred mask's strength
        doubled = Image.fromarray(np.clip(np.asarray(m, np.float32) * 2, 0, 255).astype(np.uint8))
        image = resize_image(init, p.width, p.height, p.resize_mode)
        inp = _Inpaint(m, masked_overlay(image, doubled))
    if p.inpainting_fill != 1:  # every mode but "original" starts from the filled image
        image = fill_masked(image, inp.mask)
    return image, inp


def _latent_mask(mask: Image.Image, h: int, w: int) -> torch.Tensor:
    """[1, 1, h, w], 1 = repaint: the mask resized to the latent (Pillow's default bicubic)
    and rounded (A1111's latmask with mask_round)."""
    small = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
    return torch.from_numpy(np.around(small))[None, None]


def _overlay(generated: Image.Image, inp: _Inpaint) -> Image.Image:
    """The original pasted back over the generated pixels (A1111 apply_overlay; for "only
    masked", the generated crop is first resized into its place, uncrop)."""
    if inp.paste_to is not None:
        x, y, w, h = inp.paste_to
        base = Image.new("RGBA", inp.overlay.size)
        base.paste(resize_image(generated, w, h, 1), (x, y))
        generated = base
    out = generated.convert("RGBA")
    out.alpha_composite(inp.overlay)
    return out.convert("RGB")


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


def _hires_params(p: GenerationParams) -> GenerationParams:
    """The job as the hires pass sees it: its own sampler, schedule and prompts where set."""
    return replace(p, sampler_name=p.hr_sampler_name or p.sampler_name,
                   scheduler=p.hr_scheduler or p.scheduler,
                   prompt=p.hr_prompt or p.prompt,
                   negative_prompt=p.hr_negative_prompt or p.negative_prompt)


def _check_prompt_sizes(engine: Engine, texts: list[str], limits: Limits) -> None:
    """Refuse prompts over the chunk limit before anything is encoded."""
    for t in dict.fromkeys(texts):
        limits.check("prompt length (75-token chunks)", len(engine.prompt_encoder.tokenize(t)),
                     "max_prompt_chunks")


class _Job:
    """One generate() call: the parameters resolved once, the passes run batch by batch."""

    def __init__(self, engine: Engine, p: GenerationParams, progress: ProgressFn | None):
        self.engine, self.p, self.progress = engine, p, progress
        self.prompt, tagged = extract_prompt_loras(p.prompt)
        self.negative, _ = extract_prompt_loras(p.negative_prompt)
        self.img2img = p.init_image is not None
        self.hr = p.enable_hr and not self.img2img
        self.hp = _hires_params(p) if self.hr else None
        self.schedule = engine.schedule
        # the sigmas each pass samples, known up front: they give the progress total
        if self.img2img:
            self.sigmas = sampling_sigmas(p.sampler_name, p.scheduler, p.steps, self.schedule,
                                          p.denoising_strength)
        else:
            self.sigmas = sampling_sigmas(p.sampler_name, p.scheduler, p.steps, self.schedule)
        self.hr_steps = p.hr_second_pass_steps or p.steps
        self.hr_sigmas = None
        if self.hr:
            hp = self.hp
            if hp.hr_upscaler.lower() not in LATENT_UPSCALERS:  # else a pixel upscaler
                upscalers.find(hp.hr_upscaler, engine.upscaler_dir)  # fail fast, naming them
            # A1111 runs exactly the requested hires steps (setup_img2img_steps with steps set)
            self.hr_sigmas = sampling_sigmas(hp.sampler_name, hp.scheduler, self.hr_steps,
                                             self.schedule, p.denoising_strength, fix_steps=True)
        form = engine.sampling.noise_form
        for name, sched in [(p.sampler_name, p.scheduler)] + (
                [(self.hp.sampler_name, self.hp.scheduler)] if self.hr else []):
            spec, _ = resolve_sampler(name, sched)
            if not spec.supports(form):  # fail before any work, naming the sampler
                raise SdloomError(f"sampler {spec.name!r} is not defined for "
                                  f"{engine.config.family} models ({form} noise form); choose "
                                  "another, e.g. Euler, Euler a, DPM++ 2M or DPM++ 2M SDE")
        self.per_batch = len(self.sigmas) - 1 + (len(self.hr_sigmas) - 1 if self.hr else 0)
        self.total = p.n_iter * self.per_batch
        self.lora_names = engine.set_loras(list(p.loras), tagged)
        self.loras = list(p.loras) + tagged
        self.units = []  # ControlNet units, loaded and preprocessed in run()
        self.clock: ControlClock | None = None  # the running pass's A1111 step counter
        if p.controlnets:
            engine.family.control_base(engine.config)  # refuses families without ControlNet
            for u in p.controlnets:
                u.resolved()  # fail before any work, naming the field
        self.ip_units = []  # IP-Adapters with their image tokens, prepared in run()
        if p.ip_adapters:
            if not hasattr(engine.family, "ip_adapted_model"):
                raise SdloomError(f"IP-Adapter is not supported for {engine.config.family} "
                                  "models (SD U-Nets only)")
            for u in p.ip_adapters:
                u.check()

    # ------------------------------------------------------------------ passes
    def _noise(self, seeds: list[int], subseeds: list[int], w: int, h: int) -> ImageRNG:
        lf = self.engine.latent_format
        return ImageRNG((lf.channels, h // lf.factor, w // lf.factor), seeds, subseeds,
                        self.p.subseed_strength,
                        (self.p.seed_resize_from_w, self.p.seed_resize_from_h),
                        self.p.eta_noise_seed_delta, factor=lf.factor)

    def _sample(self, p: GenerationParams, den, x: torch.Tensor, sigmas: torch.Tensor,
                rng: ImageRNG, extra: dict, done: int) -> torch.Tensor:
        def cb(d: dict) -> None:
            if self.clock is not None:  # A1111's callback_state: state.sampling_step = i
                self.clock.step = d["i"]
            if self.progress is not None:
                self.progress(done + d["i"] + 1, self.total, d.get("denoised"))

        return sample(p.sampler_name, p.scheduler, den, x, sigmas, generator=rng.generators,
                      extra_args=extra, callback=cb, eta=p.eta, s_noise=p.s_noise,
                      noise_form=self.engine.sampling.noise_form)

    def _conditioning(self, init_px: torch.Tensor | None, mask: torch.Tensor | None,
                      seeds: list[int], w: int, h: int) -> dict:
        """Inpainting models' c_concat: [repaint mask, latent of the image with the masked
        area blanked] (A1111 inpainting_image_conditioning: without a mask, txt2img, img2img
        and the hires pass alike, everything counts as masked)."""
        e = self.engine
        if not e.family.inpaint_channels(e.config):
            return {}
        f, n = e.latent_format.factor, len(seeds)
        if mask is None:
            m, px = torch.ones(1, 1, h, w), torch.zeros(1, 3, h, w)
        else:
            m, px = mask, init_px * (1 - mask)
        lat = e.encode(px.expand(n, -1, -1, -1), seeds)
        m = F.interpolate(m, size=(h // f, w // f)).expand(n, -1, -1, -1)
        return {"c_concat": torch.cat([m.to(lat), lat], dim=1).to(e.device)}

    def first_pass(self, prompts, negs, seeds, subseeds, init_img, inp, done) -> torch.Tensor:
        e, p = self.engine, self.p
        w, h = p.width, p.height
        rng = self._noise(seeds, subseeds, w, h)
        noise = rng.first().to(e.device)
        den = e.cfg_denoiser(prompts, negs, p.steps, p.cfg_scale, p.clip_skip, w, h,
                             p.aesthetic_score)
        den = self._controlled(den, "low", w, h, len(self.sigmas) - 1)
        den = self._referenced(den, "low", w, h, len(self.sigmas) - 1, seeds[0])
        den = self._ip_adapted(den, len(self.sigmas) - 1, hires=False)
        if init_img is None:
            x = e.sampling.noised(torch.zeros_like(noise), noise, self.sigmas[0])
            return self._sample(p, den, x, self.sigmas, rng, self._conditioning(None, None, seeds,
                                                                                 w, h), done)
        px = from_pil(init_img)
        init_lat = e.encode(px.expand(len(seeds), -1, -1, -1), seeds).to(e.device)
        f = e.latent_format.factor
        if p.resize_mode == 3 and init_lat.shape[-2:] != (h // f, w // f):
            # A1111's "Just resize (latent upscale)": the latent of the image as it is, scaled
            init_lat = F.interpolate(init_lat, size=(h // f, w // f), mode="bilinear")
        pix_mask = None
        if inp is not None:
            nmask = _latent_mask(inp.mask, *init_lat.shape[-2:]).to(init_lat)
            if p.inpainting_fill == 2:  # latent noise: seeded noise where masked
                fresh = ImageRNG(tuple(init_lat.shape[1:]), seeds).first().to(init_lat)
                init_lat = init_lat * (1 - nmask) + fresh * nmask
            elif p.inpainting_fill == 3:  # latent nothing
                init_lat = init_lat * (1 - nmask)
            m = torch.from_numpy(np.asarray(inp.mask.convert("L"), np.float32) / 255)
            pix_mask = m.round()[None, None]
            den = _blend(den, init_lat, nmask)
        extra = self._conditioning(px, pix_mask, seeds, w, h)
        x = e.sampling.noised(init_lat, noise, self.sigmas[0])
        out = self._sample(p, den, x, self.sigmas, rng, extra, done)
        if inp is not None:
            out = init_lat * (1 - nmask) + out * nmask
        return out

    def hires_pass(self, prompts, negs, seeds, subseeds, lat, done) -> torch.Tensor:
        """Upscale the first pass (in latent or pixel space) and denoise it again at the new
        size with exactly the requested hires steps."""
        e, hp = self.engine, self.hp
        w, h = hp.hr_size(e.family.size_multiple(e.config))
        f = e.latent_format.factor
        mode = LATENT_UPSCALERS.get(hp.hr_upscaler.lower())
        if mode is not None:
            aa = mode.endswith("-aa")
            m = mode.removesuffix("-aa")
            up = F.interpolate(lat.float(), size=(h // f, w // f), mode=m, antialias=aa,
                               **({} if m.startswith("nearest") else {"align_corners": False}))
        else:  # A1111: decode, upscale the pixels (Lanczos, Nearest, an ESRGAN model), encode
            imgs = [upscalers.upscale(im, hp.hr_upscaler, w, h, upscaler_dir=e.upscaler_dir,
                                      device=e.device) for im in to_pil(e.decode(lat))]
            up = e.encode(torch.cat([from_pil(im) for im in imgs]), seeds)
        rng = self._noise(seeds, subseeds, w, h)
        x = e.sampling.noised(up.to(e.device), rng.first().to(e.device), self.hr_sigmas[0])
        den = e.cfg_denoiser(prompts, negs, self.p.steps, hp.cfg_scale, hp.clip_skip, w, h,
                             hp.aesthetic_score, hires_steps=self.hr_steps)
        den = self._controlled(den, "high", w, h, len(self.hr_sigmas) - 1)
        den = self._referenced(den, "high", w, h, len(self.hr_sigmas) - 1, seeds[0])
        den = self._ip_adapted(den, len(self.hr_sigmas) - 1, hires=True)
        extra = self._conditioning(None, None, seeds, w, h)
        return self._sample(hp, den, x, self.hr_sigmas, rng, extra, done)

    # ------------------------------------------------------------------ the job
    def run(self) -> GenerationResult:
        p, e = self.p, self.engine
        seed = fix_seed(p.seed)
        subseed = fix_seed(p.subseed) if p.subseed_strength else -1
        seeds, subseeds = all_seeds(seed, p.batch_size * p.n_iter, subseed, p.subseed_strength)
        init_img, inp = _prepare_init(p) if self.img2img else (None, None)
        if p.controlnets:
            crop = None  # "Only masked": control images follow the crop (the extension)
            if inp is not None and inp.paste_to is not None:
                x, y, cw, ch = inp.paste_to
                crop = (inp.overlay.size, (x, y, x + cw, y + ch))
            self.units = prepare_units(p.controlnets, e.family.control_base(e.config),
                                       e.latent_format.channels,
                                       e.device, e.dtype, p.width, p.height, p.init_image,
                                       self.hr, seeds[0], crop)
        if p.ip_adapters:
            self.ip_units = self._prepare_ip_adapters()
        extra = self._extra_params(inp)
        images, infotexts = [], []
        for k in range(p.n_iter):
            sl = slice(k * p.batch_size, (k + 1) * p.batch_size)
            bs, bss = seeds[sl], subseeds[sl]
            prompts, negs = [self.prompt] * len(bs), [self.negative] * len(bs)
            if p.all_prompts is not None:
                prompts = [extract_prompt_loras(q)[0] for q in p.all_prompts[sl]]
            done = k * self.per_batch
            lat = self.first_pass(prompts, negs, bs, bss, init_img, inp, done)
            if self.hr:
                hp = self.hp
                hr_prompts = prompts if hp.prompt == p.prompt else \
                    [extract_prompt_loras(hp.prompt)[0]] * len(bs)
                hr_negs = [extract_prompt_loras(hp.negative_prompt)[0]] * len(bs)
                lat = self.hires_pass(hr_prompts, hr_negs, bs, bss, lat,
                                      done + len(self.sigmas) - 1)
            for j, im in enumerate(to_pil(e.decode(lat))):
                images.append(im if inp is None else _overlay(im, inp))
                shown = p.prompt if p.all_prompts is None else p.all_prompts[sl][j]
                infotexts.append(self._infotext(shown, bs[j], bss[j], extra))
        return GenerationResult(images, infotexts, seeds, subseeds, p)

    def _extra_params(self, inp: _Inpaint | None) -> dict[str, object]:
        """A1111's extra_generation_params for this job, in its order."""
        p, extra = self.p, {}
        if inp is not None:
            if p.mask_blur_x == p.mask_blur_y:
                extra["Mask blur"] = p.mask_blur_x
            else:
                extra.update({"Mask blur x": p.mask_blur_x, "Mask blur y": p.mask_blur_y})
            if p.inpainting_mask_invert:
                extra["Mask mode"] = "Inpaint not masked"
            extra["Masked content"] = FILL_NAMES[p.inpainting_fill]
            if inp.paste_to is not None:
                extra.update({"Inpaint area": "Only masked",
                              "Masked area padding": p.inpaint_full_res_padding})
        if self.hr:
            hp, p0 = self.hp, self.p
            hr_spec, hr_key = resolve_sampler(hp.sampler_name, hp.scheduler)
            extra.update({"Hires upscale": p.hr_scale if not (p.hr_resize_x or p.hr_resize_y)
                          else None,
                          "Hires resize": (f"{p.hr_resize_x}x{p.hr_resize_y}"
                                           if p.hr_resize_x or p.hr_resize_y else None),
                          "Hires steps": p.hr_second_pass_steps or None,
                          "Hires upscaler": p.hr_upscaler})
            # as A1111: recorded only where the second pass differs from the first
            if hp.sampler_name != p0.sampler_name:
                extra["Hires sampler"] = hr_spec.name
            if hp.scheduler != p0.scheduler:
                extra["Hires schedule type"] = scheduler_label(hr_key)
            if hp.prompt != p0.prompt:
                extra["Hires prompt"] = hp.prompt
            if hp.negative_prompt != p0.negative_prompt:
                extra["Hires negative prompt"] = hp.negative_prompt
        texts = [t for q in {self.prompt, self.negative, *(p.all_prompts or [])}
                 for _, t in prompt_schedule(q, p.steps)]
        used = self.engine.prompt_encoder.used_embeddings(texts)
        hashes = [f"{n}: {e.shorthash}" for n, e in sorted(used.items()) if e.shorthash]
        if hashes:
            extra["TI hashes"] = ", ".join(hashes)
        if self.lora_names:
            extra["Lora weights"] = ", ".join(f"{n}: {w:g}" for n, (_, w)
                                              in zip(self.lora_names, self.loras))
        for i, u in enumerate(self.units):  # sd-webui-controlnet's Infotext.write_infotext
            extra[f"ControlNet {i}"] = u.infotext()
        # IP-Adapters that came as the extension's units are its units too, numbered after
        labelled = [u for u in p.ip_adapters if u.label]
        for i, u in enumerate(labelled, len(self.units)):
            module, model = u.label.split("|", 1)
            extra[f"ControlNet {i}"] = (f"Module: {module}, Model: {model}, Weight: {u.weight}, "
                                        f"Guidance Start: {u.guidance_start}, "
                                        f"Guidance End: {u.guidance_end}")
        return extra

    def _controlled(self, den, which: str, w: int, h: int, steps: int):
        """The pass's CFG denoiser with the units that act in it (`which`: "low" or "high"
        by hr_option), its hints at w×h, and cond/uncond rows marked for "ControlNet is more
        important". Guidance start/end read A1111's step counter as the extension does
        (state.sampling_step / state.sampling_steps: the last finished step over the pass's
        sampler steps), not sigmas, so a unit stops at the step it stops at in A1111."""
        active = [u.active(w, h) for u in self.units
                  if which in u.passes and not u.reference]
        self.clock = None
        if not active:
            return den
        e = self.engine
        self.clock = ControlClock(0, steps, hires=which == "high")
        den.denoiser = e.sampling.denoiser(
            e.family.controlled_model(e.model, ControlSet(active, self.clock)))
        den.cond, den.uncond = _marked(den.cond, 1.0), _marked(den.uncond, 0.0)
        return den

    def _clocked(self, den, steps: int, hires: bool) -> bool:
        """The pass's A1111 step clock, made (and cond/uncond rows marked) by the first wrapper
        that needs one; True when an inner wrapper already takes the marks."""
        if self.clock is not None:
            return True
        self.clock = ControlClock(0, steps, hires=hires)
        den.cond, den.uncond = _marked(den.cond, 1.0), _marked(den.uncond, 0.0)
        return False

    def _referenced(self, den, which: str, w: int, h: int, steps: int, seed: int):
        """The pass's denoiser with the reference units (reference_only / reference_adain):
        the reference image's latent (VAE, posterior sampled with the job's seed) noised to
        each call's timestep steers the U-Net's self-attention and block statistics."""
        from ..controlnet import hint_tensor
        from ..models.reference import ActiveReference, style_fidelity
        refs = [u for u in self.units if u.reference and which in u.passes]
        if not refs:
            return den
        e = self.engine
        if not hasattr(e.family, "reference_model"):
            raise SdloomError("reference-only control needs an SD U-Net")
        active = []
        for u in refs:
            px = hint_tensor(u.detected, w, h, u.unit.resize_mode) * 2 - 1
            active.append(ActiveReference(
                e.encode(px, [seed]), u.unit.module, u.unit.weight, u.unit.guidance_start,
                u.unit.guidance_end, style_fidelity(u.unit.threshold_a, u.unit.control_mode,
                                                    which == "high", e.config.is_sdxl)))
        controlled = self._clocked(den, steps, which == "high")
        clock = self.clock
        den.denoiser = e.sampling.denoiser(e.family.reference_model(
            e.model, eager(den.denoiser.model), active, lambda: clock.fraction,
            torch.Generator().manual_seed(int(seed)), controlled))
        return den

    def _prepare_ip_adapters(self) -> list:
        """Load each IP-Adapter and its image encoder, check the adapter fits the U-Net and
        encode the reference images once for the whole job."""
        from ..models.clip_vision import load_clip_vision
        from ..models.ip_adapter import check_fits, encode_unit, load_ip_adapter
        e, out = self.engine, []
        for u in self.p.ip_adapters:
            adapter = load_ip_adapter(u.model, e.device, e.dtype)
            check_fits(adapter, e.model.unet, str(u.model))
            encoder = load_clip_vision(u.image_encoder, e.device, e.dtype)
            out.append(encode_unit(u, adapter, encoder))
        return out

    def _ip_adapted(self, den, steps: int, hires: bool):
        """The pass's denoiser with the IP-Adapters' image tokens; start/end read the same
        A1111 step counter as ControlNet's guidance window, uncond rows marked."""
        if not self.ip_units:
            return den
        e = self.engine
        controlled = self._clocked(den, steps, hires)
        clock = self.clock
        # the plain network, never its CUDA graphs: the adapter sets per-call attention state
        den.denoiser = e.sampling.denoiser(e.family.ip_adapted_model(
            e.model, eager(den.denoiser.model), self.ip_units, lambda: clock.fraction,
            controlled))
        return den

    def _infotext(self, prompt: str, seed: int, subseed: int, extra: dict) -> str:
        p, e = self.p, self.engine
        spec, scheduler = resolve_sampler(p.sampler_name, p.scheduler)
        resized = p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0
        params: dict[str, object] = {
            "Steps": p.steps, "Sampler": spec.name,
            "Schedule type": scheduler_label(scheduler) if scheduler else None,
            "CFG scale": p.cfg_scale, "Seed": seed, "Size": f"{p.width}x{p.height}",
            "Model hash": e.hash, "Model": e.name,
            "Variation seed": subseed if p.subseed_strength else None,
            "Variation seed strength": p.subseed_strength or None,
            "Seed resize from": (f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
                                 if resized else None),
            "Denoising strength": p.denoising_strength if self.img2img or self.hr else None,
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            "ENSD": p.eta_noise_seed_delta if p.eta_noise_seed_delta and spec.stochastic
            else None,
            "RNG": "CPU",
        }
        if e.vae_override is not None:  # A1111 names a chosen VAE and its hash
            from ..infotext import model_hash
            params["VAE hash"] = model_hash(e.vae_override)
            params["VAE"] = e.vae_override.name
        params.update(extra)
        params["Version"] = f"sdloom {__version__}"
        return format_infotext(prompt, p.negative_prompt, params)


def _marked(at, mark: float):
    """Conditioning at a step with `cond_mark` (1 on cond rows, 0 on uncond rows): the
    extension's prompt marks, which its "ControlNet is more important" mode reads."""
    def kwargs(step: int) -> dict:
        c = dict(at(step))
        c["cond_mark"] = torch.full((c["context"].shape[0],), mark)
        return c
    return kwargs


def _blend(den, init_lat: torch.Tensor, nmask: torch.Tensor):
    """Inpainting's latent blend (A1111 CFGDenoiser with a mask): outside the mask x̂0 is the
    original latent."""
    def blended(x, sigma, **kw):
        return init_lat * (1 - nmask) + den(x, sigma, **kw) * nmask
    return blended


def generate(engine: Engine, p: GenerationParams, progress: ProgressFn | None = None,
             limits: Limits = DEFAULT_LIMITS) -> GenerationResult:
    """Run one job (txt2img, img2img or inpaint; hires fix optional) and return the images."""
    why = engine.family.generation_refusal(engine.config)
    if why:
        raise SdloomError(why)
    p.validate(engine.config.default_size, limits, engine.family.size_multiple(engine.config))
    texts = [p.prompt, p.negative_prompt, p.hr_prompt, p.hr_negative_prompt,
             *(p.all_prompts or [])]
    _check_prompt_sizes(engine, [extract_prompt_loras(t)[0] for t in texts], limits)
    return _Job(engine, p, progress).run()
