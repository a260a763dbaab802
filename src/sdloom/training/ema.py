"""Exponential moving average of parameters (Polyak averaging), optionally with warm-up."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SdloomError


class EMA:
    """fp32 shadow copies of a module's trainable parameters.

    With warm-up the decay is min(decay, (1 + n) / (10 + n)) after n updates (as LDM's LitEma),
    so early averages are not dominated by the random initialisation."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        params = dict(module.named_parameters())
        shadow = [self.shadow[n] for n in self.names]
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(shadow, current, 1.0 - d)  # one fused kernel per dtype group

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
        """Tensors and plain numbers only, so `torch.load(weights_only=True)` reads it."""
        return {"shadow": dict(self.shadow), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.names) - set(sd["shadow"])
        if missing:
            raise SdloomError(f"EMA state lacks {len(missing)} parameters, e.g. {min(missing)}")
        for n in self.names:
            self.shadow[n].copy_(sd["shadow"][n])
        self.updates = int(sd["updates"])
