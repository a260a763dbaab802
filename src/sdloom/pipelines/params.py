"""The parameters of one generation job: the library API shared by CLI, server and training samples.

Field names follow A1111's API (`/sdapi/v1/txt2img`, `img2img`) so the server maps them 1:1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from ..errors import SdloomError
from ..limits import DEFAULT_LIMITS, Limits

MAX_MASK_BLUR = 64  # pixels (σ); A1111's slider goes to 64
SEED_END = 2 ** 64  # torch generators take seeds below 2^64; seed + i must stay below it

FILL_MODES = {"fill": 0, "original": 1, "latent-noise": 2, "noise": 2, "latent-nothing": 3}
FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


@dataclass
class GenerationParams:
    """One txt2img / img2img / inpaint job (A1111 names)."""
    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None  # None: the model's default size
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "DPM++ 2M"
    scheduler: str | None = "automatic"
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1  # A1111's seed resize: noise drawn at this size, centred
    seed_resize_from_h: int = -1
    eta_noise_seed_delta: int = 0  # A1111's ENSD option: sampling noise from seed + ENSD
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    eta: float | None = None
    s_noise: float | None = None
    # img2img / inpaint
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: Image.Image | None = None
    mask_blur: int | None = None  # sets mask_blur_x and mask_blur_y (A1111)
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None: the first pass's sampler (A1111 "Use same")
    hr_scheduler: str | None = None
    hr_prompt: str = ""  # "": the first pass's prompt
    hr_negative_prompt: str = ""
    # SDXL conditioning
    aesthetic_score: float = 6.0
    # extra networks: (path or name, weight)
    loras: list[tuple[str, float]] = field(default_factory=list)
    # one prompt per image (batch_size × n_iter of them) instead of `prompt` for all, as in
    # A1111's processing object (what its prompt-matrix and X/Y scripts use); LoRA tags in
    # them are not applied (only `prompt`'s and `loras` are)
    all_prompts: list[str] | None = None
    # ControlNet units (sdloom.controlnet.ControlUnit), applied together: their residuals add
    controlnets: list = field(default_factory=list)
    # IP-Adapters (sdloom.models.ip_adapter.IPAdapterUnit): image prompts, their terms added
    ip_adapters: list = field(default_factory=list)

    def validate(self, default_size: int, limits: Limits = DEFAULT_LIMITS,
                 multiple: int = 8) -> None:
        """Raise SdloomError with one clear line for anything a model cannot run or a limit
        forbids. Sizes that are not multiples of `multiple` (the model family's: 8 pixels per
        latent cell for SD) are rounded down, as A1111's latent size (height // 8) does; the
        infotext records the size generated."""
        for name in ("width", "height"):
            v = getattr(self, name)
            v = default_size if v is None else v
            if not isinstance(v, int) or v < 64:
                raise SdloomError(f"{name} must be at least 64 pixels, got {v}")
            limits.check(name, v, "max_side")
            setattr(self, name, v // multiple * multiple)
        limits.check("image size (pixels)", self.width * self.height, "max_pixels")
        limits.check("batch size × image pixels", self.width * self.height * self.batch_size,
                     "max_batch_pixels")
        if not 1 <= self.steps:
            raise SdloomError(f"steps must be at least 1, got {self.steps}")
        limits.check("steps", self.steps, "max_steps")
        if self.batch_size < 1 or self.n_iter < 1:
            raise SdloomError("batch size and batch count must be at least 1")
        limits.check("batch size", self.batch_size, "max_batch_size")
        limits.check("images (batch size × batch count)", self.batch_size * self.n_iter,
                     "max_images")
        for name in ("cfg_scale", "denoising_strength", "subseed_strength", "eta", "s_noise",
                     "hr_scale", "aesthetic_score"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise SdloomError(f"{name} must be a finite number, got {v}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise SdloomError(f"denoising strength must be in [0, 1], got "
                              f"{self.denoising_strength}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise SdloomError(f"variation strength must be in [0, 1], got {self.subseed_strength}")
        last = SEED_END - self.batch_size * self.n_iter
        for name in ("seed", "subseed"):
            v = getattr(self, name)
            if not -1 <= v <= last:
                raise SdloomError(f"{name} must be -1 (random) or between 0 and {last} for "
                                  f"{self.batch_size * self.n_iter} images, got {v}")
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt",
                     *(["all_prompts"] if self.all_prompts else [])):
            for text in (getattr(self, name) if name == "all_prompts" else [getattr(self, name)]):
                try:
                    size = len(text.encode("utf-8"))
                except UnicodeEncodeError:
                    raise SdloomError(f"{name} is not valid text (it holds a lone surrogate)"
                                      ) from None
                limits.check(f"{name} length (bytes)", size, "max_prompt_bytes")
        if self.clip_skip < 1:
            raise SdloomError(f"clip skip must be ≥ 1, got {self.clip_skip}")
        if self.mask is not None and self.init_image is None:
            raise SdloomError("a mask needs an init image")
        if self.all_prompts is not None and len(self.all_prompts) != self.batch_size * self.n_iter:
            raise SdloomError(f"all_prompts holds {len(self.all_prompts)} prompts for "
                              f"{self.batch_size * self.n_iter} images")
        if self.resize_mode == 3 and self.mask is not None:
            raise SdloomError("resize mode 3 (latent upscale) takes no mask (as in A1111, "
                              "the masked image must match the size): use 0, 1 or 2")
        if self.inpainting_fill not in FILL_NAMES:
            raise SdloomError(f"masked content must be one of {sorted(FILL_MODES)}")
        if self.mask_blur is not None:
            self.mask_blur_x = self.mask_blur_y = self.mask_blur
        if min(self.mask_blur_x, self.mask_blur_y, self.inpaint_full_res_padding) < 0:
            raise SdloomError("mask blur and padding must be ≥ 0")
        if max(self.mask_blur_x, self.mask_blur_y) > MAX_MASK_BLUR:
            raise SdloomError(f"mask blur must be at most {MAX_MASK_BLUR}")
        if self.inpaint_full_res_padding > limits.max_side:
            raise SdloomError(f"inpaint padding must be at most {limits.max_side}")
        if self.enable_hr and self.init_image is None:
            if not self.hr_scale > 0 or min(self.hr_resize_x, self.hr_resize_y) < 0:
                raise SdloomError("hires scale must be > 0 and hires sizes ≥ 0")
            hw, hh = self.hr_size(multiple)
            for name, v in (("hires width", hw), ("hires height", hh)):
                if v < 64:
                    raise SdloomError(f"{name} must be at least 64 pixels, got {v}")
                limits.check(name, v, "max_side")
            limits.check("hires image size (pixels)", hw * hh, "max_pixels")
            limits.check("batch size × hires image pixels", hw * hh * self.batch_size,
                         "max_batch_pixels")

    def hr_size(self, multiple: int = 8) -> tuple[int, int]:
        """Target size of the hires pass, rounded to multiples of 8 (A1111: hr_resize or scale)."""
        if self.hr_resize_x or self.hr_resize_y:
            w = self.hr_resize_x or self.hr_resize_y * self.width // self.height
            h = self.hr_resize_y or self.hr_resize_x * self.height // self.width
        else:
            w, h = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        return w // multiple * multiple, h // multiple * multiple
