"""Where LoRA modules land in the U-Net families: kohya/A1111 module names (`lora_unet_…` in
diffusers or SGM spelling, `lora_te[N]_…` in transformers CLIP names) → our weights."""
from __future__ import annotations

import torch

from ..models.lora import Target
from .keymaps.unet import RESNET, unet_prefix_table

# the U-Net layers `sdloom train` puts LoRA adapters on (kohya's defaults for SD1/SD2)
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                "proj_in", "proj_out")

# OpenCLIP keeps q, k, v in one in_proj matrix: (hf name, openclip name, row slice index)
_OPENCLIP = [("self_attn.q_proj", "attn.in_proj", 0), ("self_attn.k_proj", "attn.in_proj", 1),
             ("self_attn.v_proj", "attn.in_proj", 2), ("self_attn.out_proj", "attn.out_proj", None),
             ("mlp.fc1", "mlp.c_fc", None), ("mlp.fc2", "mlp.c_proj", None)]


def lora_targets(model: torch.nn.Module) -> dict[str, Target]:
    """kohya module name → target weight, for every linear/conv layer a LoRA can touch."""
    out: dict[str, Target] = {}
    unet_prefix = "model.diffusion_model."
    table = unet_prefix_table(model.config.unet)
    for name, mod in model.unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        t = Target(unet_prefix + name + ".weight")
        out["lora_unet_" + name.replace(".", "_")] = t
        for dif, orig, is_res in table:  # the diffusers spelling used by SD1/SD2 kohya files
            if name == orig:
                out["lora_unet_" + dif.replace(".", "_")] = t
                break
            if name.startswith(orig + "."):
                rest = name[len(orig) + 1:]
                if is_res:
                    rest = next((d + rest[len(o):] for d, o in RESNET if rest.startswith(o)), None)
                if rest is not None:
                    out["lora_unet_" + (dif + "." + rest).replace(".", "_")] = t
                break
    n = len(model.config.text_encoders)
    for i, (prefix, te, cfg) in enumerate(zip(model.text_encoder_prefixes(), model.text_encoders,
                                              model.config.text_encoders)):
        tags = ["lora_te_"] if n == 1 else [f"lora_te{i + 1}_"]
        if cfg.layout == "hf":
            for name, mod in te.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("transformer.text_model."):
                    hf = name[len("transformer."):].replace(".", "_")
                    for tag in tags:
                        out[tag + hf] = Target(prefix + name + ".weight")
        else:
            width = cfg.width
            for layer in range(cfg.layers):
                for hf_name, oc_name, idx in _OPENCLIP:
                    hf = f"text_model_encoder_layers_{layer}_" + hf_name.replace(".", "_")
                    param = f"{prefix}model.transformer.resblocks.{layer}.{oc_name}" + (
                        "_weight" if idx is not None else ".weight")
                    rows = slice(idx * width, (idx + 1) * width) if idx is not None else None
                    for tag in tags:
                        out[tag + hf] = Target(param, rows)
    return out
