"""ControlNet units as A1111's sd-webui-controlnet describes them: the unit fields, the
preprocessors that need no annotator weights, the control image's resize modes and pixel-perfect
resolution, loading ControlNet files, and the infotext line of a unit.
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoints.load import open_file
from .errors import NotFoundError, SdloomError
from .families import family_of
from .families.sd_controlnet import (MODES, ActiveControl, ControlClock, ControlSet,
                                     build_controlnet, controlnet_keys, detect_controlnet,
                                     fit_to_unet)

__all__ = ["ControlClock", "ControlSet", "ControlUnit", "find_controlnet", "list_controlnets",
           "prepare_units"]
from .images import resize_image
from .io import display_name
from .models.controlnet import ControlNet

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # images.resize_image 0/1/2
HR_OPTIONS = ("Both", "Low res only", "High res only")

# preprocessors that need annotator weights: module → the files the extension downloads
NEEDS_WEIGHTS = {
    "depth_midas": "dpt_hybrid-midas-501f0c75.pt (MiDaS)",
    "depth": "dpt_hybrid-midas-501f0c75.pt (MiDaS)",
    "depth_leres": "res101.pth (LeReS)", "depth_leres++": "res101.pth (LeReS)",
    "depth_zoe": "ZoeD_M12_N.pt (ZoeDepth)",
    "depth_anything": "depth_anything_vitl14.pth",
    "openpose": "body_pose_model.pth", "openpose_hand": "body_pose_model.pth, hand_pose_model.pth",
    "openpose_face": "body_pose_model.pth, facenet.pth",
    "openpose_full": "body_pose_model.pth, hand_pose_model.pth, facenet.pth",
    "dw_openpose_full": "yolox_l.onnx, dw-ll_ucoco_384.onnx (DWPose)",
    "mlsd": "mlsd_large_512_fp32.pth (M-LSD)",
    "lineart_realistic": "sk_model.pth", "lineart_coarse": "sk_model2.pth",
    "lineart_anime": "netG.pth", "lineart_anime_denoise": "erika.pth",
    "softedge_hed": "ControlNetHED.pth", "softedge_hedsafe": "ControlNetHED.pth",
    "scribble_hed": "ControlNetHED.pth", "hed": "ControlNetHED.pth",
    "softedge_pidinet": "table5_pidinet.pth", "softedge_pidisafe": "table5_pidinet.pth",
    "scribble_pidinet": "table5_pidinet.pth",
    "normal_bae": "scannet.pt (NormalBAE)", "normal_midas": "dpt_hybrid-midas-501f0c75.pt",
    "seg_ofade20k": "250_16_swin_l_oneformer_ade20k_160k.pth (OneFormer)",
    "seg_ofcoco": "150_16_swin_l_oneformer_coco_100ep.pth (OneFormer)",
    "seg_ufade20k": "upernet_global_small.pth (UniFormer)",
    "mediapipe_face": "the mediapipe face-mesh model",
    "ip-adapter_face_id": "InsightFace buffalo_l (face embedding)",
    "ip-adapter_face_id_plus": "InsightFace buffalo_l and clip_h.pth",
    "revision_clipvision": "clip_g.pth (ReVision)", "revision_ignore_prompt": "clip_g.pth",
}
# (threshold_a, threshold_b) defaults of the weight-free preprocessors (the extension's sliders)
DEFAULTS = {"none": (-1, -1), "invert": (-1, -1), "canny": (100, 200), "threshold": (127, -1),
            "shuffle": (-1, -1), "tile_resample": (1.0, -1),
            # no model: the reference image steers the U-Net itself (models/reference.py);
            # threshold_a is the style fidelity
            "reference_only": (0.5, -1), "reference_adain": (0.5, -1),
            "reference_adain+attn": (0.5, -1)}
REFERENCE = ("reference_only", "reference_adain", "reference_adain+attn")
ALIASES = {"invert (from white bg & black line)": "invert", "binary": "threshold",
           "tile": "tile_resample", "content_shuffle": "shuffle"}
DEFAULT_RES = 512


def preprocessor_name(name: str) -> str:
    """A preprocessor name (or the extension's alias) → the one sdloom runs; SdloomError in
    one line for those that need annotator weights and for unknown names."""
    module = ALIASES.get(name, name)
    if module in NEEDS_WEIGHTS:
        raise SdloomError(f"ControlNet preprocessor {module!r} needs the annotator weights "
                          f"{NEEDS_WEIGHTS[module]}, which sdloom does not run yet: "
                          "preprocess the image elsewhere and pass it with module 'none'")
    if module not in DEFAULTS:
        raise SdloomError(f"unknown ControlNet preprocessor {name!r}; sdloom runs "
                          f"{', '.join(DEFAULTS)} (and refuses {', '.join(NEEDS_WEIGHTS)}, "
                          "which need annotator weights)")
    return module


@dataclass
class ControlUnit:
    """One ControlNet unit (sd-webui-controlnet's ControlNetUnit fields)."""
    model: str  # a ControlNet file (.safetensors/.pth/…) or diffusers folder
    image: Image.Image | None = None  # None for img2img: the init image
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0  # MODES index or name
    resize_mode: int | str = 1  # RESIZE_MODES index or name ("Crop and Resize")
    processor_res: int = -1  # −1: 512
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    hr_option: str = "Both"
    seed: int | None = None  # shuffle's random field; None: the job's seed
    low_vram: bool = False  # recorded, as the extension does; memory is managed elsewhere

    def resolved(self) -> ControlUnit:
        """A copy with names turned into indices, module aliases and −1 defaults filled, and
        every field checked (one line per problem)."""
        module = preprocessor_name(self.module)
        cm = _index(self.control_mode, MODES, "control mode")
        rm = _index(self.resize_mode, RESIZE_MODES, "resize mode")
        if self.hr_option not in HR_OPTIONS:
            raise SdloomError(f"ControlNet hr_option must be one of {', '.join(HR_OPTIONS)}, "
                              f"got {self.hr_option!r}")
        for name in ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"):
            if not np.isfinite(getattr(self, name)):
                raise SdloomError(f"ControlNet {name} must be a finite number")
        if not 0.0 <= self.weight <= 2.0:
            raise SdloomError(f"ControlNet weight must be in [0, 2], got {self.weight}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise SdloomError("ControlNet guidance must satisfy 0 ≤ start ≤ end ≤ 1, got "
                              f"{self.guidance_start}…{self.guidance_end}")
        res = DEFAULT_RES if self.processor_res < 0 else int(self.processor_res)
        if not 64 <= res <= 2048:
            raise SdloomError(f"ControlNet processor_res must be in [64, 2048], got {res}")
        ta, tb = DEFAULTS[module]
        return ControlUnit(**{**self.__dict__, "module": module, "control_mode": cm,
                              "resize_mode": rm, "processor_res": res,
                              "threshold_a": ta if self.threshold_a == -1 else self.threshold_a,
                              "threshold_b": tb if self.threshold_b == -1 else self.threshold_b})


def _index(v: int | str, names: tuple[str, ...], what: str) -> int:
    if isinstance(v, str) and v in names:
        return names.index(v)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
        return v
    raise SdloomError(f"ControlNet {what} must be one of {', '.join(names)} (or 0–"
                      f"{len(names) - 1}), got {v!r}")


# ---------------------------------------------------------------- preprocessors

def _sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x, y) of a 2-D array, edges replicated (OpenCV's default)."""
    p = np.pad(a, 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def canny(img: np.ndarray, low: float, high: float, blur_sigma: float = 0.0) -> np.ndarray:
    """Canny (1986) edges as OpenCV's `cv2.Canny(img, low, high)`, which the extension calls:
    3×3 Sobel per channel, the channel of largest |dx| + |dy| per pixel, non-maximum suppression
    in four directions (tan 22.5° sectors; ties kept on the right/lower side), then hysteresis:
    pixels above `high` are edges and pixels above `low` 8-connected to them join. OpenCV does not
    blur first; `blur_sigma` > 0 adds a Gaussian blur as textbook Canny does. uint8 HxW(xC) →
    uint8 HxW of 0/255."""
    from scipy import ndimage
    a = img.astype(np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if blur_sigma > 0:
        a = np.stack([ndimage.gaussian_filter(a[..., c], blur_sigma, mode="nearest")
                      for c in range(a.shape[2])], axis=-1)
    low, high = min(low, high), max(low, high)
    grads = [_sobel(a[..., c]) for c in range(a.shape[2])]
    mags = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in grads])
    best = mags.argmax(axis=0)[None]
    mag = np.take_along_axis(mags, best, 0)[0]
    dx = np.take_along_axis(np.stack([g[0] for g in grads]), best, 0)[0]
    dy = np.take_along_axis(np.stack([g[1] for g in grads]), best, 0)[0]
    m = np.pad(mag, 1)  # zero magnitude outside the image

    def at(oy: int, ox: int) -> np.ndarray:
        return m[1 + oy:m.shape[0] - 1 + oy, 1 + ox:m.shape[1] - 1 + ox]

    ax, ay = np.abs(dx), np.abs(dy)
    tg22 = ax * 0.4142135623730950488
    horiz = ay < tg22
    vert = ~horiz & (ay > tg22 + 2 * ax)
    diag = ~horiz & ~vert
    s = np.where((dx < 0) != (dy < 0), -1, 1)
    keep = np.zeros(mag.shape, bool)
    keep |= horiz & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vert & (mag > at(-1, 0)) & (mag >= at(1, 0))
    d_pos = (mag > at(-1, -1)) & (mag > at(1, 1))  # s = 1: along the main diagonal
    d_neg = (mag > at(-1, 1)) & (mag > at(1, -1))
    keep |= diag & np.where(s == 1, d_pos, d_neg)
    cand = keep & (mag > low)
    strong = cand & (mag > high)
    labels, _ = ndimage.label(cand, structure=np.ones((3, 3), bool))
    good = np.unique(labels[strong])
    edges = np.isin(labels, good[good > 0])
    return (edges * 255).astype(np.uint8)


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    """The extension's make_noise_disk: coarse uniform noise, bicubic-upsampled, cropped and
    normalised to [0, 1]."""
    coarse = torch.from_numpy(rng.uniform(0, 1, (h // f + 2, w // f + 2)))[None, None]
    fine = F.interpolate(coarse, size=(h + 2 * f, w + 2 * f), mode="bicubic",
                         align_corners=False)[0, 0, f:f + h, f:f + w].numpy()
    fine = fine - fine.min()
    return fine / max(fine.max(), 1e-12)


def shuffle(img: np.ndarray, seed: int, f: int = 256) -> np.ndarray:
    """The extension's content shuffle: each pixel fetched from a smooth random position field
    (cv2.remap, bilinear)."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    x = _noise_disk(h, w, f, rng) * (w - 1)
    y = _noise_disk(h, w, f, rng) * (h - 1)
    grid = torch.from_numpy(np.stack([x / max(w - 1, 1), y / max(h - 1, 1)], -1) * 2 - 1)
    src = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def _to_res(img: Image.Image, res: int) -> Image.Image:
    """The image with its short side at the processor resolution (the extension's
    resize_image_with_pad, without the pad it removes again)."""
    k = res / min(img.size)
    size = (max(1, round(img.width * k)), max(1, round(img.height * k)))
    return img.resize(size, Image.BICUBIC if k > 1 else Image.BOX)


def preprocess(unit: ControlUnit, image: Image.Image, seed: int = 0) -> Image.Image:
    """The detected map of a resolved unit's image (RGB)."""
    img = image.convert("RGB")
    m = unit.module
    if m == "none" or m in REFERENCE:
        return img
    if m == "invert":
        return Image.fromarray(255 - np.asarray(img))
    if m == "tile_resample":  # down-sampling rate threshold_a, below 1.1 the image as is
        if unit.threshold_a < 1.1:
            return img
        size = (max(1, int(img.width / unit.threshold_a)),
                max(1, int(img.height / unit.threshold_a)))
        return img.resize(size, Image.BOX)
    a = np.asarray(_to_res(img, unit.processor_res))
    if m == "canny":
        e = canny(a, unit.threshold_a, unit.threshold_b)
        return Image.fromarray(np.repeat(e[..., None], 3, axis=2))
    if m == "threshold":
        return Image.fromarray(np.where(a > unit.threshold_a, 255, 0).astype(np.uint8))
    if m == "shuffle":
        return Image.fromarray(shuffle(a, unit.seed if unit.seed is not None else seed))
    raise SdloomError(f"unknown ControlNet preprocessor {m!r}")


def pixel_perfect_res(image: Image.Image, w: int, h: int, resize_mode: int) -> int:
    """The extension's pixel-perfect processor resolution: the image's short side scaled as
    the resize mode will scale it to w×h."""
    k0, k1 = h / image.height, w / image.width
    k = min(k0, k1) if resize_mode == 2 else max(k0, k1)
    return int(np.round(k * min(image.width, image.height)))


def hint_tensor(detected: Image.Image, w: int, h: int, resize_mode: int) -> torch.Tensor:
    """[1, 3, h, w] in [0, 1]: the detected map fitted to the generation size."""
    fitted = resize_image(detected.convert("RGB"), w, h, resize_mode)
    return torch.from_numpy(np.asarray(fitted, np.float32) / 255).permute(2, 0, 1)[None]


# ---------------------------------------------------------------- files

def legacy_hash(path: Path) -> str:
    """A1111's short model hash that the extension shows as "name [hash]": sha256 of 64 KiB
    at offset 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _weights_file(path: Path) -> Path:
    if path.is_dir():  # a diffusers ControlNetModel folder
        for pat in ("diffusion_pytorch_model.safetensors", "*.safetensors",
                    "diffusion_pytorch_model.bin", "*.bin"):
            found = sorted(path.glob(pat))
            if found:
                return found[0]
        raise NotFoundError(f"ControlNet folder {display_name(path)} holds no weights")
    return path


_CACHE: OrderedDict[tuple, ControlNet] = OrderedDict()
CACHE_SIZE = 2


def load_controlnet(path: str | Path, base, latent_channels: int, device: torch.device,
                    dtype: torch.dtype) -> ControlNet:
    """A ControlNet file or folder for the U-Net config `base` (refused in one line if it was
    made for another family or width); the last few stay loaded."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"no such ControlNet model: {display_name(path)}")
    file = _weights_file(path)
    st = file.stat()
    key = (str(file.resolve()), st.st_mtime_ns, st.st_size, str(device), dtype, base)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    src = open_file(file)
    names = controlnet_keys(src.shapes)
    shapes = {new: src.shapes[old] for old, new in names.items()}
    cfg = fit_to_unet(detect_controlnet(shapes), base, latent_channels, display_name(path))
    net = build_controlnet(cfg, {new: src.get(old) for old, new in names.items()}, dtype,
                           device)
    _CACHE[key] = net
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return net


@dataclass
class PreparedUnit:
    """A unit with its ControlNet (none for a reference unit) and detected map, ready to give
    each pass its hint."""
    unit: ControlUnit
    net: ControlNet | None
    detected: Image.Image
    label: str  # "name [hash]"
    passes: set[str] = field(default_factory=set)  # "low", "high"

    @property
    def reference(self) -> bool:
        return self.unit.module in REFERENCE

    def active(self, w: int, h: int) -> ActiveControl:
        u = self.unit
        return ActiveControl(self.net, hint_tensor(self.detected, w, h, u.resize_mode),
                             u.weight, u.guidance_start, u.guidance_end, u.control_mode,
                             soft_in_hires=u.module in ("canny", "mlsd"))

    def infotext(self) -> str:
        """The extension's "ControlNet N" value: its unit fields, title-cased, in its order."""
        u = self.unit
        fields = [("Module", u.module), ("Model", self.label), ("Weight", u.weight),
                  ("Resize Mode", RESIZE_MODES[u.resize_mode]), ("Low Vram", u.low_vram),
                  ("Processor Res", u.processor_res), ("Threshold A", u.threshold_a),
                  ("Threshold B", u.threshold_b), ("Guidance Start", u.guidance_start),
                  ("Guidance End", u.guidance_end), ("Pixel Perfect", u.pixel_perfect),
                  ("Control Mode", MODES[u.control_mode]), ("Hr Option", u.hr_option)]
        return ", ".join(f"{k}: {v}" for k, v in fields if v != -1)


def crop_to_masked(image: Image.Image, mask_size: tuple[int, int],
                   box: tuple[int, int, int, int], w: int, h: int, resize_mode: int
                   ) -> Image.Image:
    """The extension's control image for inpainting "Only masked": fitted to the mask's size by
    the unit's resize mode, cropped to the masked region, fitted to w×h (Resize and Fill)."""
    fitted = resize_image(image.convert("RGB"), *mask_size, resize_mode)
    return resize_image(fitted.crop(box), w, h, 2)


def prepare_units(units, base, latent_channels: int, device: torch.device, dtype: torch.dtype,
                  w: int, h: int, init_image: Image.Image | None, hires: bool,
                  seed: int, crop: tuple[tuple[int, int], tuple[int, int, int, int]] | None
                  = None) -> list[PreparedUnit]:
    """Resolve, load and preprocess every unit once per job (before any sampling). `crop`:
    (mask size, box) of inpainting's "Only masked" region, which control images follow."""
    out = []
    for i, raw in enumerate(units):
        u = raw.resolved()
        image = u.image if u.image is not None else init_image
        if image is None:
            raise SdloomError(f"ControlNet unit {i} has no image (txt2img needs one; img2img "
                              "uses the init image)")
        if crop is not None and u.module not in REFERENCE:  # the extension skips reference
            image = crop_to_masked(image, crop[0], crop[1], w, h, u.resize_mode)
        if u.pixel_perfect:
            u.processor_res = pixel_perfect_res(image, w, h, u.resize_mode)
        passes = {"Both": {"low", "high"}, "Low res only": {"low"},
                  "High res only": {"high"}}[u.hr_option] if hires else {"low"}
        if u.module in REFERENCE:  # the extension's reference units take no model
            out.append(PreparedUnit(u, None, preprocess(u, image, seed), "None", passes))
            continue
        model = _builtin_or_path(u.model)
        net = load_controlnet(model, base, latent_channels, device, dtype)
        path = _weights_file(Path(model))
        name = Path(model).stem if Path(model).is_file() else Path(model).name
        out.append(PreparedUnit(u, net, preprocess(u, image, seed),
                                f"{name} [{legacy_hash(path)}]", passes))
    return out


# ---------------------------------------------------------------- models by name

MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# ControlNets shipped in the package (docs/embedded-model.md): listed for the models they fit
# when the file is there (training/controlnet_train.py makes it)
BUILTIN = {"sdloom-emoji-canny":
           Path(__file__).resolve().parent / "assets" / "sdloom-emoji-canny.safetensors"}


@functools.lru_cache(maxsize=32)
def _fits(file: Path, stamp: tuple[int, int], base, latent_channels: int) -> bool:
    """Whether the ControlNet file fits a U-Net config (`stamp`: its mtime and size)."""
    try:
        src = open_file(file)
        names = controlnet_keys(src.shapes)
        fit_to_unet(detect_controlnet({new: src.shapes[old] for old, new in names.items()}),
                    base, latent_channels, file.name)
    except SdloomError:
        return False
    return True


def builtin_controlnets(model_config) -> dict[str, Path]:
    """The shipped ControlNets that exist and fit this model (none without a model, or for a
    family without ControlNet)."""
    if model_config is None:
        return {}
    fam = family_of(model_config)
    try:
        base = fam.control_base(model_config)
    except SdloomError:
        return {}
    channels = fam.latent_format(model_config).channels
    out = {}
    for name, path in BUILTIN.items():
        st = path.stat() if path.is_file() else None
        if st is not None and _fits(path, (st.st_mtime_ns, st.st_size), base, channels):
            out[name] = path
    return out


def _builtin_or_path(model: str) -> str:
    """A unit's model: a shipped ControlNet's name ("name" or "name [hash]") → its file, unless
    a file or folder of that name exists; anything else as given."""
    name = model.rsplit(" [", 1)[0] if model.endswith("]") else model
    if name in BUILTIN and not Path(model).exists():
        return str(BUILTIN[name])
    return model


def list_controlnets(folder: str | Path | None, model_config=None) -> dict[str, Path]:
    """ControlNet models by the name the extension shows, "name [hash]" (file stem, or a
    diffusers folder's name; legacy hash of the weights): the shipped ones that fit
    `model_config`, then those under `folder`. Only files whose real path is inside the folder
    are listed, so a symlink cannot lead a request elsewhere."""
    out: dict[str, Path] = {f"{name} [{legacy_hash(path)}]": path
                            for name, path in builtin_controlnets(model_config).items()}
    if not folder or not Path(folder).is_dir():
        return out
    root = Path(folder).resolve()
    found: list[tuple[str, Path]] = []
    for f in sorted(root.rglob("*")):
        if not f.is_file() or not f.resolve().is_relative_to(root):
            continue
        if f.name in DIFFUSERS_WEIGHTS and (f.parent / "config.json").is_file() \
                and f.parent != root:
            found.append((f.parent.name, f.parent))
        elif f.suffix.lower() in MODEL_SUFFIXES and f.name not in DIFFUSERS_WEIGHTS:
            found.append((f.stem, f))
    for name, path in found:
        try:
            title = f"{name} [{legacy_hash(_weights_file(path))}]"
        except OSError:
            continue
        out.setdefault(title, path)
    return out


def find_controlnet(name: str, folder: str | Path | None, model_config=None) -> Path:
    """The listed ControlNet whose "name [hash]" or name is `name` (the hash part is optional,
    as clients send either); never a path: anything else is "not found", the same answer for
    a traversal attempt as for a missing file."""
    models = list_controlnets(folder, model_config)
    if name in models:
        return models[name]
    stem = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    for title, path in models.items():
        if title.rsplit(" [", 1)[0] == stem:
            return path
    raise NotFoundError(f"ControlNet model not found: {name!r}" +
                        ("" if folder else " (no --controlnet-dir is set)"))
