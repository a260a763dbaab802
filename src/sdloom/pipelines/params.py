"""The parameters of one generation job: the library API shared by CLI, server and training samples.

Field names follow A1111's API (`/sdapi/v1/txt2img`, `img2img`) so the server maps them 1:1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ..errors import SdloomError

MAX_SIDE = 4096  # pixels; larger sizes are almost surely a typo and would exhaust memory

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
    mask_blur: int = 4
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

    def validate(self, default_size: int) -> None:
        """Raise SdloomError with one clear line for anything a model cannot run."""
        self.width = self.width or default_size
        self.height = self.height or default_size
        for name in ("width", "height"):
            v = getattr(self, name)
            if v % 8:
                raise SdloomError(f"{name} must be a multiple of 8, got {v}")
            if not 64 <= v <= MAX_SIDE:
                raise SdloomError(f"{name} must be between 64 and {MAX_SIDE}, got {v}")
        if not 1 <= self.steps <= 1000:
            raise SdloomError(f"steps must be between 1 and 1000, got {self.steps}")
        if not 1 <= self.batch_size <= 64 or not 1 <= self.n_iter <= 1000:
            raise SdloomError("batch size must be 1..64 and n_iter 1..1000")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise SdloomError(f"denoising strength must be in [0, 1], got "
                              f"{self.denoising_strength}")
        if self.clip_skip < 1:
            raise SdloomError(f"clip skip must be ≥ 1, got {self.clip_skip}")
        if self.mask is not None and self.init_image is None:
            raise SdloomError("a mask needs an init image")
        if self.all_prompts is not None and len(self.all_prompts) != self.batch_size * self.n_iter:
            raise SdloomError(f"all_prompts holds {len(self.all_prompts)} prompts for "
                              f"{self.batch_size * self.n_iter} images")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise SdloomError(f"mask size {self.mask.size[0]}x{self.mask.size[1]} differs from "
                              f"image size {self.init_image.size[0]}x{self.init_image.size[1]}")
        if self.inpainting_fill not in FILL_NAMES:
            raise SdloomError(f"masked content must be one of {sorted(FILL_MODES)}")
        if self.enable_hr:
            hw, hh = self.hr_size()
            if max(hw, hh) > MAX_SIDE:
                raise SdloomError(f"hires size {hw}x{hh} exceeds {MAX_SIDE}")

    def hr_size(self) -> tuple[int, int]:
        """Target size of the hires pass, rounded to multiples of 8 (A1111: hr_resize or scale)."""
        if self.hr_resize_x or self.hr_resize_y:
            w = self.hr_resize_x or self.hr_resize_y * self.width // self.height
            h = self.hr_resize_y or self.hr_resize_x * self.height // self.width
        else:
            w, h = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        return w // 8 * 8, h // 8 * 8
