"""A loaded model ready to generate: conditioning, sampling and VAE around one LatentDiffusion.

The pipelines (`generate.py`) are thin compositions of these pieces.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.load import LoadedModel, load_model
from ..errors import SdloomError
from ..models.lora import LoraManager, read_lora
from ..models.sd import LatentDiffusion
from ..models.unet import sdxl_adm
from ..prompts import Conditioning, EmbeddingDB, PromptEncoder, prompt_schedule, split_and
from ..sampling.denoisers import CFGDenoiser, EpsDenoiser, VDenoiser
from ..sampling.schedules import DiscreteSchedule
from ..tokenizer import get_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL = ASSETS / "sdloom-emoji.safetensors"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdloomError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise SdloomError(f"precision must be one of auto, {', '.join(table)}")
    return table[precision]


class UNetAdapter(torch.nn.Module):
    """Adds inpainting's concatenated channels (mask + masked-image latent) to the U-Net input."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, y=None, c_concat=None):
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        return self.unet(x, t, context, y=y)


@dataclass
class Engine:
    """A model on a device, with its prompt encoder, noise schedule and LoRA state."""
    model: LatentDiffusion
    path: Path | None = None
    embeddings_dir: Path | None = None
    lora_dir: Path | None = None
    _hash: str | None = field(default=None, repr=False)

    def __post_init__(self):
        cfg = self.model.config
        self.config = cfg
        self.schedule = DiscreteSchedule.scaled_linear(cfg.num_timesteps, cfg.linear_start,
                                                       cfg.linear_end)
        db = EmbeddingDB()
        if self.embeddings_dir and Path(self.embeddings_dir).is_dir():
            db.load_dir(self.embeddings_dir)
        self.prompt_encoder = PromptEncoder(get_tokenizer(), self.model.text_encoders,
                                            list(cfg.text_encoders), db)
        self.loras = LoraManager(self.model)
        wrapper = VDenoiser if cfg.prediction == "v" else EpsDenoiser
        self.denoiser = wrapper(UNetAdapter(self.model.unet), self.schedule)

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto",
             precision: str = "auto", vae: str | None = None, prediction: str | None = None,
             **kw) -> Engine:
        dev = pick_device(device)
        path = Path(path) if path else EMBEDDED_MODEL
        if not path.exists() and path == EMBEDDED_MODEL:
            raise SdloomError("the embedded model is missing from this install "
                              f"({EMBEDDED_MODEL}); pass --model PATH")
        loaded: LoadedModel = load_model(path, dtype=pick_dtype(precision, dev), device=dev,
                                         prediction=prediction, vae=vae)
        return cls(loaded.model, path=path, **kw)

    # ---------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.path.stem if self.path else "unsaved"

    @property
    def hash(self) -> str | None:
        """A1111's short model hash: sha256[:10] of the file (computed once)."""
        if self._hash is None and self.path and self.path.is_file():
            from ..infotext import model_hash
            self._hash = model_hash(self.path)
        return self._hash

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---------------------------------------------------------------- LoRA
    def set_loras(self, loras: list[tuple[str, float]]) -> list[str]:
        """Make exactly these LoRAs active (merging is reversible); returns their names."""
        if [(str(p), w) for p, w in loras] == [(str(n), w) for n, w in self._active_loras()]:
            return [Path(p).stem for p, _ in loras]
        self.loras.clear()
        for ref, weight in loras:
            self.loras.apply(read_lora(self._find_lora(ref)), weight)
        self._lora_refs = [(str(p), w) for p, w in loras]
        return [Path(p).stem for p, _ in loras]

    def _active_loras(self) -> list[tuple[str, float]]:
        return getattr(self, "_lora_refs", [])

    def _find_lora(self, ref: str) -> Path:
        p = Path(ref)
        if p.is_file():
            return p
        if self.lora_dir:
            for ext in (".safetensors", ".pt", ".ckpt"):
                cand = Path(self.lora_dir) / (ref + ext)
                if cand.is_file():
                    return cand
        raise SdloomError(f"LoRA not found: {ref!r}" + (f" (looked in {self.lora_dir})"
                                                         if self.lora_dir else ""))

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        return self.prompt_encoder(prompts, clip_skip=clip_skip)

    def cond_kwargs(self, c: Conditioning, width: int, height: int,
                    aesthetic_score: float = 6.0) -> dict[str, torch.Tensor]:
        """U-Net keyword arguments for a conditioning (adds SDXL's ADM vector)."""
        out = {"context": c.context.to(self.device, self.dtype)}
        if self.config.is_sdxl:
            if c.pooled is None:
                raise SdloomError("SDXL needs a pooled text embedding; the text encoder gave none")
            refiner = self.config.family == "sdxl-refiner"
            out["y"] = sdxl_adm(c.pooled.to(self.device, self.dtype), (height, width), (0, 0),
                                (height, width), aesthetic_score if refiner else None)
        return out

    def scheduled_cond(self, prompts: list[str], steps: int, clip_skip: int, width: int,
                       height: int, aesthetic_score: float = 6.0
                       ) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
        """Prompt editing ([a:b:N]): the step boundaries and the conditioning for each span."""
        scheds = [prompt_schedule(p, steps) for p in prompts]
        bounds = sorted({end for s in scheds for end, _ in s})
        conds = []
        done: dict[tuple[str, ...], Conditioning] = {}  # [a|b] repeats texts every other step
        for end in bounds:
            texts = tuple(next(t for e, t in s if e >= end) for s in scheds)
            if texts not in done:
                done[texts] = self.encode_prompts(list(texts), clip_skip)
            conds.append(done[texts])
        return bounds, conds

    def cfg_denoiser(self, prompts: list[str], negatives: list[str], steps: int,
                     cfg_scale: float, clip_skip: int, width: int, height: int,
                     sigmas: torch.Tensor, aesthetic_score: float = 6.0,
                     extra: dict[str, torch.Tensor] | None = None) -> Callable:
        """The classifier-free-guided denoiser for a batch, with per-step prompt editing and
        composable (`AND`) prompts."""
        groups, parts = [], []  # image i's (row, weight) pairs; the rows' texts
        for p in prompts:
            split = split_and(p)
            groups.append([(len(parts) + k, w) for k, (_, w) in enumerate(split)])
            parts += [t for t, _ in split]
        if all(len(g) == 1 and g[0][1] == 1.0 for g in groups):
            groups = None  # plain prompts: the ordinary two-row CFG
        bounds, conds = self.scheduled_cond(parts, steps, clip_skip, width, height)
        n_bounds, unconds = self.scheduled_cond(negatives, steps, clip_skip, width, height)
        empty = self.encode_prompts([""], clip_skip)
        kw_c = [self.cond_kwargs(c, width, height, aesthetic_score) for c in conds]
        # the refiner is told a low aesthetic score for the negative side, as SGM/A1111 do
        kw_u = [self.cond_kwargs(u, width, height, 2.5) for u in unconds]
        # cond and uncond must have the same token length to batch them: pad the shorter ones
        # with chunks of the empty prompt (A1111 ≥ 1.6)
        n_tok = max(k["context"].shape[1] for k in kw_c + kw_u)
        for k in kw_c + kw_u:
            if k["context"].shape[1] < n_tok:
                pad = empty.context.to(k["context"]).repeat(
                    k["context"].shape[0], (n_tok - k["context"].shape[1])
                    // empty.context.shape[1], 1)
                k["context"] = torch.cat([k["context"], pad], dim=1)
        extra = extra or {}
        rows = None if groups is None else [i for i, g in enumerate(groups) for _ in g]
        extra_c = extra if rows is None else {  # e.g. inpainting's c_concat, one per part
            k: v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == len(prompts) else v
            for k, v in extra.items()}
        sig = [float(s) for s in sigmas]

        def step_of(sigma: torch.Tensor) -> int:
            s = float(sigma.flatten()[0])
            # index of the sampling step this sigma belongs to (nearest grid point ≥ sigma)
            return max([i for i, g in enumerate(sig[:-1]) if g >= s - 1e-6] or [0])

        def pick(table_bounds, table, step):
            for end, kw in zip(table_bounds, table):
                if step <= end:  # A1111: 0-based step against 1-based "end at step"
                    return kw
            return table[-1]

        def cond_at(sigma):
            step = step_of(sigma) + (steps - (len(sig) - 1))  # img2img starts partway
            return ({**pick(bounds, kw_c, step), **extra_c},
                    {**pick(n_bounds, kw_u, step), **extra})

        if groups is None:
            return CFGDenoiser(self.denoiser, cond_at, cfg_scale)
        return CFGDenoiser(self.denoiser, lambda s: cond_at(s)[0], lambda s: cond_at(s)[1],
                           cfg_scale, groups=groups)

    # ---------------------------------------------------------------- VAE
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], one image at a time to bound memory."""
        vae = self.model.vae
        outs = [vae.image_from_latent(z[None].to(self.device, self.dtype)).float().cpu()
                for z in latents]
        return torch.cat(outs)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents, sampling the posterior with each image's seed."""
        vae = self.model.vae
        outs = []
        for x, s in zip(pixels, seeds):
            g = torch.Generator().manual_seed(int(s))
            outs.append(vae.latent_from_image(x[None].to(self.device, self.dtype), generator=g,
                                              sample=True).float())
        return torch.cat(outs)
