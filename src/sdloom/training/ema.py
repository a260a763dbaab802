"""Exponential moving average of parameters (Polyak averaging), with warm-up."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's trainable parameters; decay ramps up as min(d, (1+n)/(10+n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(module.named_parameters())
        for n in self.names:
            self.shadow[n].lerp_(params[n].detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Put the averages into `module`; returns the replaced weights (for `restore`)."""
        params = dict(module.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        for n in self.names:
            params[n].copy_(self.shadow[n])
        return backup

    @torch.no_grad()
    def restore(self, module: nn.Module, backup: dict[str, torch.Tensor]) -> None:
        params = dict(module.named_parameters())
        for n, v in backup.items():
            params[n].copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict) -> None:
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}
        self.updates = int(sd["updates"])
