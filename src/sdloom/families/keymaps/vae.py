"""diffusers `AutoencoderKL` names ⇄ LDM names, from one prefix table plus a leaf table.

diffusers numbers decoder levels from the lowest resolution (up_blocks.0 = LDM up.{n-1}) and
stores the mid-block attention projections as linear [C, C] where LDM has 1×1 convs [C, C, 1, 1].
Works on plain dicts without a prefix; keys that match no row pass through unchanged, so a
strict load afterwards names anything unexpected. `quant_conv` / `post_quant_conv` (and a VQ
model's `quantize.embedding`) have the same names on both sides; SD3/Flux VAEs have neither,
and both directions need nothing for that. Level attentions (vq-f8) map like the mid block's.
"""
from __future__ import annotations

import re

import torch

from ...errors import ModelFileError

# (diffusers, LDM) name of a module inside a block
LEAF = [("conv_shortcut", "nin_shortcut"), ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"),
        ("to_v", "v"), ("to_out.0", "proj_out")]
# attention names of diffusers < 0.14, accepted when reading, never written
LEGACY_LEAF = [("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")]
# single-head attention (the mid block's; vq-f8's levels too): 1×1 convs in LDM
ATTN_1X1 = re.compile(r"(mid\.attn_1|down\.\d+\.attn\.\d+|up\.\d+\.attn\.\d+)"
                      r"\.(q|k|v|proj_out)\.weight$")


def _prefix_pairs(n_down: int, n_up: int) -> list[tuple[str, str]]:
    """(diffusers, LDM) module prefixes for an encoder of n_down and a decoder of n_up levels."""
    pairs = [("encoder.conv_norm_out", "encoder.norm_out"),
             ("decoder.conv_norm_out", "decoder.norm_out")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"),
                  (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2"),
                  (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1")]
    for i in range(n_down):
        pairs += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block"),
                  (f"encoder.down_blocks.{i}.attentions", f"encoder.down.{i}.attn"),
                  (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample")]
    for k in range(n_up):  # diffusers runs up_blocks in order; LDM indexes by resolution
        i = n_up - 1 - k
        pairs += [(f"decoder.up_blocks.{k}.resnets", f"decoder.up.{i}.block"),
                  (f"decoder.up_blocks.{k}.attentions", f"decoder.up.{i}.attn"),
                  (f"decoder.up_blocks.{k}.upsamplers.0", f"decoder.up.{i}.upsample")]
    return pairs


def _levels(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _rename(key: str, pairs: list[tuple[str, str]], leaf: list[tuple[str, str]],
            src: int, dst: int) -> str:
    for row in pairs:
        if key.startswith(row[src] + "."):
            key = row[dst] + key[len(row[src]):]
            break
    head, _, param = key.rpartition(".")
    parts = head.split(".")
    for row in leaf:
        names = row[src].split(".")
        if parts[-len(names):] == names:
            parts = parts[:-len(names)] + row[dst].split(".")
            break
    return ".".join(parts) + "." + param


def vae_diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a diffusers VAE state dict into LDM names."""
    pairs = _prefix_pairs(_levels(sd, r"encoder\.down_blocks\.(\d+)\."),
                          _levels(sd, r"decoder\.up_blocks\.(\d+)\."))
    out = {}
    for k, v in sd.items():
        nk = _rename(k, pairs, LEAF + LEGACY_LEAF, 0, 1)
        if ATTN_1X1.search(nk) and v.ndim == 2:
            v = v[:, :, None, None]
        if nk in out:
            raise ModelFileError(f"two VAE keys map to {nk!r} (current and legacy diffusers "
                                 "names mixed in one file)")
        out[nk] = v
    return out


def vae_ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) an LDM VAE state dict into current diffusers names."""
    pairs = _prefix_pairs(_levels(sd, r"encoder\.down\.(\d+)\."),
                          _levels(sd, r"decoder\.up\.(\d+)\."))
    out = {}
    for k, v in sd.items():
        if ATTN_1X1.search(k) and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[_rename(k, pairs, LEAF, 1, 0)] = v
    return out
