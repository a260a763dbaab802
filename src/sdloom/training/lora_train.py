"""LoRA adapters for training (Hu et al. 2021), saved in kohya/A1111 naming.

Denoiser keys are `lora_unet_` + the original module path with dots as underscores. U-Net (LDM/
SGM paths): `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`; kohya writes SGM names
like these for SDXL and diffusers names for SD1/SD2; A1111 and `sdloom.models.lora` accept both
for every family, and writing the one name our modules already have needs no name table. MMDiT
(SD3/SD3.5, original paths, as sd-scripts' `lora_sd3` writes and families/sd3_lora.py reads):
`lora_unet_joint_blocks_0_x_block_attn_qkv` (the whole fused q/k/v weight).
Text encoder keys (CLIP-L, transformers layout) are `lora_te_text_model_encoder_layers_0_…`.
Tensors: `.lora_down.weight` [r, in(, 1, 1)], `.lora_up.weight` [out, r(, 1, 1)], `.alpha`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SdloomError

TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class LoRAModule(nn.Module):
    """base(x) + (alpha / r) · up(down(x)) around an nn.Linear or a 1×1 nn.Conv2d; `up` starts
    at zero so training starts exactly at the base model."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base
        dev = base.weight.device
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=dev)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=dev)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False, device=dev)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.alpha, self.scale = float(alpha), alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


def _wrappable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)
                                          and mod.groups == 1)


def _inject(root: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, prefix: str
            ) -> dict[str, LoRAModule]:
    found: dict[str, LoRAModule] = {}
    for name, mod in list(root.named_modules()):
        if _wrappable(mod) and name.endswith(targets) and ".lora_" not in name:
            parent, _, leaf = name.rpartition(".")
            adapter = LoRAModule(mod, rank, alpha)
            setattr(root.get_submodule(parent), leaf, adapter)
            found[prefix + name] = adapter
    return found


def inject_lora(model, targets: tuple[str, ...], rank: int, alpha: float,
                text_encoder: bool = False) -> dict[str, LoRAModule]:
    """Wrap the denoiser's layers whose module paths end in `targets` (the family's
    lora_train_targets); returns {kohya name: adapter}. Only the adapters are meant to train:
    the caller freezes everything else."""
    net = model.model.diffusion_model
    found = _inject(net, targets, rank, alpha, "")
    out = {"lora_unet_" + n.replace(".", "_"): a for n, a in found.items()}
    if not out:
        raise SdloomError(f"no LoRA targets found in the {type(net).__name__}")
    if text_encoder:
        encoders = getattr(model.config, "text_encoders", ())  # SD3's: clip_l, clip_g, t5
        if len(encoders) != 1 or encoders[0].layout != "hf":
            raise SdloomError("text encoder LoRA training needs a CLIP-L (transformers layout) "
                              "text encoder, as SD1 has")
        te = _inject(model.text_encoders[0], TEXT_TARGETS, rank, alpha, "")
        for n, a in te.items():
            # module path `transformer.text_model.encoder.layers.0.self_attn.q_proj` → kohya's
            # transformers name without the `transformer.` wrapper
            out["lora_te_" + n.removeprefix("transformer.").replace(".", "_")] = a
    return out


def lora_parameters(adapters: dict[str, LoRAModule]) -> list[nn.Parameter]:
    return [p for a in adapters.values() for p in (a.lora_down.weight, a.lora_up.weight)]


def lora_state_dict(adapters: dict[str, LoRAModule], dtype: torch.dtype = torch.float32
                    ) -> dict[str, torch.Tensor]:
    """The kohya tensors of every adapter."""
    out = {}
    for key, a in adapters.items():
        out[key + ".lora_down.weight"] = a.lora_down.weight.detach().to("cpu", dtype)
        out[key + ".lora_up.weight"] = a.lora_up.weight.detach().to("cpu", dtype)
        out[key + ".alpha"] = torch.tensor(a.alpha, dtype=dtype)
    return out


def lora_metadata(base_version: str, rank: int, alpha: float) -> dict[str, str]:
    """kohya's `ss_*` metadata that A1111 and other tools read (`base_version`: the family's
    kohya_base_version)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_base_model_version": base_version,
            "ss_v2": str(base_version == "sd_v2"), "sdloom_key_layout": "sgm"}
