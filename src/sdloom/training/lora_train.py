"""LoRA adapters for training (Hu et al. 2021), saved in kohya/A1111 naming.

Keys are `lora_unet_<module path>` with the original (SGM) U-Net path, dots as underscores —
the convention kohya uses for SGM names, which `sdloom.models.lora` loads."""
from __future__ import annotations

import torch
from torch import nn

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
           "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
           "proj_in", "proj_out")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) · up(down(x)); `up` starts at zero so training starts at base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank
        self.alpha = alpha
        self.lora_down.to(base.weight.device)
        self.lora_up.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) \
            .to(x.dtype) * self.scale


def inject_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every targeted nn.Linear of the U-Net; returns {module path: adapter}."""
    found: dict[str, LoRALinear] = {}
    for name, mod in list(unet.named_modules()):
        if isinstance(mod, nn.Linear) and name.endswith(TARGETS):
            parent = unet.get_submodule(name.rpartition(".")[0])
            adapter = LoRALinear(mod, rank, alpha)
            setattr(parent, name.rpartition(".")[2], adapter)
            found[name] = adapter
    return found


def lora_state_dict(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, a in adapters.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[key + ".lora_down.weight"] = a.lora_down.weight.detach().float().cpu()
        out[key + ".lora_up.weight"] = a.lora_up.weight.detach().float().cpu()
        out[key + ".alpha"] = torch.tensor(float(a.alpha))
    return out


def remove_lora(unet: nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Put the original layers back (the adapters are kept by the caller)."""
    for name, a in adapters.items():
        parent = unet.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], a.base)
