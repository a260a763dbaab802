"""Full-size parity (and eager speed) of our U-Net/VAE/text encoders vs diffusers/transformers,
SD1.5 and SDXL shapes, random weights. Meant for a GPU; runs on CPU too (slowly).

Usage: PYTHONPATH=src python bench/gpu_parity.py [--family sd1|sdxl|both] [--device cuda]
Prints max |error| relative to the output scale (fp32), and ms per U-Net call for both
implementations in fp16 (same weights, same run).
"""
from __future__ import annotations

import argparse
import time

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def timed(fn, n=10):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000


@torch.no_grad()
def unet_parity(family: str, device: str) -> None:
    import diffusers

    from sdloom.families.keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from sdloom.models.unet import UNetModel, sdxl_adm
    kw = SD15_UNET if family == "sd1" else SDXL_UNET
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**kw).to(device).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = UNetModel(cfg).to(device).eval()
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    s = kw["sample_size"]
    x = torch.randn(2, 4, s, s, device=device)
    t = torch.tensor([999.0, 500.0], device=device)
    ctx = torch.randn(2, 77, cfg.context_dim, device=device)
    extra, y = {}, None
    if family == "sdxl":
        pooled = torch.randn(2, 1280, device=device)
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        y = sdxl_adm(pooled, (1024, 1024), (0, 0), (1024, 1024))
    err = rel_err(ours(x, t, ctx, y=y), ref(x, t, encoder_hidden_states=ctx, **extra).sample)
    print(f"{family} U-Net fp32: max error / output scale = {err:.2e} "
          f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M params)")
    if device == "cuda":
        ours.half(), ref.half()
        h = lambda v: v.half() if v is not None else None  # noqa: E731
        if family == "sdxl":
            extra = {"added_cond_kwargs": {k: v.half() for k, v in
                                           extra["added_cond_kwargs"].items()}}
        ms_o = timed(lambda: ours(h(x), t, h(ctx), y=h(y)))
        ms_r = timed(lambda: ref(h(x), t, encoder_hidden_states=h(ctx), **extra))
        print(f"{family} U-Net fp16 batch 2: sdloom {ms_o:.1f} ms, diffusers {ms_r:.1f} ms, "
              f"ratio {ms_o / ms_r:.2f}")


@torch.no_grad()
def vae_text_parity(device: str) -> None:
    import diffusers
    import transformers

    from sdloom.families.keymaps.clip import normalize_hf_clip
    from sdloom.families.keymaps.vae import vae_diffusers_to_ldm
    from sdloom.families.sd_diffusers import text_config_from_hf, vae_config_from_diffusers
    from sdloom.models.text_encoders import build_text_encoder
    from sdloom.models.vae import AutoencoderKL
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE).to(device).eval()
    ours = AutoencoderKL(vae_config_from_diffusers(dict(ref.config), False)).to(device).eval()
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    z = torch.randn(1, 4, 64, 64, device=device)
    print(f"VAE decode 512² fp32: {rel_err(ours.decode(z), ref.decode(z).sample):.2e}")
    img = torch.rand(1, 3, 512, 512, device=device) * 2 - 1
    print(f"VAE encode 512² fp32: "
          f"{rel_err(ours.encode(img)[0], ref.encode(img).latent_dist.mean):.2e}")
    hc = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     hidden_act="quick_gelu")
    te_ref = transformers.CLIPTextModel(hc).to(device).eval()
    te = build_text_encoder(text_config_from_hf(hc.to_dict())).to(device).eval()
    te.transformer.load_state_dict(normalize_hf_clip(te_ref.state_dict()), strict=True)
    ids = torch.randint(0, 49406, (2, 77), device=device)
    ids[:, 10] = 49407
    print(f"CLIP-L last hidden fp32: "
          f"{rel_err(te(ids)[0], te_ref(ids).last_hidden_state):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="both", choices=["sd1", "sdxl", "both"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for fam in (["sd1", "sdxl"] if a.family == "both" else [a.family]):
        unet_parity(fam, a.device)
    vae_text_parity(a.device)


if __name__ == "__main__":
    main()
