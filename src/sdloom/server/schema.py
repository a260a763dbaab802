"""A1111's request bodies (`/sdapi/v1/txt2img`, `img2img`, `png-info`) as pydantic models, and
the checks every body passes before any route sees it.

Field names and defaults are A1111's (docs/a1111.md). The bounds here are the request's
shape (a count is ≥ 1, a strength is in [0, 1], a seed fits a 64-bit generator); how much a job
may ask of the machine is `Limits`, checked by GenerationParams.validate.
"""
from __future__ import annotations

import math
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_DEPTH = 32  # JSON nesting; A1111 bodies are two levels deep (override_settings, scripts)
SEED_END = 2 ** 64  # torch.Generator.manual_seed takes seeds below 2^64


def check_json(value: Any, where: str = "body", depth: int = 0) -> None:
    """Refuse what JSON parsers let through but nothing downstream can use: NaN and ±Infinity
    (Python's json reads them; JSON has no such numbers), strings with lone surrogates (JSON
    "\\ud800" decodes to one; it cannot be encoded to UTF-8 anywhere later) and deep nesting."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(str(k), where)
            check_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json(v, f"{where}[{i}]", depth + 1)


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where.encode('utf-8', 'replace').decode()}: text holds a lone "
                         "surrogate (invalid Unicode)") from None


class Body(BaseModel):
    """A request body: unknown fields are accepted and ignored (A1111 clients send many), but
    every value, known or not, passes check_json."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_and_valid_text(cls, data: Any) -> Any:
        check_json(data)
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: _lenient(fields[k].annotation, v) if k in fields else v
                    for k, v in data.items() if not (v is None and k in fields)}
        return data


def _lenient(annotation: Any, v: Any) -> Any:
    """A1111's pydantic-1 models take every field as Optional (null = not given, so the
    default; dropped above) and turn a float in an integer field into its integer part."""
    ints = annotation is int or (get_origin(annotation) in (Union, UnionType)
                                 and int in get_args(annotation))
    if ints and isinstance(v, float) and math.isfinite(v):
        return int(v)
    return v


Seed = Annotated[int, Field(ge=-1, lt=SEED_END)]
Count = Annotated[int, Field(ge=1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Size = Annotated[int | None, Field(ge=1)]  # None: the model's own size; 0 is refused
NonNeg = Annotated[int, Field(ge=0)]
Blur = Annotated[int, Field(ge=0, le=64)]  # A1111's slider range; a Gaussian kernel of 2.5σ


class Txt2ImgRequest(Body):
    """A1111's StableDiffusionProcessingTxt2Img fields (all optional)."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: Seed = -1
    subseed: Seed = -1
    subseed_strength: Unit = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: Count = 1
    n_iter: Count = 1
    steps: Count = 50
    cfg_scale: float = 7.0
    width: Size = None
    height: Size = None
    eta: float | None = None
    s_noise: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    denoising_strength: Unit | None = None
    hr_scale: Annotated[float, Field(gt=0.0)] = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: NonNeg = 0
    hr_resize_x: NonNeg = 0
    hr_resize_y: NonNeg = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    script_name: str | None = None
    script_args: list[Any] = []  # the script's arguments by position (server/xyz.py)
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False
    force_task_id: Annotated[str | None, Field(max_length=200)] = None  # else task(<kind>-…)


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionProcessingImg2Img fields (its API defaults)."""
    init_images: list[str] | None = None
    mask: str | None = None
    include_init_images: bool = False
    resize_mode: Annotated[int, Field(ge=0, le=3)] = 0
    mask_blur: Blur | None = None
    mask_blur_x: Blur = 4
    mask_blur_y: Blur = 4
    inpainting_fill: Annotated[int, Field(ge=0, le=3)] = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Annotated[int, Field(ge=0, le=256)] = 0
    inpainting_mask_invert: Annotated[int, Field(ge=0, le=1)] = 0


class PngInfoRequest(Body):
    image: str


class ExtrasBaseRequest(Body):
    """A1111's ExtrasBaseRequest (`/extra-single-image`, `/extra-batch-images`)."""
    resize_mode: Annotated[int, Field(ge=0, le=1)] = 0  # 0: by upscaling_resize, 1: to w×h
    show_extras_results: bool = True
    gfpgan_visibility: Unit = 0.0
    codeformer_visibility: Unit = 0.0
    codeformer_weight: Unit = 0.0
    upscaling_resize: Annotated[float, Field(ge=1.0, le=8.0)] = 2.0
    upscaling_resize_w: Annotated[int, Field(ge=1)] = 512
    upscaling_resize_h: Annotated[int, Field(ge=1)] = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: Unit = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(BaseModel):
    """One image of an extras batch: base64 data and a file name."""
    model_config = ConfigDict(extra="allow")
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData]
