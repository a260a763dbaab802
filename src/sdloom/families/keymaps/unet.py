"""diffusers `UNet2DConditionModel` names ⇄ original LDM/SGM `UNetModel` names, from one table.

The table is a list of (diffusers prefix, original prefix) pairs derived from the config; resnet
internals get a second, fixed table. Transformer internals share names in both layouts.
"""
from __future__ import annotations

import torch

from ...config import UNetConfig
from ...errors import ModelFileError

RESNET = [  # diffusers ResnetBlock2D → LDM ResBlock
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
]

FIXED = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
]


def unet_prefix_table(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is_resnet) for every block of this U-Net."""
    table = [(d, o, False) for d, o in FIXED]
    n = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    for lv in range(levels):
        for j in range(n):
            ob = 1 + lv * (n + 1) + j
            table.append((f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{ob}.0", True))
            if cfg.transformer_depth[lv]:
                table.append((f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{ob}.1", False))
        if lv != levels - 1:
            table.append((f"down_blocks.{lv}.downsamplers.0.conv",
                          f"input_blocks.{(lv + 1) * (n + 1)}.0.op", False))
    table.append(("mid_block.resnets.0", "middle_block.0", True))
    if cfg.transformer_depth_middle:
        table.append(("mid_block.attentions.0", "middle_block.1", False))
        table.append(("mid_block.resnets.1", "middle_block.2", True))
    else:
        table.append(("mid_block.resnets.1", "middle_block.1", True))
    for up in range(levels):  # diffusers up block `up` is resolution level levels-1-up
        lv = levels - 1 - up
        has_attn = bool(cfg.transformer_depth[lv])
        for j in range(n + 1):
            ob = up * (n + 1) + j
            table.append((f"up_blocks.{up}.resnets.{j}", f"output_blocks.{ob}.0", True))
            if has_attn:
                table.append((f"up_blocks.{up}.attentions.{j}", f"output_blocks.{ob}.1", False))
        if lv:
            ob = up * (n + 1) + n
            table.append((f"up_blocks.{up}.upsamplers.0.conv",
                          f"output_blocks.{ob}.{2 if has_attn else 1}.conv", False))
    return table


def _convert(sd: dict[str, torch.Tensor], table, src: int, dst: int) -> dict[str, torch.Tensor]:
    # longest prefix first so that "conv_in" never shadows a longer name
    pairs = sorted(table, key=lambda r: -len(r[src]))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for row in pairs:
            p = row[src] + "."
            if key.startswith(p):
                rest = key[len(p):]
                if row[2]:
                    for names in RESNET:
                        q = names[src] + "."
                        if rest.startswith(q):
                            rest = names[dst] + "." + rest[len(q):]
                            break
                    else:
                        raise ModelFileError(f"unexpected U-Net resnet parameter {key!r}")
                out[row[dst] + "." + rest] = value
                break
        else:
            raise ModelFileError(f"unexpected U-Net key {key!r}: it fits no block of "
                                 "this config (a different model, or a damaged file?)")
    return out


def unet_diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers U-Net state dict into LDM names (no prefix)."""
    return _convert(sd, unet_prefix_table(cfg), 0, 1)


def unet_ldm_to_diffusers(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an LDM U-Net state dict (no prefix) into diffusers names."""
    return _convert(sd, unet_prefix_table(cfg), 1, 0)


def unet_config_from_diffusers(dc: dict) -> UNetConfig:
    """Our UNetConfig from a diffusers `unet/config.json` dict."""
    blocks = dc["down_block_types"]
    boc = list(dc["block_out_channels"])
    mc = boc[0]
    tl = dc.get("transformer_layers_per_block", 1)
    tl = [tl] * len(blocks) if isinstance(tl, int) else list(tl)
    depth = tuple(tl[i] if "CrossAttn" in b else 0 for i, b in enumerate(blocks))
    mid_type = dc.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    lpb = dc.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        lpb = lpb[0]
    # diffusers' `attention_head_dim` is, for historical reasons, the number of heads per level
    heads = dc.get("num_attention_heads") or dc.get("attention_head_dim", 8)
    kw: dict = {}
    if isinstance(heads, int):
        kw["num_heads"] = heads
    else:
        widths = {c // h for c, h in zip(boc, heads)}
        if len(widths) != 1:
            raise ModelFileError(f"unet/config.json: attention_head_dim {heads} gives "
                                 f"different head widths for block_out_channels {boc}; "
                                 "sdloom supports one head width (SD2/SDXL) or one head "
                                 "count (SD1)")
        kw["num_head_channels"] = widths.pop()
    adm = dc.get("projection_class_embeddings_input_dim") if dc.get("addition_embed_type") else None
    return UNetConfig(
        in_channels=dc["in_channels"], out_channels=dc["out_channels"], model_channels=mc,
        channel_mult=tuple(c // mc for c in boc), num_res_blocks=lpb, transformer_depth=depth,
        transformer_depth_middle=(tl[-1] if mid_type and "CrossAttn" in mid_type else 0),
        context_dim=dc["cross_attention_dim"],
        use_linear_in_transformer=bool(dc.get("use_linear_projection", False)),
        adm_in_channels=adm, num_groups=dc.get("norm_num_groups", 32), **kw)
