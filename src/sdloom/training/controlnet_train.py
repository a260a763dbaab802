"""`sdloom train` with what=controlnet: a ControlNet (Zhang et al. 2023) for a frozen model.

The base model (U-Net, text encoder, VAE) stays frozen; the ControlNet starts as A1111's and
diffusers' tools make one (cldm `tool_add_control.py`, `ControlNetModel.from_unet`): time
embedding, encoder and middle block copied from the U-Net, the zero convs and the middle block's
output conv zero, the hint encoder random with its last conv zero — so the first step predicts
exactly what the base model does. It rides along as `model.control_model` (the original
ControlLDM attribute), so the trainer's optimizer, EMA, bf16, atomic states and `--resume` see
it as they see any trained part, and the denoiser is the family's `controlled_model`, the one
inference runs.

Data: metadata.jsonl rows with a `conditioning_file_name` (as diffusers' train_controlnet
reads, also `conditioning_image`) beside `file_name` and `text`; or, with
`control_preprocessor`, each condition made from its training image by sdloom's preprocessor
(`controlnet.preprocess`, e.g. canny), computed once per image and view when latents are cached.
Captions are dropped with `caption_dropout` (the paper drops 50 % so that the ControlNet learns
to read the condition alone). The result, OUT/controlnet.safetensors, holds `control_model.*`
tensors that `controlnet.load_controlnet` reads, with the base model and preprocessor in its
metadata.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoints.save import save_safetensors
from ..controlnet import ControlUnit, preprocess
from ..errors import SdloomError
from ..families import family_of
from ..families.sd_controlnet import ActiveControl, ControlClock, ControlSet
from ..models.controlnet import ControlNet, ControlNetConfig
from .data import Augment, ImageCaptionDataset, collate, cover, crop, load_rgb

COND_COLUMNS = ("conditioning_file_name", "conditioning_image")
ZEROED = ("zero_convs.", "middle_block_out.", "input_hint_block.14.")  # cldm's zero_module


def base_model_file(name: str) -> Path:
    """The trained model a ControlNet (or a words) run starts from: `embedded` is the shipped
    model's file, anything else a checkpoint (a preset's random weights would teach nothing)."""
    if name == "embedded":
        from ..pipelines.engine import EMBEDDED_MODEL
        return EMBEDDED_MODEL
    if not Path(name).exists():
        raise SdloomError(f"model {name!r}: what=controlnet and what=words need the trained "
                          "model they are made for: a checkpoint file, or `embedded` for the "
                          "shipped model")
    return Path(name)


def attach_controlnet(model: nn.Module, seed: int) -> ControlNet:
    """A ControlNet for `model`'s U-Net, initialised from it, set as `model.control_model` and
    trainable (the rest of the model stays as it is: frozen)."""
    fam = family_of(model.config)
    base = fam.control_base(model.config)  # refuses families without ControlNet
    cfg = ControlNetConfig(dataclasses.replace(
        base, in_channels=fam.latent_format(model.config).channels))
    dev = next(model.parameters()).device
    torch.manual_seed(seed)  # the hint encoder's random init: the same for every run of a seed
    net = ControlNet(cfg).to(dev)
    own = net.state_dict()
    unet = model.model.diffusion_model.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            if k.startswith(ZEROED):
                v.zero_()
            elif k in unet and unet[k].shape == v.shape:
                v.copy_(unet[k])
    model.control_model = net.train().requires_grad_(True)
    return net


def controlled_denoiser(model: nn.Module, hint: torch.Tensor) -> nn.Module:
    """The family's denoiser model with `model.control_model` reading `hint` [B, 3, H, W] in
    [0, 1] at weight 1 (Balanced): the path generation runs."""
    control = ControlSet([ActiveControl(model.control_model, hint)], ControlClock())
    return family_of(model.config).controlled_model(model, control)


def controlnet_file(model: nn.Module, path: Path, dtype: torch.dtype, base: str,
                    preprocessor: str | None, meta: dict[str, str]) -> None:
    """OUT/controlnet.safetensors: the ControlNet in the original `control_model.*` layout,
    with the base model and the preprocessor it was trained on in the metadata."""
    tensors = {"control_model." + k: v.detach().to("cpu", dtype)
               for k, v in model.control_model.state_dict().items()}
    unit = _unit(preprocessor)
    info = {"sdloom_base_model": base,
            "sdloom_preprocessor": json.dumps(
                {"module": unit.module, "threshold_a": unit.threshold_a,
                 "threshold_b": unit.threshold_b} if unit else {"module": "none"})}
    save_safetensors(tensors, path, {**info, **meta})


def _unit(preprocessor: str | None) -> ControlUnit | None:
    """The preprocessor as a resolved unit (the extension's default thresholds)."""
    return ControlUnit("", module=preprocessor).resolved() if preprocessor else None


class ControlDataset(ImageCaptionDataset):
    """Images, captions and their condition maps, cropped and flipped together. `hint(i, aug)`
    is uint8 [3, H, W]."""

    def __init__(self, root: str | Path, resolution: int, *, preprocessor: str | None = None,
                 **kw):
        super().__init__(root, resolution, **kw)
        self.unit = _unit(preprocessor)
        self.cond_files: list[Path] | None = None
        if self.unit is None:
            self.cond_files = self._condition_files()
        self._cond: list[np.ndarray] | None = None
        if self.cond_files is not None and self._mem is not None:
            self._cond = [self._prepare_condition(i) for i in range(len(self.items))]

    def _condition_files(self) -> list[Path]:
        meta = self.root / "metadata.jsonl"
        hint = ("set control_preprocessor (e.g. --control-preprocessor canny) to make the "
                "conditions from the images")
        if not meta.exists():
            raise SdloomError(f"ControlNet training needs condition images: {self.root} has no "
                              f"metadata.jsonl with a conditioning_file_name column; {hint}")
        rows = [ln for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out = []
        for it in self.items:
            r = json.loads(rows[it.row])
            name = next((r[c] for c in COND_COLUMNS if isinstance(r.get(c), str)), None)
            if name is None:
                raise SdloomError(f"{meta}: row {it.row + 1} has no conditioning_file_name "
                                  f"(ControlNet training needs a condition image per row); "
                                  f"{hint}")
            out.append(self.root / name)
        return out

    def _prepare_condition(self, i: int) -> np.ndarray:
        """The condition file resized as its image is (uint8 [H, W, 3])."""
        w, h = self.items[i].size
        arr = np.asarray(cover(load_rgb(self.cond_files[i]), w, h))
        return arr if self.random_crop else np.ascontiguousarray(crop(arr, w, h, (0.5, 0.5)))

    def hint(self, i: int, aug=None) -> torch.Tensor:
        """The condition of sample i under `aug` (the image's crop and flip): uint8 [3, H, W]."""
        w, h = self.items[i].size
        where = aug.crop if aug else (0.5, 0.5)
        if self.unit is not None:  # the preprocessor on the training image as augmented
            arr = crop(self._mem[i] if self._mem is not None else self._prepare(i), w, h, where)
            if aug is not None and aug.flip:
                arr = arr[:, ::-1]
            unit = dataclasses.replace(self.unit, processor_res=min(w, h))  # pixel perfect
            arr = np.asarray(preprocess(unit, Image.fromarray(np.ascontiguousarray(arr))))
        else:
            src = self._cond[i] if self._cond is not None else self._prepare_condition(i)
            arr = crop(src, w, h, where)
            if aug is not None and aug.flip:
                arr = arr[:, ::-1]
        if arr.shape[:2] != (h, w):
            raise SdloomError(f"condition of {self.items[i].path.name} is {arr.shape[1]}x"
                              f"{arr.shape[0]}, its image {w}x{h}")
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = (key, None) if isinstance(key, int) else key
        out = super().__getitem__(key)
        out["hint"] = self.hint(i, self.augment(seed) if seed is not None else None)
        return out


def _collate(samples: list[dict]) -> dict:
    out = collate(samples)
    out["hint"] = torch.stack([s["hint"] for s in samples])
    return out


class _Views(torch.utils.data.Dataset):
    """Every image's hint in one view (plain or mirrored), for the hint cache."""

    def __init__(self, ds: ControlDataset, mirrored: bool):
        self.ds, self.mirrored = ds, mirrored

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds.hint(i, Augment(self.mirrored, (0.5, 0.5), False))


def hint_cache(ds: ControlDataset, num_workers: int = 0) -> list[list[torch.Tensor]]:
    """Every image's hint as [plain views, mirrored views] (the latent cache's layout),
    computed once, in `num_workers` DataLoader workers."""
    views = [False, True] if ds.flip else [False]
    out = []
    for mirrored in views:
        loader = torch.utils.data.DataLoader(_Views(ds, mirrored), batch_size=64,
                                             num_workers=num_workers)
        out.append([h for batch in loader for h in batch])
    return out


def control_batches(ds: ControlDataset, sampler, start: int,
                    cache: list[list[torch.Tensor]] | None = None, num_workers: int = 0,
                    pin: bool = False) -> Iterator[dict]:
    """`data.micro_batches` with each sample's hint (uint8 [B, 3, H, W]): cached latents with
    hints computed here, before the first step; or images and hints through a DataLoader."""
    if cache is None:
        return iter(torch.utils.data.DataLoader(
            ds, batch_sampler=sampler.from_position(start), collate_fn=_collate,
            num_workers=num_workers, pin_memory=pin))
    hints = hint_cache(ds, num_workers)

    def batches() -> Iterator[dict]:
        for keys in sampler.from_position(start):
            augs = [(i, ds.augment(s)) for i, s in keys]
            yield {"latents": torch.stack([cache[int(a.flip)][i] for i, a in augs]),
                   "hint": torch.stack([hints[int(a.flip)][i] for i, a in augs]),
                   "captions": [ds.caption(i, a) for i, a in augs]}
    return batches()
