"""transformers CLIPTextModel names ⇄ open_clip text-tower names (fused q/k/v).

CLIP-L in SD1/SDXL checkpoints already uses transformers names (our `CLIPTextModel` is that
layout), so only OpenCLIP needs this. Plain dicts, no prefix: the caller adds `…model.`.
"""
from __future__ import annotations

import re

import torch

from ...errors import ModelFileError

# (transformers, open_clip) names inside one layer, then at the top level
LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
TOP = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
       ("text_model.final_layer_norm.weight", "ln_final.weight"),
       ("text_model.final_layer_norm.bias", "ln_final.bias")]
HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")
OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


def clip_hf_to_openclip(sd: dict[str, torch.Tensor], layers: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """transformers names → open_clip names; q/k/v fused into in_proj (`layers` is a check)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    top = dict(TOP)
    for k, v in normalize_hf_clip(sd).items():
        if k in top:
            out[top[k]] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif m := HF_LAYER.match(k):
            i, rest = int(m.group(1)), m.group(2)
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                qkv.setdefault(i, {})[rest[len("self_attn."):]] = v
                continue
            for hf, oc in LAYER:
                if rest.startswith(hf + "."):
                    out[f"transformer.resblocks.{i}.{oc}{rest[len(hf):]}"] = v
                    break
            else:
                raise ModelFileError(f"unexpected CLIP text encoder key {k!r}: not a transformers "
                                     "CLIPTextModel")
        else:
            raise ModelFileError(f"unexpected CLIP text encoder key {k!r}: not a transformers "
                                     "CLIPTextModel")
    for i, d in sorted(qkv.items()):
        for kind in ("weight", "bias"):
            names = [f"{p}_proj.{kind}" for p in "qkv"]  # nn.MultiheadAttention's order
            if missing := [n for n in names if n not in d]:
                raise ModelFileError(f"CLIP text encoder layer {i} lacks "
                                     f"self_attn.{', self_attn.'.join(missing)}")
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([d[n] for n in names])
    if layers is not None and len(qkv) != layers:
        raise ModelFileError(f"CLIP text encoder: config says {layers} layers, the weights "
                             f"have {len(qkv)}")
    return out


def clip_openclip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip names → transformers names; in_proj split into q/k/v."""
    out: dict[str, torch.Tensor] = {}
    top = {oc: hf for hf, oc in TOP}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k in ("logit_scale", "attn_mask"):
            continue
        elif m := OC_LAYER.match(k):
            i, rest = int(m.group(1)), m.group(2)
            base = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                for p, t in zip("qkv", v.chunk(3)):
                    out[f"{base}self_attn.{p}_proj.{kind}"] = t.contiguous()
                continue
            for hf, oc in LAYER:
                if rest.startswith(oc + "."):
                    out[base + hf + rest[len(oc):]] = v
                    break
            else:
                raise ModelFileError(f"unexpected open_clip text encoder key {k!r}")
        else:
            raise ModelFileError(f"unexpected open_clip text encoder key {k!r}")
    return out


def normalize_hf_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ≥ 5 saves CLIPTextModel without the `text_model.` prefix; add it back and
    drop the `position_ids` buffers that older files carry."""
    bare = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(bare) else k): v for k, v in sd.items()
            if not k.endswith("position_ids")}
