"""Loading models: single-file .safetensors / .ckpt (weights_only), diffusers folders, VAE files.

Weights stream tensor by tensor into a model built on the meta device, so peak memory stays
near one copy of the model (safetensors and zip .ckpt are memory-mapped).
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError, NotFoundError, SdloomError
from ..families import FAMILIES, config_from_json, detect, family_for_pipeline, family_of
from ..families.base import ComponentReader
from ..families.sd import SDFamily
from ..io import display_name as _name
from ..io import load_torch_weights, one_line as _one_line
from ..families.keymaps.vae import vae_diffusers_to_ldm

CONFIG_KEY = "sdloom_config"  # safetensors metadata entry holding ModelConfig JSON

# training-time buffers and EMA copies that inference does not use
IGNORED = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights|logvar$"
    r"|.*\.position_ids$|first_stage_model\.loss\.|v_pred$)")


@dataclass
class TensorSource:
    """A checkpoint opened lazily: shapes without reading, tensors one at a time."""
    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def _open_safetensors(path: Path) -> TensorSource:
    from safetensors import safe_open
    f = safe_open(str(path), framework="pt", device="cpu")
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return TensorSource(shapes, f.get_tensor, f.metadata() or {}, path)


def _torch_load(path: Path) -> dict:
    sd = load_torch_weights(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelFileError(f"{_name(path)}: holds a {type(sd).__name__}, not a state dict of "
                             "tensors")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _open_dict(sd: dict[str, torch.Tensor], path: Path | None = None,
               metadata: dict | None = None) -> TensorSource:
    return TensorSource({k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__,
                        metadata or {}, path)


def open_file(path: str | Path) -> TensorSource:
    """Open a single-file checkpoint (.safetensors, or .ckpt/.pt/.bin via weights_only)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"no such model file or folder: {_name(path)}")
    try:
        if path.suffix == ".safetensors":
            return _open_safetensors(path)
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            return _open_dict(_torch_load(path), path)
    except SdloomError:
        raise
    except Exception as e:  # corrupt or hostile files: one clear line, never a traceback
        raise ModelFileError(f"cannot read checkpoint {_name(path)}: {_one_line(e, path)}; the file is "
                             "damaged or not a checkpoint: download or export it again") from None
    raise ModelFileError(f"{_name(path)}: unknown checkpoint format (expected .safetensors, "
                         ".ckpt, .pt, .pth or .bin)")


# ---------------------------------------------------------------- diffusers folders

def _component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of one diffusers component (shards joined; plain files before variants)."""
    st = sorted(folder.glob("*.safetensors"))
    files = [f for f in st if f.name.count(".") == 1]  # "model.safetensors", shards too
    if not files and st:  # only variants such as model.fp16.safetensors: take one variant
        variant = st[0].name.split(".")[-2]
        files = [f for f in st if f.name.split(".")[-2] == variant]
    sd: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            try:
                sd.update(load_file(str(f)))
            except Exception as e:
                raise ModelFileError(f"cannot read {folder.name}/{f.name}: {_one_line(e, f)}; "
                                     "the file is damaged: download it again") from None
        return sd
    bins = sorted(folder.glob("*.bin"))
    if not bins:
        raise ModelFileError(f"diffusers folder {folder.parent.name}: {folder.name}/ has no "
                             "weights (*.safetensors or *.bin)")
    for f in bins:
        src = open_file(f)
        sd.update({k: src.get(k) for k in src.shapes})
    return sd


def _json(path: Path) -> dict:
    where = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"diffusers folder incomplete: missing {where}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"cannot read {where}: {_one_line(e, path)}") from None
    if not isinstance(d, dict):
        raise ModelFileError(f"{where} holds no JSON object")
    return d


def open_diffusers(folder: str | Path) -> tuple[object, TensorSource]:
    """A diffusers pipeline folder, converted into our (single-file) names and config."""
    folder = Path(folder)
    try:
        return _open_diffusers(folder)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        # a config.json with a missing or mistyped field
        raise ModelFileError(f"diffusers folder {folder.name}: a config.json lacks or mistypes "
                             f"a field ({type(e).__name__}: {_one_line(e, folder)})") from None


class _FolderReader(ComponentReader):
    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, name: str) -> dict[str, torch.Tensor]:
        return _component_weights(self.folder / name)

    def has(self, name: str) -> bool:
        return (self.folder / name).is_dir()


def _open_diffusers(folder: Path):
    index_path = folder / "model_index.json"
    # folders without model_index.json (older exports) are read as the U-Net families
    cls = _json(index_path).get("_class_name", "") if index_path.exists() else ""
    fam = family_for_pipeline(cls) if cls else SDFamily()
    if fam is None:
        raise ModelFileError(f"diffusers folder {folder.name}: {str(cls)[:60]} is not a "
                             "pipeline sdloom knows")
    cfg, sd = fam.open_diffusers(folder.name, _FolderReader(folder),
                                 lambda rel: _json(folder / rel))
    return cfg, _open_dict(sd, folder)


# ---------------------------------------------------------------- building models

def _ema_name(key: str) -> str:
    return "model_ema." + key[len("model."):].replace(".", "")


def _check_fit(model_shapes: dict[str, tuple], src: TensorSource, what: str,
               optional: set[str]) -> None:
    present = {k for k in src.shapes if not IGNORED.match(k)}
    missing = sorted(set(model_shapes) - present - optional)
    unexpected = sorted(present - set(model_shapes))
    wrong = sorted(k for k in present & set(model_shapes) if tuple(src.shapes[k]) != model_shapes[k])
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", wrong)):
            if keys:
                more = f" … (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        raise ModelFileError(f"checkpoint does not fit {what}: " + "; ".join(parts))


def check_fit(model: torch.nn.Module, src: TensorSource) -> dict[str, tuple[int, ...]]:
    """Strict key/shape check of a source against a model; returns the model's shapes."""
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_fit(expected, src, f"{getattr(cfg, 'name', '') or cfg.family} model",
               family_of(cfg).optional_keys(model))
    return expected


def build_meta(cfg) -> torch.nn.Module:
    """The config's whole model on the meta device: shapes without memory."""
    with torch.device("meta"):
        return family_of(cfg).build(cfg)


def build_from_source(cfg, src: TensorSource, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", ema: bool = False) -> torch.nn.Module:
    """Instantiate on the meta device, then stream the tensors in (strict)."""
    model = build_meta(cfg)
    expected = check_fit(model, src)
    state = {}
    for k in expected:
        use_ema = ema and k.startswith("model.diffusion_model.")
        name = _ema_name(k) if use_ema else k
        if use_ema and name not in src.shapes:
            raise ModelFileError(f"--ema asked for, but the checkpoint has no EMA weights "
                                 f"({name})")
        if name not in src.shapes:
            continue  # an optional key (checked above)
        state[k] = src.get(name).to(device=device, dtype=dtype)
    warn_non_finite(state, src, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # optional keys absent from the file: zero, never uninitialised
            parent = model.get_submodule(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            zeros = torch.zeros(t.shape, device=device, dtype=dtype)
            if isinstance(t, torch.nn.Parameter):
                setattr(parent, leaf, torch.nn.Parameter(zeros, requires_grad=False))
            else:
                setattr(parent, leaf, zeros)
    return model.eval().requires_grad_(False)


def warn_non_finite(state: dict[str, torch.Tensor], src: TensorSource,
                    dtype: torch.dtype) -> int:
    """Warn (one stderr line) when loaded floating tensors hold NaN or ±inf; returns the count.

    A warning, not a refusal: a non-finite tensor that nothing reads (an unused projection, a
    training buffer) does no harm, while one in a used weight turns images black, and the user
    should learn which file and key to blame. One device sync for the whole model.
    """
    keys = [k for k, t in state.items() if t.is_floating_point()]
    if not keys:
        return 0
    ok = torch.stack([torch.isfinite(state[k]).all() for k in keys]).cpu()
    bad = [k for k, good in zip(keys, ok.tolist()) if not good]
    if bad:
        where = _name(src.path) if src.path is not None else "checkpoint"
        print(f"sdloom: warning: {where}: {len(bad)} tensor(s) hold NaN or inf values in "
              f"{str(dtype).removeprefix('torch.')} (first: {bad[0]}); images will likely be "
              "black or noise: re-download or re-export the file", file=sys.stderr)
    return len(bad)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: object
    path: Path
    seconds: float


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def component_paths(given: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files of `text_encoders=`: a list of files, one file, or a folder (every checkpoint
    file directly in it, sorted by name; which is which is read from their shapes)."""
    items = [given] if isinstance(given, (str, Path)) else list(given)
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(f for f in item.iterdir()
                           if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
            if not found:
                raise NotFoundError(f"text encoder folder {_name(item)} holds no checkpoint "
                                    f"files ({', '.join(CHECKPOINT_SUFFIXES)})")
            out += found
        else:
            out.append(item)
    if len(set(out)) != len(out):
        raise SdloomError("a text encoder file is given twice")
    return out


def _with_component_files(src: TensorSource, paths: list[Path]) -> TensorSource:
    """The single file with separate component files merged in under the model's key names, as
    its family says (`Family.merge_component_files`); still lazy: each tensor is read from its
    own file when the loader streams it."""
    fam = next((f for f in FAMILIES if f.claims(src.shapes)), None)
    if fam is None:
        detect(src.shapes)  # raises the usual "not a model sdloom knows"
    files = [open_file(p) for p in paths]
    merge = fam.merge_component_files(src.shapes, [(_name(p), f.shapes)
                                                   for p, f in zip(paths, files)])
    shapes = {k: s for k, s in src.shapes.items() if not k.startswith(merge.replaces)}
    where: dict[str, tuple[TensorSource, str]] = {}
    for f, renames in zip(files, merge.renames):
        for old, new in renames.items():
            shapes[new] = tuple(f.shapes[old])
            where[new] = (f, old)

    def get(key: str) -> torch.Tensor:
        f, old = where.get(key, (src, key))
        return f.get(old)
    return TensorSource(shapes, get, src.metadata, src.path)


def open_model_source(path: str | Path,
                      text_encoders: str | Path | Sequence[str | Path] | None = None
                      ) -> tuple[object, TensorSource]:
    """Config + lazy tensors of a single file or a diffusers folder, in the model's key names.
    `text_encoders`: separate text-encoder files (or a folder of them) for a single file that
    lacks its own (SD3 files as A1111 and ComfyUI users have them); given ones replace the
    file's own of the same kind, as --vae replaces the VAE."""
    path = Path(path)
    if path.is_dir():
        if text_encoders:
            raise SdloomError(f"diffusers folder {_name(path)}: separate text encoder files "
                              "apply to single-file models; a folder holds its own "
                              "text_encoder*/ components")
        return open_diffusers(path)
    src = open_file(path)
    if text_encoders:
        try:
            src = _with_component_files(src, component_paths(text_encoders))
        except ModelFileError as e:
            raise type(e)(f"{_name(path)}: {e}") from None
    if CONFIG_KEY in src.metadata:  # our own files carry their exact config
        cfg = metadata_config(src, components=bool(text_encoders))
    else:
        try:
            cfg = detect(src.shapes)
        except ModelFileError as e:
            raise type(e)(f"{_name(path)}: {e}") from None
    return cfg, _aliased(src, family_of(cfg).key_aliases(src.shapes))


def _aliased(src: TensorSource, aliases: dict[str, str | None]) -> TensorSource:
    """The source with a family's alternative key names renamed (None: a duplicate, dropped)."""
    if not aliases:
        return src
    back = {new: old for old, new in aliases.items() if new is not None}
    shapes = {aliases.get(k, k): s for k, s in src.shapes.items() if aliases.get(k, k)}
    return TensorSource(shapes, lambda k: src.get(back.get(k, k)), src.metadata, src.path)


def metadata_config(src: TensorSource, components: bool = False):
    """The config a file's metadata declares, checked against its tensor shapes before anything
    is built from it: a hostile or stale config (200,000 layers over a few tensors) is refused
    in milliseconds, naming the field. `components`: separate component files were merged in,
    so their part of the config is read from their shapes."""
    where = _name(src.path) if src.path is not None else "checkpoint"
    try:
        cfg = config_from_json(src.metadata[CONFIG_KEY])
    except (ValueError, SdloomError, RecursionError) as e:  # bad JSON, missing/unknown fields
        raise ModelFileError(f"{where}: unreadable {CONFIG_KEY} metadata "
                             f"({_one_line(e)})") from None
    if components:
        try:
            cfg = family_of(cfg).config_with_components(cfg, src.shapes)
        except ModelFileError as e:
            raise type(e)(f"{where}: {e}") from None
    problems = family_of(cfg).config_problems(cfg, src.shapes)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelFileError(f"{where}: the config in its metadata does not match its tensors: "
                             + "; ".join(problems[:3]) + more)
    return cfg


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", prediction: str | None = None,
               vae: str | Path | None = None, ema: bool = False,
               without: tuple[str, ...] = (),
               text_encoders: str | Path | Sequence[str | Path] | None = None) -> LoadedModel:
    """Load any supported checkpoint into its family's model. `without` names optional
    components to leave out (e.g. "t5" for SD3: never read, no memory); `text_encoders` are
    separate text-encoder files or a folder of them (`open_model_source`)."""
    t0 = time.perf_counter()
    cfg, src = open_model_source(path, text_encoders)
    if without:
        cfg, drop = family_of(cfg).without(cfg, without)
        src = TensorSource({k: s for k, s in src.shapes.items() if not k.startswith(drop)},
                           src.get, src.metadata, src.path)
    if prediction:
        if prediction not in ("eps", "v"):
            raise SdloomError(f"prediction must be eps or v, not {prediction!r}")
        if not hasattr(cfg, "prediction"):
            raise SdloomError(f"--prediction applies to eps/v models, not to {cfg.family}")
        cfg = cfg.replace(prediction=prediction)
    model = build_from_source(cfg, src, dtype=dtype, device=device, ema=ema)
    if vae:
        load_vae_into(model, vae)
    return LoadedModel(model, cfg, Path(path), time.perf_counter() - t0)


def vae_source(path: str | Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (LDM or diffusers names, with or without prefix) in LDM names."""
    src = open_file(path)
    sd = {k: src.get(k) for k in src.shapes if not IGNORED.match(k) and not k.startswith("loss.")}
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items()
              if k.startswith("first_stage_model.")}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        try:
            sd = vae_diffusers_to_ldm(sd)
        except ModelFileError as e:
            raise ModelFileError(f"VAE file {_name(path)}: {e}") from None
    return sd


def load_vae_into(model: torch.nn.Module, path: str | Path) -> None:
    """Replace the model's VAE weights (A1111's VAE override), strictly."""
    sd = vae_source(path)
    vae = model.first_stage_model
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    _check_fit(expected, _open_dict(sd), f"the model's VAE ({_name(path)})", set())
    ref = next(vae.parameters())
    vae.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in sd.items()}, strict=True)
