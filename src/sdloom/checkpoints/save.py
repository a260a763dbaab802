"""Writing models: single-file safetensors (config JSON in metadata), and `convert` between
single files and diffusers folders (each family writes its own folder layout).

All files are written atomically: a temp file (or folder) beside the target, then a rename.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch

from ..errors import ModelFileError, SdloomError
from ..families import family_of
from ..io import atomic_path
from .load import CONFIG_KEY, IGNORED, build_meta, check_fit, open_model_source


def _atomic(path: Path, write) -> None:
    """Run `write(tmp)` on a temp file beside `path`, then rename it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors file, atomically; shared storage is cloned (safetensors refuses aliases)."""
    from safetensors.torch import save_file
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    _atomic(Path(path), lambda tmp: save_file(out, tmp, metadata=metadata or {}))


def save_model(model: torch.nn.Module, config, path: str | Path,
               dtype: torch.dtype | None = None, extra_metadata: dict[str, str] | None = None
               ) -> None:
    """Single-file checkpoint in the original SD key layout, with our config in the metadata."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: config.to_json(), **(extra_metadata or {})}
    save_safetensors(sd, path, meta)


def _verify(path: Path):
    """Open a written model the way `load_model` does and check that every tensor fits the model
    its config builds (on the meta device: shapes only, nothing computed)."""
    cfg, src = open_model_source(path)
    check_fit(build_meta(cfg), src)
    return cfg


def convert(src_path: str | Path, dst_path: str | Path):
    """diffusers folder ⇄ single-file .safetensors; .ckpt → .safetensors. Tensors kept as they are.

    The output is written under a temp name, opened again as `load_model` would, and renamed
    into place only if it loads: a conversion that would give an unloadable model fails and
    leaves nothing behind."""
    src_path, dst = Path(src_path), Path(dst_path)
    cfg, src = open_model_source(src_path)
    if dst.suffix == ".safetensors":
        keep = {k: src.get(k) for k in src.shapes}
        with atomic_path(dst) as tmp:
            save_safetensors(keep, tmp, {CONFIG_KEY: cfg.to_json()})
            _checked(src_path, dst, tmp)
    elif dst.suffix == "":
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise SdloomError(f"{dst} exists and is not an empty folder: will not overwrite")
        keys = [k for k in src.shapes if not IGNORED.match(k)]
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
        try:
            family_of(cfg).save_diffusers(cfg, src.get, keys, tmp, save_safetensors)
            _checked(src_path, dst, tmp)
            os.replace(tmp, dst)  # an empty folder at dst is replaced too (POSIX rename)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        raise SdloomError(f"{dst}: give a .safetensors file or a folder name (diffusers layout)")
    return cfg


def _checked(src_path: Path, dst: Path, tmp: Path) -> None:
    try:
        _verify(tmp)
    except (SdloomError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(f"{src_path}: the converted model would not load, so {dst} was "
                             f"not written ({type(e).__name__}: {e})") from None
