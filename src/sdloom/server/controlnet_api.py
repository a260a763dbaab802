"""sd-webui-controlnet's HTTP API over sdloom's ControlNet: the units of
`alwayson_scripts.controlnet.args` → `ControlUnit`s, and the `/controlnet/*` routes.

Field names, enums and legacy aliases are the extension's (internal_controlnet/external_code.py,
API version 2, and args.py): a unit is a dict; `input_image→image`, `lowvram→low_vram`,
`guidance→guidance_end`; resize modes by name, by the old names ("Inner Fit (Scale to Fit)", …)
or 0/1/2 (3, "Just Resize (Latent upscale)", is Just Resize); a processor resolution or
threshold outside its slider's range falls back to the slider's default, as the extension's
bound check does. A unit without `enabled` counts as enabled (API version 2's default) unless it
is an empty slot (no model, no image), which clients send to fill the UI's unit count.

Differences, each deliberate: a unit that sdloom cannot run (an unknown or weight-needing
preprocessor, an unknown model, a bad enum) is a 422 naming its field instead of a log line
and a silently skipped unit; models are found by name inside `--controlnet-dir` (and the
shipped ones that fit the loaded model, e.g. sdloom-emoji-canny), never by a path; the
positional (non-dict) unit form is refused; masks are read but unused (no inpaint
preprocessor yet).
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..controlnet import (ALIASES, DEFAULTS, HR_OPTIONS, REFERENCE, RESIZE_MODES,
                          ControlUnit, find_controlnet, legacy_hash, list_controlnets,
                          preprocess, preprocessor_name)
from ..errors import NotFoundError, SdloomError
from ..families.sd_controlnet import MODES
from ..infotext import encode_image
from .schema import Body

API_VERSION = 2  # external_code.get_api_version() of the fields served here
MAX_UNITS = 4  # enabled units per request: each holds a ControlNet in memory for the job
MAX_ARGS = 32  # unit slots (enabled or not) a request may send
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Envelope (Outer Fit)": "Resize and Fill"}
LEGACY = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end"}
RES_SLIDER = {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048,
              "step": 8}
# the extension's sliders (processor_res, threshold_a, threshold_b) of the modules sdloom runs
SLIDERS: dict[str, tuple[dict | None, dict | None, dict | None]] = {
    "none": (None, None, None),
    "invert": (RES_SLIDER, None, None),
    "canny": (RES_SLIDER,
              {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
              {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}),
    "threshold": (RES_SLIDER, {"name": "Binarization Threshold", "value": 127, "min": 0,
                               "max": 255, "step": 1}, None),
    "shuffle": (RES_SLIDER, None, None),
    "tile_resample": (None, {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0,
                             "max": 8.0, "step": 0.01}, None),
    **{m: (None, {"name": "Style Fidelity (only for Balanced mode)", "value": 0.5, "min": 0.0,
                  "max": 1.0, "step": 0.01}, None) for m in REFERENCE},
}
assert set(SLIDERS) == set(DEFAULTS)
LABELS = {v: k for k, v in ALIASES.items() if k.startswith("invert")}  # alias_names=true
# the extension's control types (Preprocessor tags) for sdloom's modules: the modules, the
# model-name filter, the default module
CONTROL_TYPES = {"All": (list(DEFAULTS), "", "none"), "Canny": (["none", "canny", "invert"],
                                                                 "canny", "canny"),
                 "Shuffle": (["none", "shuffle"], "shuffle", "shuffle"),
                 "Tile": (["none", "tile_resample"], "tile", "tile_resample"),
                 "Reference": (list(REFERENCE), "", "reference_only"),
                 "IP-Adapter": (["ip-adapter_clip_sd15", "ip-adapter_clip_sdxl_plus_vith",
                                 "ip-adapter_clip_sdxl"], "ip-adapter", "ip-adapter_clip_sd15")}


# ---------------------------------------------------------------------- request values
def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise SdloomError(f"{where} must be true or false, got {v!r}")
    return v


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SdloomError(f"{where} must be a number, got {v!r}")
    return float(v)


def _int(v: Any, where: str) -> int:
    f = _number(v, where)
    if f != int(f):
        raise SdloomError(f"{where} must be an integer, got {v!r}")
    return int(f)


def _enum(v: Any, names: tuple[str, ...], where: str, aliases: dict[str, str] | None = None,
          extra_ints: dict[int, int] | None = None) -> int:
    """An enum field as its index: a name (or an old name) or 0…n−1."""
    if isinstance(v, str):
        v2 = (aliases or {}).get(v, v)
        if v2 in names:
            return names.index(v2)
    elif isinstance(v, int) and not isinstance(v, bool):
        if 0 <= v < len(names):
            return v
        if extra_ints and v in extra_ints:
            return extra_ints[v]
    raise SdloomError(f"{where} must be one of {', '.join(map(repr, names))} (or 0–"
                      f"{len(names) - 1}), got {v!r}")


def _module(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise SdloomError(f"{where} must be a preprocessor name, got {v!r}")
    try:
        return preprocessor_name(v)
    except SdloomError as e:
        raise SdloomError(f"{where}: {e}") from None


def _in_slider(value: float, slider: dict | None) -> float:
    """The extension's bound check: outside the slider's range → -1 (the module default)."""
    if slider is None or not slider["min"] <= value <= slider["max"]:
        return -1
    return value


def _unit_image(unit: dict[str, Any], where: str, limits, decode) -> Any:
    """image: base64, {"image", "mask"} or [image, mask]; a top-level mask is read too. The
    mask is checked like any image but not used (no inpaint preprocessor yet)."""
    img, mask = unit.get("image"), unit.get("mask", unit.get("mask_image"))
    if isinstance(img, dict):
        if "image" not in img:
            raise SdloomError(f"{where}.image: expected {{\"image\": …, \"mask\": …}}")
        img, mask = img["image"], img.get("mask", mask)
    elif isinstance(img, list):
        if len(img) != 2:
            raise SdloomError(f"{where}.image: expected one image or [image, mask]")
        img, mask = img
    if img in (None, ""):
        if mask not in (None, ""):
            raise SdloomError(f"{where}.mask: a mask without an image")
        return None
    out = decode(img, f"{where}.image", limits)
    if mask not in (None, ""):
        m = decode(mask, f"{where}.mask", limits)
        if m.size != out.size:
            raise SdloomError(f"{where}.mask: {m.width}x{m.height} is not the image's size "
                              f"{out.width}x{out.height}")
    return out


# the extension's IP-Adapter preprocessors → the CLIP vision encoder each runs (its file in the
# extension's annotator/downloads/clip_vision, here --clip-vision-dir)
IP_ADAPTER_MODULES = {"ip-adapter_clip_sd15": "clip_h",
                      "ip-adapter_clip_sdxl_plus_vith": "clip_h",
                      "ip-adapter_clip_sdxl": "clip_g"}


def _ip_unit(unit: dict[str, Any], module: str, where: str, server, decode):
    """An IP-Adapter unit as the extension takes it: the adapter file from the ControlNet
    folder (`model`), the encoder its preprocessor names, weight and guidance start/end."""
    from ..models.ip_adapter import IPAdapterUnit
    model = unit.get("model", "None")
    if not isinstance(model, str) or model in ("", "None"):
        raise SdloomError(f"{where}.model: an IP-Adapter unit needs its adapter file; "
                          "GET /controlnet/model_list lists them")
    try:
        path = find_controlnet(model, server.controlnet_dir, server.loaded_config())
    except NotFoundError as e:
        raise SdloomError(f"{where}.model: {e}; GET /controlnet/model_list lists them") \
            from None
    encoder = server.clip_vision(IP_ADAPTER_MODULES[module], f"{where}.module")
    kw = {name: _number(unit[name], f"{where}.{name}")
          for name in ("weight", "guidance_start", "guidance_end") if name in unit}
    image = _unit_image(unit, where, server.limits, decode)
    if image is None:
        raise SdloomError(f"{where}.image: an IP-Adapter unit needs its reference image")
    u = IPAdapterUnit(str(path), str(encoder), [image], **kw)
    try:
        u.check()
    except SdloomError as e:
        raise SdloomError(f"{where}: {e}") from None
    u.label = f"{module}|{Path(path).stem} [{legacy_hash(Path(path))}]"
    return u


def parse_unit(raw: Any, where: str, server, decode):
    """One unit of `alwayson_scripts.controlnet.args` → a checked ControlUnit (an
    IPAdapterUnit for the ip-adapter_* modules), or None when it is disabled (or an empty
    slot)."""
    if not isinstance(raw, dict):
        raise SdloomError(f"{where}: a ControlNet unit must be an object with the "
                          "extension's field names (the positional form is not supported)")
    unit = dict(raw)
    for old, new in LEGACY.items():
        if old in unit:
            if new in unit:
                raise SdloomError(f"{where}: both {old!r} and {new!r} given; send {new!r}")
            unit[new] = unit.pop(old)
    model = unit.get("model", "None")
    if "enabled" in unit:
        if not _bool(unit["enabled"], f"{where}.enabled"):
            return None
    elif model in (None, "", "None") and unit.get("image") in (None, ""):
        return None  # an empty slot
    if unit.get("module") in IP_ADAPTER_MODULES:
        return _ip_unit(unit, unit["module"], where, server, decode)
    module = _module(unit.get("module", "none"), f"{where}.module")
    if module in REFERENCE:  # reference units take no model (the extension sends "None")
        path = "None"
    elif not isinstance(model, str) or model in ("", "None"):
        raise SdloomError(f"{where}.model: an enabled unit needs a ControlNet model; "
                          "GET /controlnet/model_list lists them")
    else:
        try:
            path = find_controlnet(model, server.controlnet_dir, server.loaded_config())
        except NotFoundError as e:
            raise SdloomError(f"{where}.model: {e}; GET /controlnet/model_list lists them") \
                from None
    res_s, a_s, b_s = SLIDERS[module]
    kw: dict[str, Any] = {"module": module}
    for name in ("weight", "guidance_start", "guidance_end"):
        if name in unit:
            kw[name] = _number(unit[name], f"{where}.{name}")
    if "processor_res" in unit:
        kw["processor_res"] = int(_in_slider(_int(unit["processor_res"],
                                                  f"{where}.processor_res"), res_s))
    for name, slider in (("threshold_a", a_s), ("threshold_b", b_s)):
        if name in unit:
            kw[name] = _in_slider(_number(unit[name], f"{where}.{name}"), slider)
    for name in ("low_vram", "pixel_perfect"):
        if name in unit:
            kw[name] = _bool(unit[name], f"{where}.{name}")
    if "resize_mode" in unit:  # 3: A1111's "Just Resize (Latent upscale)" is Just Resize
        kw["resize_mode"] = _enum(unit["resize_mode"], RESIZE_MODES, f"{where}.resize_mode",
                                  RESIZE_ALIASES, {3: 0})
    if "control_mode" in unit:
        kw["control_mode"] = _enum(unit["control_mode"], MODES, f"{where}.control_mode")
    if "hr_option" in unit:
        kw["hr_option"] = HR_OPTIONS[_enum(unit["hr_option"], HR_OPTIONS,
                                           f"{where}.hr_option")]
    image = _unit_image(unit, where, server.limits, decode)
    u = ControlUnit(str(path), image, **kw)
    try:
        u.resolved()  # weight and guidance ranges: checked before the job waits
    except SdloomError as e:
        raise SdloomError(f"{where}: {e}") from None
    return u


def units_from_scripts(scripts: dict[str, Any], server, decode, img2img: bool
                       ) -> tuple[list[ControlUnit], list]:
    """`alwayson_scripts` → (ControlNet units, IP-Adapter units); any other script is
    refused, by name."""
    units: list = []
    other = [k for k in scripts if k.lower() != "controlnet"]
    if other:
        raise SdloomError(f"alwayson_scripts: not supported by sdloom: "
                          f"{', '.join(map(repr, other))} (only 'controlnet')")
    for key, value in scripts.items():
        where = f"alwayson_scripts.{key}"
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
            raise SdloomError(f"{where}: expected {{\"args\": [unit, …]}}")
        args = value.get("args", [])
        if len(args) > MAX_ARGS:
            raise SdloomError(f"{where}.args: at most {MAX_ARGS} units, got {len(args)}")
        for i, raw in enumerate(args):
            u = parse_unit(raw, f"{where}.args[{i}]", server, decode)
            if u is None:
                continue
            if isinstance(u, ControlUnit) and u.image is None and not img2img:
                raise SdloomError(f"{where}.args[{i}].image: txt2img needs a control image "
                                  "(img2img uses the init image)")
            units.append(u)
    if len(units) > MAX_UNITS:
        raise SdloomError(f"alwayson_scripts.controlnet: at most {MAX_UNITS} enabled units, "
                          f"got {len(units)}")
    return ([u for u in units if isinstance(u, ControlUnit)],
            [u for u in units if not isinstance(u, ControlUnit)])


# ---------------------------------------------------------------------- routes
class DetectRequest(Body):
    """The extension's POST /controlnet/detect body."""
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = []
    low_vram: bool = False


def module_detail(name: str) -> dict[str, Any]:
    if name in IP_ADAPTER_MODULES:
        return {"model_free": False, "sliders": []}
    return {"model_free": name in REFERENCE,
            "sliders": [s for s in SLIDERS[name] if s is not None]}


def add_controlnet_routes(app: FastAPI, server, decode) -> None:
    """GET /controlnet/version, model_list, module_list, control_types, settings and
    POST /controlnet/detect, with the extension's shapes (scripts/api.py)."""

    @app.get("/controlnet/version")
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True) -> dict[str, Any]:
        return {"model_list": list(list_controlnets(server.controlnet_dir,
                                                    server.loaded_config()))}

    @app.get("/controlnet/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        names = [LABELS.get(m, m) if alias_names else m for m in DEFAULTS]
        names += list(IP_ADAPTER_MODULES)
        return {"module_list": names,
                "module_detail": {n: module_detail(ALIASES.get(n, n)) for n in names}}

    @app.get("/controlnet/control_types")
    def control_types() -> dict[str, Any]:
        models = list(list_controlnets(server.controlnet_dir, server.loaded_config()))
        out = {}
        for kind, (modules, filt, default) in CONTROL_TYPES.items():
            found = [m for m in models if filt in m.lower()]
            out[kind] = {"module_list": modules, "model_list": ["None", *found],
                         "default_option": default,
                         "default_model": found[0] if found and filt else "None"}
        return {"control_types": out}

    @app.get("/controlnet/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": MAX_UNITS}

    @app.post("/controlnet/detect")
    async def detect(req: DetectRequest) -> dict[str, Any]:
        module = _module(req.controlnet_module, "controlnet_module")
        if not req.controlnet_input_images:
            raise SdloomError("controlnet_input_images: no image selected")
        server.limits.check("images", len(req.controlnet_input_images), "max_images")
        images = [decode(d, f"controlnet_input_images[{i}]", server.limits)
                  for i, d in enumerate(req.controlnet_input_images)]
        res_s, a_s, b_s = SLIDERS[module]
        unit = ControlUnit("", module=module,
                           processor_res=int(_in_slider(req.controlnet_processor_res, res_s)),
                           threshold_a=_in_slider(req.controlnet_threshold_a, a_s),
                           threshold_b=_in_slider(req.controlnet_threshold_b, b_s)).resolved()

        def run() -> list[str]:
            return [base64.b64encode(encode_image(preprocess(unit, im), "png")).decode("ascii")
                    for im in images]
        return {"images": await run_in_threadpool(run), "info": "Success"}
