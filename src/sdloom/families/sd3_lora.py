"""Where LoRA modules land in SD3/SD3.5: the module names of the common SD3 LoRA files → our
weights (original MMDiT names, fused q/k/v, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`).

- kohya (sd-scripts `lora_sd3`): `lora_unet_` + our MMDiT module path with `_` for `.`
  (`lora_unet_joint_blocks_0_x_block_attn_qkv`: the whole fused weight), `lora_te1_` /
  `lora_te2_` / `lora_te3_` + the transformers path of CLIP-L / CLIP-G / T5.
- diffusers/PEFT (diffusers' SD3 LoRA trainer, most civitai files): `transformer.` + the
  diffusers path (`transformer.transformer_blocks.0.attn.to_q`), `text_encoder.` /
  `text_encoder_2.` / `text_encoder_3.` + the transformers path. ComfyUI also reads the
  diffusers paths under `base_model.model.` and, with `_` for `.`, under `lora_transformer_`
  (OneTrainer); so do we.
Diffusers' to_q / to_k / to_v (and add_*, attn2.*) are row thirds of our fused qkv; its
`norm_out.linear` and the last block's `norm1_context.linear` hold (scale, shift) where ours hold
(shift, scale), so their deltas land with the halves swapped (Target.swap_halves).
"""
from __future__ import annotations

import torch

from ..errors import SdloomError
from ..models.lora import Target
# the key map's full-key tables, so a LoRA's diffusers names land exactly where the weights do
from .keymaps.mmdit import _tables

DIT = "model.diffusion_model."
TEXT = "text_encoders."
# (encoder in SD3TextEncoders, kohya tag, diffusers/PEFT prefix)
_ENCODERS = (("clip_l", "lora_te1_", "text_encoder."), ("clip_g", "lora_te2_", "text_encoder_2."),
             ("t5xxl", "lora_te3_", "text_encoder_3."))


def _put(out: dict[str, Target], name: str, t: Target) -> None:
    if out.setdefault(name, t) != t:  # two weights under one spelling: a table bug, not a file's
        raise SdloomError(f"SD3 LoRA name {name!r} maps to {out[name]} and {t}")


def lora_targets(model: torch.nn.Module) -> dict[str, Target]:
    """LoRA module name (every spelling above) → target weight, for each linear/conv layer."""
    out: dict[str, Target] = {}
    mmdit = model.model.diffusion_model
    layers = {n for n, m in mmdit.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                     torch.nn.Conv2d))}
    for name in sorted(layers):
        _put(out, "lora_unet_" + name.replace(".", "_"), Target(DIT + name + ".weight"))

    def diffusers_name(d: str, t: Target) -> None:
        for n in ("transformer." + d, "base_model.model." + d,
                  "lora_transformer_" + d.replace(".", "_")):
            _put(out, n, t)

    plain, fused = _tables(mmdit.config.depth)
    for d, (o, swap) in plain.items():
        if d.endswith(".weight") and o[:-len(".weight")] in layers:
            diffusers_name(d[:-len(".weight")], Target(DIT + o, swap_halves=swap))
    for parts, o in fused:
        if o.endswith(".weight") and o[:-len(".weight")] in layers:
            rows = mmdit.get_submodule(o[:-len(".weight")]).out_features // 3
            for i, d in enumerate(parts):
                diffusers_name(d[:-len(".weight")],
                               Target(DIT + o, slice(i * rows, (i + 1) * rows)))

    for enc, kohya, peft in _ENCODERS:
        te = getattr(model.text_encoders, enc)
        if te is None:  # a model without T5
            continue
        for name, mod in te.transformer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                t = Target(f"{TEXT}{enc}.transformer.{name}.weight")
                _put(out, kohya + name.replace(".", "_"), t)
                _put(out, peft + name, t)
    return out


# The MMDiT's token-wise linears in every joint block, both streams (x_block, context_block):
# attention q/k/v and output projection, SD3.5-medium's second image self-attention (attn2) and
# the MLP. This is sd-scripts' lora_sd3 default (every Linear in each SingleDiTBlock) less
# adaLN_modulation: that layer sees only the timestep + pooled-text vector, not the tokens, and
# is the widest linear of a block (c → 6c or 9c: in a plain block +44% adapter parameters at
# equal rank);
# diffusers' SD3 LoRA trainer leaves it out too. Like both, the embedders and the final layer
# stay frozen. The last block's context stream is pre-only: it has attn.qkv and nothing else.
MMDIT_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")


def mmdit_model_version(cfg) -> str:
    """sd-scripts' `ss_base_model_version` for an MMDiT (its `model_type`, the suffix of
    `stable-diffusion-3-…`): "medium" without qk-norm (SD3), "5-medium" with qk-norm and
    dual-attention blocks, "5-large" with qk-norm only."""
    if not cfg.qk_norm:
        return "medium"
    return "5-medium" if cfg.dual_attention_layers else "5-large"
