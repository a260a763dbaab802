"""A loaded model ready to generate: its family's conditioning, sampling and latents.

The pipelines (`generate.py`) are thin compositions of these pieces; everything that differs
between model families comes from the family (`families/`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.load import LoadedModel, load_model
from ..errors import NotFoundError, SdloomError
from ..families import family_of
from ..models.lora import LoraManager, read_lora
from ..prompts import Conditioning, EmbeddingDB, cond_at_step, split_and, stack_conds
from ..sampling.denoisers import CFGDenoiser
from ..tiled_vae import image_from_latent_tiled, latent_from_image_tiled
from .fastpath import GraphedModel
from .offload import MODES, Offload

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL = ASSETS / "sdloom-emoji.safetensors"
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX-BF16 or AVX512-BF16), so oneDNN runs bf16
    convolutions and matmuls 2.5-4x faster than fp32 (docs/benchmarks.md). Without either,
    oneDNN has no bf16 kernels to gain from, so fp32 stays the default there."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        c = caps()
        return bool(c.get("amx_bf16") or c.get("avx512_bf16"))
    try:  # older torch: the kernel's flags
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA/MPS; on a CPU bf16 where it is native, else fp32. The embedded
    model's images in bf16 stay within 36-48 dB PSNR of fp32 (docs/benchmarks.md)."""
    if precision == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise SdloomError(f"precision must be one of auto, {', '.join(table)}")
    return table[precision]


@dataclass
class Engine:
    """A model on a device, with its prompt encoder, noise schedule and LoRA state."""
    model: torch.nn.Module  # a family's whole model (families/)
    path: Path | None = None
    embeddings_dir: Path | None = None
    lora_dir: Path | None = None
    upscaler_dir: Path | None = None  # ESRGAN-family models for the hires fix
    # VAE tiling (tiled_vae.py): "auto" tiles images of more than vae_tile_pixels pixels on any
    # device, CUDA included (2048² default: an SD VAE's untiled fp32 decode of 1024² peaks at
    # 4.1 GiB RSS on a CPU, docs/benchmarks.md, so 2048² needs ~4x that; lower it for a small
    # GPU: free memory is not consulted), "on" always, "off" never; tile, overlap: latent cells
    vae_tiling: str = "auto"
    vae_tile_pixels: int = 2048 * 2048
    vae_tile: tuple[int, int] = (64, 8)
    # the GPU fast path (fastpath.py): the denoiser's network replayed from CUDA graphs (on by
    # default; CUDA only, inference only) and, opt-in, compiled with torch.compile
    cuda_graphs: bool = True
    compile: bool = False
    # memory modes (offload.py): "model" keeps one component on the GPU at a time, "blocks" one
    # block; the weights stay in CPU memory (the model is given on the CPU), `offload_device`
    # is where they run. CUDA graphs need weights that stay put, so they are off then.
    offload: str = "none"
    offload_device: str = "cuda"
    _hash: str | None = field(default=None, repr=False)

    def __post_init__(self):
        cfg = self.model.config
        self.config = cfg
        self.family = family_of(cfg)
        self.latent_format = self.family.latent_format(cfg)
        self.sampling = self.family.model_sampling(cfg)  # noising, denoising, sigma table
        self.schedule = self.sampling.schedule
        db = EmbeddingDB()
        if self.embeddings_dir and Path(self.embeddings_dir).is_dir():
            db.load_dir(self.embeddings_dir)
        self.prompt_encoder = self.family.prompt_encoder(self.model, db)
        # a broken or foreign embedding is reported, never skipped in silence
        for why in db.errors.values():
            print(f"sdloom: embedding not loaded: {why}", file=sys.stderr)
        for name in self.prompt_encoder.skipped_embeddings:
            print(f"sdloom: embedding {name!r} was made for another model family; skipped",
                  file=sys.stderr)
        self.loras = LoraManager(self.model, lambda: self.family.lora_targets(self.model))
        self._lora_key: list[tuple[str, float]] = []  # the (file, weight) pairs merged now
        self._vae_key: str | None = None  # the VAE file in use instead of the model's own
        self._vae_own: dict[str, torch.Tensor] | None = None
        self._offload = None
        self._device = self.model.device
        if self.offload not in MODES:
            raise SdloomError(f"offload must be one of {', '.join(MODES)}, not {self.offload!r}")
        if self.offload != "none":
            if self.compile:  # weights that move between calls would recompile every call
                raise SdloomError("--compile and --offload cannot be combined")
            self._device = torch.device(self.offload_device)
            self._offload = Offload(self.model, self._device, self.offload)
            self.cuda_graphs = False
        net = self.family.denoiser_model(self.model)
        if self.cuda_graphs or self.compile:
            cpu = self._device.type == "cpu"  # C++ launches on the CPU (fastpath.py)
            net = GraphedModel(net, graphs=self.cuda_graphs, compile=self.compile,
                               compile_options={"cpp_wrapper": True} if cpu else None)
        self.denoiser = self.sampling.denoiser(net)

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto",
             precision: str = "auto", vae: str | None = None, prediction: str | None = None,
             without: tuple[str, ...] = (), text_encoders=None, **kw) -> Engine:
        """`text_encoders`: separate text-encoder files or a folder (SD3; `load_model`)."""
        dev = pick_device(device)
        offload = kw.get("offload", "none")
        if offload != "none":  # the weights stay in CPU memory and visit `dev` while they run
            kw["offload_device"] = str(dev)
        path = Path(path) if path else EMBEDDED_MODEL
        if not path.exists() and path == EMBEDDED_MODEL:
            raise SdloomError("the embedded model is missing from this install "
                              f"({EMBEDDED_MODEL}); pass --model PATH")
        home = torch.device("cpu") if offload != "none" else dev
        loaded: LoadedModel = load_model(path, dtype=pick_dtype(precision, dev), device=home,
                                         prediction=prediction, vae=vae, without=without,
                                         text_encoders=text_encoders)
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
        """Where the work runs (with offload the weights live in CPU memory meanwhile)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---------------------------------------------------------------- LoRA
    def set_loras(self, loras: list[tuple[str, float]],
                  prompt_loras: list[tuple[str, float]] = ()) -> list[str]:
        """Make exactly these LoRAs active and return their names: `loras` are paths or names
        (library and CLI), `prompt_loras` names from `<lora:name:w>` tags, found only inside
        lora_dir. All files are read before any is merged; when merging fails, no LoRA stays
        merged, so a failed job never leaves a LoRA behind for the next one."""
        refs = [(self._find_lora(r, allow_path=True), w) for r, w in loras]
        refs += [(self._find_lora(r, allow_path=False), w) for r, w in prompt_loras]
        key = [(str(p), w) for p, w in refs]
        if key != self._lora_key:
            files = [(read_lora(p), w) for p, w in refs]
            if self._offload is not None:  # merge into the weights' CPU home
                self._offload.evict()
            self.loras.clear()
            self._lora_key = []
            try:
                for lora, w in files:
                    self.loras.apply(lora, w)
            except BaseException:
                self.loras.clear()
                raise
            self._lora_key = key
        return [p.stem for p, _ in refs]

    def _lora_index(self) -> dict[str, Path]:
        """LoRA files under lora_dir by name (file stem; a name in a subfolder may also be
        written with its folder, as A1111 shows it)."""
        out: dict[str, Path] = {}
        if not self.lora_dir or not Path(self.lora_dir).is_dir():
            return out
        root = Path(self.lora_dir).resolve()
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() in LORA_EXTENSIONS and f.is_file():
                rel = f.relative_to(root).with_suffix("")
                out.setdefault(f.stem, f)
                out.setdefault(rel.as_posix(), f)
        return out

    def _find_lora(self, ref: str, allow_path: bool) -> Path:
        if allow_path and Path(ref).is_file():
            return Path(ref)
        found = self._lora_index().get(str(ref))
        if found is None:
            raise NotFoundError(f"LoRA not found: {ref!r}" + ("" if self.lora_dir else
                                                            " (no LoRA folder is set)"))
        return found

    # ---------------------------------------------------------------- VAE override
    def set_vae(self, path: str | Path | None) -> None:
        """Use this VAE file's weights (A1111's sd_vae), or the model's own with None; the
        model's own weights are kept in CPU memory on the first switch and put back later."""
        from ..checkpoints.load import load_vae_into
        key = str(Path(path).resolve()) if path else None
        if key == self._vae_key:
            return
        if self._offload is not None:  # load into the weights' CPU home
            self._offload.evict()
        vae = self.model.first_stage_model
        if self._vae_own is None and key is not None:
            self._vae_own = {k: v.detach().to("cpu", copy=True)
                             for k, v in vae.state_dict().items()}
        try:
            if key is None:
                vae.load_state_dict(self._vae_own, strict=True)
            else:
                load_vae_into(self.model, key)
        except BaseException:
            vae.load_state_dict(self._vae_own, strict=True)  # never half a VAE
            self._vae_key = None
            raise
        self._vae_key = key

    @property
    def vae_override(self) -> Path | None:
        """The VAE file in use instead of the model's own, if any."""
        return Path(self._vae_key) if self._vae_key else None

    # ---------------------------------------------------------------- conditioning
    def cond_kwargs(self, c: Conditioning, width: int, height: int,
                    aesthetic_score: float = 6.0) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments for a conditioning (the family's: e.g. SDXL's ADM)."""
        return self.family.cond_kwargs(self.config, c, width, height, aesthetic_score,
                                       self.device, self.dtype)

    def cfg_denoiser(self, prompts: list[str], negatives: list[str], steps: int,
                     cfg_scale: float, clip_skip: int, width: int, height: int,
                     aesthetic_score: float = 6.0, hires_steps: int | None = None
                     ) -> CFGDenoiser:
        """The classifier-free-guided denoiser for a batch: prompt editing on A1111's step
        counter (`hires_steps` for a hires pass, as prompt_schedule counts it), composable
        (`AND`) prompts, one row per image."""
        groups, parts = [], []  # image i's (row, weight) pairs; the rows' texts
        for p in prompts:
            split = split_and(p)
            groups.append([(len(parts) + k, w) for k, (_, w) in enumerate(split)])
            parts += [t for t, _ in split]
        if all(len(g) == 1 and g[0][1] == 1.0 for g in groups):
            groups = None  # plain prompts: the ordinary two-row CFG
        enc = self.prompt_encoder
        with torch.no_grad():
            c_sched = enc.encode_scheduled(parts, steps, clip_skip, hires_steps)
            u_sched = enc.encode_scheduled(negatives, steps, clip_skip, hires_steps)

        def at(scheds, score: float) -> Callable[[int], dict]:
            cache: dict[tuple[int, ...], dict] = {}

            def kwargs(step: int) -> dict:
                picked = [cond_at_step(s, step) for s in scheds]
                key = tuple(id(c) for c in picked)
                if key not in cache:
                    cache[key] = self.cond_kwargs(stack_conds(picked), width, height, score)
                return cache[key]
            return kwargs

        # the refiner is told a low aesthetic score for the negative side, as SGM/A1111 do
        return CFGDenoiser(self.denoiser, at(c_sched, aesthetic_score), at(u_sched, 2.5),
                           cfg_scale, groups=groups)

    # ---------------------------------------------------------------- VAE
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1], one image at a time to bound memory, in tiles for
        large images (`vae_tiling`).

        Non-finite values are never passed on as a black image: latents that hold NaN/inf
        (the denoiser overflowed) are an error; a half-precision VAE that overflows (SDXL's in
        fp16 is the known case) decodes that image again in fp32, and says so (A1111's
        automatic VAE precision)."""
        if not torch.isfinite(latents).all():
            raise SdloomError("the denoiser produced NaN/inf latents: the model's weights are "
                              "damaged, or this precision overflows (try --precision fp32)")
        outs = []
        for z in latents:
            img = self._vae_decode(z, self.dtype)
            if not torch.isfinite(img).all() and self.dtype != torch.float32:
                print(f"sdloom: the VAE overflowed in {str(self.dtype).removeprefix('torch.')}; "
                      "decoding this image in fp32", file=sys.stderr)
                img = self._decode_fp32(z)
            if not torch.isfinite(img).all():
                raise SdloomError("the VAE produced NaN/inf values: its weights are damaged")
            outs.append(img.cpu())
        return torch.cat(outs)

    def _vae_tiled(self, height: int, width: int) -> bool:
        """Whether an image of height×width pixels goes through the VAE in tiles."""
        if self.vae_tiling not in ("auto", "on", "off"):
            raise SdloomError(f"vae_tiling must be auto, on or off, not {self.vae_tiling!r}")
        return self.vae_tiling == "on" or (self.vae_tiling == "auto"
                                           and height * width > self.vae_tile_pixels)

    def _vae_decode(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One latent [C, h, w] → image [1, 3, H, W] in fp32, tiled when `_vae_tiled` says."""
        vae, f = self.model.vae, self.latent_format.factor
        z = z[None].to(self.device, dtype)
        if self.device.type == "cpu" and dtype != torch.float32:
            # oneDNN's convolutions then run NHWC end to end: the embedded model's bf16 decode
            # takes 0.77x the time (docs/benchmarks.md, 2026-11-30 profile). fp32 stays NCHW,
            # its images unchanged (NHWC moves a few pixels by one level); GPUs: not measured
            z = z.contiguous(memory_format=torch.channels_last)
        if self._vae_tiled(z.shape[-2] * f, z.shape[-1] * f):
            tile, overlap = self.vae_tile
            return image_from_latent_tiled(vae, z, tile=tile, overlap=overlap, factor=f).float()
        return vae.image_from_latent(z).float()

    def _decode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        """One latent through the VAE in fp32, the model's own VAE left as it was."""
        vae = self.model.vae
        vae.float()
        try:
            return self._vae_decode(z, torch.float32)
        finally:
            vae.to(self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents, sampling the posterior with each image's seed
        (tiled as `decode`; the noise is drawn for the whole latent either way)."""
        vae = self.model.vae
        outs = []
        tiled = self._vae_tiled(*pixels.shape[-2:])
        tile, overlap = self.vae_tile
        for x, s in zip(pixels, seeds):
            g = torch.Generator().manual_seed(int(s))
            x = x[None].to(self.device, self.dtype)
            if tiled:
                z = latent_from_image_tiled(vae, x, g, sample=True, tile=tile, overlap=overlap,
                                            factor=self.latent_format.factor)
            else:
                z = vae.latent_from_image(x, generator=g, sample=True)
            outs.append(z.float())
        return torch.cat(outs)
