"""Full-size parity of ControlNet, the CLIP vision tower and IP-Adapter against
diffusers/transformers, on random weights, fp32, CPU — the published sizes, not the tests'
tiny configs. The reference model is built in diffusers/transformers; ours gets its weights
through sdloom's own key maps and loaders (the code paths tests/test_controlnet.py and
tests/test_ip_adapter.py use), sharing the tensors (load_state_dict(assign=True)) so that SDXL
fits in memory.

Usage: PYTHONPATH=src python bench/parity_control_full.py [--only cn15,cnxl,...] [--threads 1]
           [--cn-latent 64] [--xl-latent 64] [--ip-latent 64] [--size 256] [--steps 4]
           [--tmp DIR]

Random weights: std 1/sqrt(fan_in), norm weights 1 ± 0.1, biases ± 0.1 (so activations stay
O(1) at full width, where the tests' fixed std 0.3 is meant for 32-wide layers), and gain 2 on the
ControlNet hint embedding's convs so that the control image matters (random_controlnet_).

Prints progress to stderr and one JSON object to stdout: per check, max |ours − theirs| /
max |theirs| for each output ("*_err"), a negative control ("neg_*", which must be large),
"ok", wall seconds and the process's peak RSS so far.

Checks (in this order):
  cn15     SD1.5 ControlNet (320/640/1280/1280, context 768): the 12 down + 1 mid residuals,
           then the SD1.5 U-Net output with them added. Negative controls: the residuals for
           another control image; ours with zero convs 1 and 2 swapped (both 320 → 320, what a
           wrong key map would do); the U-Net given the mid residual and the last down
           residual swapped (same shapes). "control_effect" is the U-Net output with vs
           without the residuals.
  cnxl     SDXL ControlNet (full encoder: depth 1/2/10, context 2048, ADM 2816): 9 + 1
           residuals and the SDXL U-Net output with them (--xl-latent, default 64×64).
           Negative controls as for cn15.
  clipvis  CLIP vision ViT-H/14 (1280 wide, 32 layers, projection 1024; the IP-Adapter image
           encoder), config detected from shapes alone: image_embeds and hidden_states[-2];
           also our preprocess vs CLIPImageProcessor. Negative controls: the same weights
           with the text tower's causal attention (must exceed 1e-2), and with quick_gelu (the
           OpenAI-CLIP preset) instead of gelu — a subtle change (the activations differ by
           < 0.02), so it must only exceed 10× the tolerance.
  clipvisg CLIP vision ViT-bigG/14 (1664 wide, 48 layers, projection 1280; SDXL's encoder),
           as clipvis.
  ipa15    IP-Adapter SD1.5, plain (4 tokens from a 1024-d embedding) and plus (Resampler:
           16 queries, 768 wide, depth 4, over 257×1280 hidden states), loaded by diffusers'
           _load_ip_adapter_weights and by our load_ip_adapter from the same original-layout
           file: the U-Net output (batch 2: cond row with the image, uncond row with the zero
           embedding; plain at scale 0.7). Negative controls: the image key/value projections
           of processors 1 and 3 swapped (both 320 wide); for plus also the Resampler's first
           two layers swapped (tokens). "ip_effect" is the output with vs without the adapter.
  pipe15   A whole image: our generate() vs diffusers StableDiffusionControlNetPipeline, full
           SD1.5 (U-Net, VAE, CLIP ViT-L/14 text encoder and tokenizer, as `sdloom convert`
           writes them) with a full SD1.5 ControlNet, --size px, --steps Euler steps, CFG 5:
           the final latents and the decoded 8-bit image. Negative control: diffusers with
           controlnet_conditioning_scale=0 against our controlled latents.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_parity import SD15_UNET, SDXL_UNET  # noqa: E402  (the published U-Net shapes)

CHECKS = ("cn15", "cnxl", "clipvis", "clipvisg", "ipa15", "pipe15")
TOL = 1e-4  # fp32 module parity, relative to the output scale
PIPE_TOL = 1e-3  # whole sampling run (as tests/test_controlnet.py)
NEG_MIN = 1e-2  # a negative control must move the output at least this much
# transformers CLIPVisionConfig of the published IP-Adapter image encoders
# (h94/IP-Adapter models/image_encoder and sdxl_models/image_encoder)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
             hidden_act="gelu", layer_norm_eps=1e-5)
VIT_BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1280,
                hidden_act="gelu", layer_norm_eps=1e-5)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def rel_all(xs, ys) -> float:
    return max(rel(a, b) for a, b in zip(xs, ys, strict=True))


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Scale-preserving random weights (std 1/√fan_in), norm weights 1 ± 0.1 and biases ± 0.1,
    so that a swapped key cannot hide and 30+ blocks deep the activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
    return module


def materialize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A module built on the meta device → CPU storage with randomize_ (no default init)."""
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers: build it on the CPU")
    module.to_empty(device="cpu")
    return randomize_(module, seed).eval().requires_grad_(False)


def random_controlnet_(cn: torch.nn.Module, seed: int) -> torch.nn.Module:
    """materialize_, then gain 2 on the hint embedding's inner convs: eight convs with SiLU and
    no norms halve the image-dependent part at each layer (at gain 1 two random control images
    gave embeddings 0.3 % apart — the control image would hardly matter)."""
    materialize_(cn, seed)
    with torch.no_grad():
        for name, p in cn.controlnet_cond_embedding.named_parameters():
            if p.ndim > 1 and not name.startswith("conv_out."):
                p.mul_(2.0)
    return cn


def _unet_pair(kw: dict, seed: int, controlnet: bool):
    """(diffusers U-Net, diffusers ControlNetModel or None, our U-Net sharing its tensors,
    our UNetConfig) — our U-Net through keymaps.unet as tests/test_unet.make_pair."""
    import diffusers

    from sdloom.families.keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from sdloom.models.unet import UNetModel
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**kw)
        cn = diffusers.ControlNetModel.from_unet(ref, load_weights_from_unet=False) \
            if controlnet else None
    log(f"  randomizing the diffusers U-Net ({sum(p.numel() for p in ref.parameters()) / 1e6:.0f}"
        " M params)")
    materialize_(ref, seed)
    if cn is not None:
        log(f"  randomizing the diffusers ControlNet "
            f"({sum(p.numel() for p in cn.parameters()) / 1e6:.0f} M params)")
        random_controlnet_(cn, seed + 1)
    cfg = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNetModel(cfg)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True, assign=True)
    return ref, cn, ours.eval(), cfg


def _our_controlnet(sd: dict, cfg):
    """Our ControlNet from a diffusers ControlNetModel state dict: the product's file-key map,
    detection, fit to the U-Net and strict build (as tests/test_controlnet._ours_from)."""
    from sdloom.families.sd_controlnet import (build_controlnet, controlnet_keys,
                                               detect_controlnet, fit_to_unet)
    names = controlnet_keys({k: tuple(v.shape) for k, v in sd.items()})
    shapes = {new: tuple(sd[old].shape) for old, new in names.items()}
    ccfg = fit_to_unet(detect_controlnet(shapes), cfg, cfg.in_channels, "bench")
    return build_controlnet(ccfg, {new: sd[old] for old, new in names.items()}, torch.float32,
                            torch.device("cpu"))


@torch.no_grad()
def _controlnet_check(kw: dict, latent: int, sdxl: bool, seed: int) -> dict:
    from sdloom.models.unet import sdxl_adm
    ref, cn, ours, cfg = _unet_pair(kw, seed, controlnet=True)
    net = _our_controlnet(cn.state_dict(), cfg)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(1, 4, latent, latent, generator=g)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 77, cfg.context_dim, generator=g)
    hint = torch.rand(1, 3, 8 * latent, 8 * latent, generator=g)
    other = torch.rand(1, 3, 8 * latent, 8 * latent, generator=g)
    extra, y = {}, None
    if sdxl:
        px = 8 * latent
        pooled = torch.randn(1, 1280, generator=g)
        extra = {"added_cond_kwargs": {"text_embeds": pooled,
                                       "time_ids": torch.tensor([[px, px, 0, 0, px, px]],
                                                                dtype=torch.float32)}}
        y = sdxl_adm(pooled, (px, px), (0, 0), (px, px))
    log("  diffusers ControlNet")
    down, mid = cn(x, t, ctx, controlnet_cond=hint, return_dict=False, **extra)
    want_res = [*down, mid]
    log("  diffusers U-Net with residuals, and without")
    want = ref(x, t, ctx, down_block_additional_residuals=down,
               mid_block_additional_residual=mid, **extra).sample
    plain = ref(x, t, ctx, **extra).sample
    log("  our ControlNet, our U-Net")
    res = net(x, hint, t, ctx, y)
    got = ours(x, t, ctx, y=y, control=res)
    log("  negative controls")
    res_other = net(x, other, t, ctx, y)
    z = net.zero_convs  # 1 and 2: both 320 → 320 after the first level's two blocks
    z[1], z[2] = z[2], z[1]
    res_zero = net(x, hint, t, ctx, y)
    z[1], z[2] = z[2], z[1]
    swapped = [*res[:-2], res[-1], res[-2]]
    bad = ours(x, t, ctx, y=y, control=swapped)
    out = {"latent": [latent, latent], "residuals": len(res),
           "residual_scale": float(max(r.abs().max() for r in want_res)),
           "residuals_err": rel_all(res, want_res),
           "unet_err": rel(got, want),
           "control_effect": rel(plain, want),
           "neg_other_control_image": rel_all(res_other, want_res),
           "neg_zero_convs_1_2_swapped": rel_all(res_zero, want_res),
           "neg_mid_and_last_residual_swapped": rel(bad, want)}
    out["ok"] = bool(len(res) == len(want_res) and out["residuals_err"] < TOL
                     and out["unet_err"] < TOL and out["neg_other_control_image"] > NEG_MIN
                     and out["neg_zero_convs_1_2_swapped"] > NEG_MIN
                     and out["neg_mid_and_last_residual_swapped"] > NEG_MIN)
    return out


def check_cn15(args) -> dict:
    return _controlnet_check(SD15_UNET, args.cn_latent, False, seed=100)


def check_cnxl(args) -> dict:
    return _controlnet_check(SDXL_UNET, args.xl_latent, True, seed=200)


@torch.no_grad()
def _clip_check(hf_kw: dict, seed: int) -> dict:
    import transformers
    from PIL import Image

    from sdloom.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, preprocess
    from sdloom.models.text_encoders import HFAttention
    torch.manual_seed(seed)
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_kw))
    log(f"  randomizing transformers CLIP vision "
        f"({sum(p.numel() for p in ref.parameters()) / 1e6:.0f} M params)")
    randomize_(ref, seed).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg = CLIPVisionConfig.detect(shapes)  # no config.json: the width preset
    cfg_hf = CLIPVisionConfig.detect(shapes, ref.config.to_dict())

    def ours_with(c):
        with torch.device("meta"):
            m = CLIPVisionModel(c)
        m.load_state_dict(sd, strict=True, assign=True)
        return m.eval()

    ours = ours_with(cfg)
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((260, 300, 3)) * 255).astype(np.uint8))
    size = hf_kw["image_size"]
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                           crop_size={"height": size, "width": size})
    want_px = proc(images=[img], return_tensors="pt").pixel_values
    px = preprocess([img], size)
    px = torch.cat([px, torch.zeros_like(px)])  # an image and the zero (uncond) image
    log("  transformers forward")
    want = ref(px, output_hidden_states=True)
    log("  our forward")
    emb, hidden = ours(px)
    log("  negative controls (causal attention; quick_gelu)")
    causal = ours_with(cfg)
    for layer in causal.vision_model.encoder.layers:  # the text tower's attention
        layer.self_attn.forward = HFAttention.forward.__get__(layer.self_attn)
    c_emb, c_hidden = causal(px)
    q_emb, q_hidden = ours_with(dataclasses.replace(cfg, act="quick_gelu"))(px)
    out = {"config": dataclasses.asdict(cfg), "preset_equals_config_json": cfg == cfg_hf,
           "preprocess_err_abs": float((px[:1] - want_px).abs().max()),
           "image_embeds_err": rel(emb, want.image_embeds),
           "hidden_states_minus2_err": rel(hidden[-2], want.hidden_states[-2]),
           "hidden_states_count": [len(hidden), len(want.hidden_states)],
           "neg_causal_attention_image_embeds": rel(c_emb, want.image_embeds),
           "neg_causal_attention_hidden_states_minus2": rel(c_hidden[-2],
                                                            want.hidden_states[-2]),
           "neg_quick_gelu_image_embeds": rel(q_emb, want.image_embeds),
           "neg_quick_gelu_hidden_states_minus2": rel(q_hidden[-2], want.hidden_states[-2])}
    out["ok"] = bool(out["image_embeds_err"] < TOL and out["hidden_states_minus2_err"] < TOL
                     and out["preset_equals_config_json"] and out["preprocess_err_abs"] < 1e-4
                     and out["neg_causal_attention_image_embeds"] > NEG_MIN
                     and out["neg_causal_attention_hidden_states_minus2"] > NEG_MIN
                     # a subtle one (the two activations differ by < 0.02): 10× the tolerance
                     and out["neg_quick_gelu_image_embeds"] > 10 * TOL
                     and out["neg_quick_gelu_hidden_states_minus2"] > 10 * TOL)
    return out


def check_clipvis(args) -> dict:
    return _clip_check(VIT_H, seed=300)


def check_clipvisg(args) -> dict:
    return _clip_check(VIT_BIGG, seed=350)


def _nested(sd: dict) -> dict:
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        top, rest = k.split(".", 1)
        out[top][rest] = v
    return out


def _ip_kv(sd: dict, unet, context: int, g) -> dict:
    from sdloom.models.ip_adapter import cross_attentions
    for i, a in cross_attentions(unet).items():
        for n in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{i}.{n}.weight"] = torch.randn(
                a.to_q.weight.shape[0], context, generator=g) * context ** -0.5
    return sd


def _plain_sd(unet, embed_dim=1024, context=768, tokens=4, seed=3) -> dict:
    """A random ip-adapter_sd15 file (original layout): 4 tokens from the ViT-H embedding."""
    g = torch.Generator().manual_seed(seed)
    sd = {"image_proj.proj.weight": torch.randn(tokens * context, embed_dim, generator=g)
          * embed_dim ** -0.5,
          "image_proj.proj.bias": torch.randn(tokens * context, generator=g) * 0.1,
          "image_proj.norm.weight": 1 + torch.randn(context, generator=g) * 0.1,
          "image_proj.norm.bias": torch.randn(context, generator=g) * 0.1}
    return _ip_kv(sd, unet, context, g)


def _plus_sd(unet, embed_dim=1280, context=768, queries=16, dim=768, depth=4, seed=4) -> dict:
    """A random ip-adapter-plus_sd15 file (original Resampler layout, published sizes)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=None):
        return torch.randn(*shape, generator=g) * (shape[-1] ** -0.5 if s is None else s)

    sd = {"image_proj.latents": r(1, queries, dim, s=dim ** -0.5),
          "image_proj.proj_in.weight": r(dim, embed_dim), "image_proj.proj_in.bias": r(dim, s=.1),
          "image_proj.proj_out.weight": r(context, dim),
          "image_proj.proj_out.bias": r(context, s=0.1),
          "image_proj.norm_out.weight": 1 + r(context, s=0.1),
          "image_proj.norm_out.bias": r(context, s=0.1)}
    for i in range(depth):
        pre = f"image_proj.layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = 1 + r(dim, s=.1), r(dim, s=.1)
        sd[pre + "0.to_q.weight"], sd[pre + "0.to_kv.weight"] = r(dim, dim), r(2 * dim, dim)
        sd[pre + "0.to_out.weight"] = r(dim, dim)
        sd[pre + "1.1.weight"], sd[pre + "1.3.weight"] = r(4 * dim, dim), r(dim, 4 * dim)
    return _ip_kv(sd, unet, context, g)


@torch.no_grad()
def check_ipa15(args) -> dict:
    from safetensors.torch import save_file

    from sdloom.families.sd import UNetAdapter
    from sdloom.models.ip_adapter import ActiveIPAdapter, IPAdaptedModel, load_ip_adapter
    ref, _, ours, cfg = _unet_pair(SD15_UNET, 400, controlnet=False)
    L = args.ip_latent
    g = torch.Generator().manual_seed(410)
    x = torch.randn(2, 4, L, L, generator=g)
    t = torch.tensor([999.0, 37.5])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    mark = torch.tensor([1.0, 0.0])  # row 0 cond (the image), row 1 uncond
    out: dict = {"latent": [L, L], "batch": 2}
    log("  our U-Net without an adapter")
    without = ours(x, t, ctx)

    def swapped_run(m):
        m.attns = {**m.attns, 1: m.attns[3], 3: m.attns[1]}
        return m(x, t, ctx, cond_mark=mark)

    # plain: ViT-H image embeds [B, images, 1024]; uncond row the zero embedding
    sd = _plain_sd(ours)
    save_file(sd, Path(args.tmp) / "ip.safetensors")
    adapter = load_ip_adapter(Path(args.tmp) / "ip.safetensors", torch.device("cpu"),
                              torch.float32)
    ref._load_ip_adapter_weights([_nested(sd)])
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale") and isinstance(proc.scale, list):
            proc.scale = [0.7]
    embeds = torch.randn(1, 1024, generator=g)
    log("  plain: diffusers U-Net with ip_adapter_image_embeds")
    want = ref(x, t, ctx, added_cond_kwargs={
        "image_embeds": [torch.stack([embeds, torch.zeros_like(embeds)])]}).sample
    cond = adapter.image_proj(embeds).reshape(1, -1, cfg.context_dim)
    uncond = adapter.image_proj(torch.zeros_like(embeds)).reshape(cond.shape)
    log("  plain: ours")
    unit = ActiveIPAdapter(adapter, cond, uncond, weight=0.7)
    m = IPAdaptedModel(UNetAdapter(ours), ours, [unit], lambda: 0.0, pass_mark=False)
    got = m(x, t, ctx, cond_mark=mark)
    log("  plain: negative control")
    out["plain"] = {"tokens": cond.shape[1], "unet_err": rel(got, want),
                    "ip_effect": rel(without, want),
                    "neg_processors_1_3_swapped": rel(swapped_run(m), want)}
    # plus: ViT-H penultimate hidden states [1, 257, 1280] through the Resampler
    sd = _plus_sd(ours)
    save_file(sd, Path(args.tmp) / "plus.safetensors")
    adapter = load_ip_adapter(Path(args.tmp) / "plus.safetensors", torch.device("cpu"),
                              torch.float32)
    assert adapter.plus
    ref._load_ip_adapter_weights([_nested(sd)], low_cpu_mem_usage=False)
    feats = torch.randn(1, 257, 1280, generator=g)
    blank = torch.randn(1, 257, 1280, generator=g)
    tokens = adapter.image_proj(torch.cat([feats, blank]))
    want_tokens = ref.encoder_hid_proj.image_projection_layers[0](torch.cat([feats, blank]))
    log("  plus: diffusers U-Net")
    want = ref(x, t, ctx, added_cond_kwargs={"image_embeds": [torch.stack([feats, blank])]}
               ).sample
    log("  plus: ours")
    m = IPAdaptedModel(UNetAdapter(ours), ours, [ActiveIPAdapter(adapter, tokens[:1], tokens[1:],
                                                            weight=1.0)],
                       lambda: 0.0, pass_mark=False)
    got = m(x, t, ctx, cond_mark=mark)
    log("  plus: negative controls")
    layers = adapter.image_proj.layers
    layers[0], layers[1] = layers[1], layers[0]
    bad_tokens = adapter.image_proj(torch.cat([feats, blank]))
    out["plus"] = {"tokens": tokens.shape[1], "tokens_err": rel(tokens, want_tokens),
                   "unet_err": rel(got, want), "ip_effect": rel(without, want),
                   "neg_resampler_layers_0_1_swapped_tokens": rel(bad_tokens, want_tokens),
                   "neg_processors_1_3_swapped": rel(swapped_run(m), want)}
    p, q = out["plain"], out["plus"]
    out["ok"] = bool(p["unet_err"] < TOL and q["unet_err"] < TOL and q["tokens_err"] < TOL
                     and p["neg_processors_1_3_swapped"] > NEG_MIN
                     and q["neg_processors_1_3_swapped"] > NEG_MIN
                     and q["neg_resampler_layers_0_1_swapped_tokens"] > NEG_MIN)
    return out


def check_pipe15(args) -> dict:
    import diffusers
    from PIL import Image

    from sdloom.checkpoints.save import save_model
    from sdloom.cli import main as cli
    from sdloom.controlnet import ControlUnit
    from sdloom.families.sd import LatentDiffusion
    from sdloom.families.sd_presets import PRESETS
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from sdloom.seeds import ImageRNG
    root = Path(args.tmp)
    size, steps, seed, cfg_scale = args.size, args.steps, 7, 5.0
    cfg = PRESETS["sd1"]
    log("  our full SD1.5 model, random weights → single file → `sdloom convert` → diffusers")
    torch.manual_seed(500)
    model = randomize_(LatentDiffusion(cfg), 500).eval()
    save_model(model, cfg, root / "m.safetensors")
    del model
    gc.collect()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        rc = cli(["convert", str(root / "m.safetensors"), str(root / "folder")])
    if rc != 0:
        raise RuntimeError("sdloom convert failed")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "folder")
    with torch.device("meta"):
        cn = diffusers.ControlNetModel.from_unet(pipe.unet, load_weights_from_unet=False)
    random_controlnet_(cn, 501)
    cn.save_pretrained(root / "cn")
    sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                         timestep_spacing="linspace")
    cpipe = diffusers.StableDiffusionControlNetPipeline(
        **{**pipe.components, "scheduler": sched}, controlnet=cn)
    cpipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    hint = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    noise = ImageRNG((4, size // 8, size // 8), [seed]).first()

    def theirs(**kw):
        with torch.no_grad():
            return cpipe("a cat", negative_prompt="", image=hint, num_inference_steps=steps,
                         guidance_scale=cfg_scale, height=size, width=size, latents=noise,
                         output_type="latent", **kw).images

    def decode(lat):
        with torch.no_grad():
            img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        return ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0) \
            .numpy()

    log(f"  diffusers StableDiffusionControlNetPipeline, {size}², {steps} steps")
    want = theirs()
    log("  diffusers, controlnet_conditioning_scale=0 (negative control)")
    want_nocn = theirs(controlnet_conditioning_scale=0.0)
    log("  diffusers VAE decode")
    want_img, nocn_img = decode(want), decode(want_nocn)
    cpipe = pipe = cn = sched = None  # free them before ours loads
    gc.collect()
    log("  ours: Engine.load + generate with the ControlNet unit")
    eng = Engine.load(root / "m.safetensors", device="cpu", precision="fp32")
    final = []
    p = GenerationParams(prompt="a cat", seed=seed, steps=steps, cfg_scale=cfg_scale,
                         width=size, height=size, sampler_name="Euler",
                         controlnets=[ControlUnit(str(root / "cn"), hint, resize_mode=0)])
    res = generate(eng, p, lambda i, n, x0: final.append(x0))
    lat = final[-1]
    img = np.asarray(res.images[0], np.int16)
    diff = np.abs(img - want_img.astype(np.int16))
    out = {"size": [size, size], "steps": steps, "cfg_scale": cfg_scale, "sampler": "Euler",
           "latent_scale": float(want.abs().max()),
           "latents_err": rel(lat, want),
           "image_max_abs_diff_of_255": int(diff.max()),
           "image_mean_abs_diff_of_255": float(diff.mean()),
           "image_pixels_differing": float((diff > 0).mean()),
           "image_unsaturated_fraction": float(((want_img > 0) & (want_img < 255)).mean()),
           "control_effect": rel(want_nocn, want),
           "neg_no_control_latents": rel(lat, want_nocn),
           "neg_no_control_image_max_abs_diff_of_255": int(np.abs(
               img - nocn_img.astype(np.int16)).max())}
    out["ok"] = bool(out["latents_err"] < PIPE_TOL and out["image_max_abs_diff_of_255"] <= 1
                     and out["neg_no_control_latents"] > NEG_MIN)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(CHECKS),
                    help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--cn-latent", type=int, default=64, help="SD1.5 ControlNet latent side")
    ap.add_argument("--xl-latent", type=int, default=64, help="SDXL ControlNet latent side")
    ap.add_argument("--ip-latent", type=int, default=64, help="IP-Adapter U-Net latent side")
    ap.add_argument("--size", type=int, default=256, help="pipe15 image side in px")
    ap.add_argument("--steps", type=int, default=4, help="pipe15 sampler steps")
    ap.add_argument("--tmp", default=None, help="scratch folder (pipe15 writes ~10 GB)")
    args = ap.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        ap.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "threads": args.threads, "dtype": "float32",
                     "device": "cpu", "tolerance": TOL, "pipeline_tolerance": PIPE_TOL,
                     "negative_control_min": NEG_MIN, "checks": {}}
    try:
        import diffusers
        import transformers
        results["diffusers"], results["transformers"] = diffusers.__version__, \
            transformers.__version__
    except ImportError as e:  # the oracles are test/bench requirements only
        print(f"error: {e} (pip install -r requirements-test.txt)", file=sys.stderr)
        return 2
    for name in (c for c in CHECKS if c in only):
        log(f"{name}: start")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"sdloom-{name}-", dir=args.tmp) as tmp:
            try:
                r = globals()[f"check_{name}"](argparse.Namespace(**{**vars(args), "tmp": tmp}))
            except Exception as e:  # one failing check still reports the others
                r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                log(f"{name}: FAILED {r['error']}")
        gc.collect()
        r["wall_s"] = round(time.perf_counter() - t, 1)
        r["peak_rss_gb_so_far"] = peak_rss_gb()
        results["checks"][name] = r
        log(f"{name}: done in {r['wall_s']} s, ok={r['ok']}, peak RSS {r['peak_rss_gb_so_far']} GB")
    results["ok"] = all(r["ok"] for r in results["checks"].values())
    print(json.dumps(results, indent=1))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
