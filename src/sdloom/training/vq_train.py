"""Training a VQ autoencoder (models/vq.py) with `sdloom train what=vae` on a model whose first
stage is one (LDSR presets `ldsr`, `ldsr-vq-f8`, or such a file).

Loss (van den Oord et al. 2017, eq. 3): reconstruction (l1 | l2) through the straight-through
estimator + codebook term ‖sg[z] − e‖² + β·commitment ‖z − sg[e]‖², β = vq_beta (0.25, as
LDM). LDM's (taming's) `legacy` quantiser puts β on the codebook term instead; the paper's form
is used here. With vq_ema > 0 the codebook is not trained by its term but set to exponential
moving averages of the encoder outputs assigned to each code (VQ-VAE App. A.1; Razavi et al.
2019), with Laplace-smoothed counts. Usage is reported at every log step: the perplexity
exp(−Σ p·log p) of the code frequencies and the fraction of codes used since the last log.
With vq_restart > 0, codes whose running usage (an EMA of their batch counts, decay 0.99)
falls below that fraction of a uniform share are moved to randomly chosen encoder outputs of
the batch (dead-code restarts, as Dhariwal et al. 2020 "Jukebox" and Zeghidour et al. 2021
"SoundStream" do); LDM has none. Rank 0's choice is broadcast, so ranks stay identical.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..models.vq import VQModel


class CodebookEMA:
    """The codebook as EMAs of per-code counts and sums of assigned encoder outputs."""

    def __init__(self, vq: VQModel, decay: float, eps: float = 1e-5):
        w = vq.quantize.embedding.weight
        self.decay, self.eps = decay, eps
        self.counts = torch.zeros(w.shape[0], device=w.device)
        self.sums = w.detach().float().clone()

    @torch.no_grad()
    def update(self, vq: VQModel, z: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step from latents z [B, C, H, W] and their codes idx [B, H, W]; the
        statistics are summed over processes first, so every rank's codebook stays the same."""
        n, d = self.sums.shape
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        counts = torch.bincount(idx.flatten(), minlength=n).float()
        sums = torch.zeros_like(self.sums).index_add_(0, idx.flatten(), flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.counts.sum()
        smoothed = (self.counts + self.eps) / (total + n * self.eps) * total
        w = vq.quantize.embedding.weight
        w.copy_((self.sums / smoothed[:, None]).to(w.dtype))

    def state_dict(self, vq: VQModel) -> dict:
        """The statistics and the codebook (not a trained parameter, so not in the optimizer's
        state): what an exact resume needs."""
        return {"counts": self.counts.cpu(), "sums": self.sums.cpu(),
                "weight": vq.quantize.embedding.weight.detach().cpu()}

    def load_state_dict(self, vq: VQModel, st: dict) -> None:
        dev = self.counts.device
        self.counts, self.sums = st["counts"].to(dev), st["sums"].to(dev)
        with torch.no_grad():
            vq.quantize.embedding.weight.copy_(st["weight"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VQLoss(nn.Module):
    """Reconstruction + codebook + β·commitment of a VQModel, counting the codes it assigns."""
    USAGE_DECAY = 0.99

    def __init__(self, vq: VQModel, rec_loss: str, beta: float, ema_decay: float = 0.0,
                 restart: float = 0.0):
        super().__init__()
        self.rec_loss, self.beta, self.restart = rec_loss, beta, restart
        # with an EMA the codebook is no trained parameter (train.trainable freezes it)
        self.ema = CodebookEMA(vq, ema_decay) if ema_decay > 0 else None
        dev = vq.quantize.embedding.weight.device
        # code frequencies since the last `usage()` (a plain tensor: DDP must not broadcast it)
        self.hits = torch.zeros(vq.config.n_embed, device=dev)
        self.running = None  # EMA of per-batch code counts (restarts)

    @torch.no_grad()
    def _restart_dead(self, vq: VQModel, z: torch.Tensor, idx: torch.Tensor) -> None:
        """Move codes used less than `restart` × a uniform share to random batch latents."""
        n, d = vq.quantize.embedding.weight.shape
        counts = torch.bincount(idx.flatten(), minlength=n).float()
        if _distributed():
            dist.all_reduce(counts)
        share = float(counts.sum()) / n
        if self.running is None:  # the first batch: unused codes restart at once
            self.running = counts.clone()
        self.running.mul_(self.USAGE_DECAY).add_(counts, alpha=1 - self.USAGE_DECAY)
        dead = self.running < self.restart * share
        k = int(dead.sum())
        if not k:
            return
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        new = flat[torch.randint(0, len(flat), (k,), device=flat.device)]
        if _distributed():
            dist.broadcast(new, 0)
        w = vq.quantize.embedding.weight
        w[dead] = new.to(w.dtype)
        self.running[dead] = share
        if self.ema is not None:  # the moved codes start their averages afresh
            self.ema.counts[dead] = 1.0
            self.ema.sums[dead] = new

    def state_dict_of(self, vq: VQModel) -> dict:
        """What an exact resume needs beyond the optimizer: the EMA codebook's statistics and
        the codebook itself (no trained parameter then), the running usage of restarts."""
        st = {} if self.ema is None else self.ema.state_dict(vq)
        if self.running is not None:
            st["running"] = self.running.cpu()
        return st

    def load_state_dict_of(self, vq: VQModel, st: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(vq, st)
        if "running" in st:
            self.running = st["running"].to(self.hits.device)

    def forward(self, vq: VQModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reconstruction) of images x in [-1, 1]."""
        z = vq.encode(x).float()
        idx = vq.quantize.indices(z)
        e = vq.quantize.lookup(idx).float()
        loss = self.beta * (z - e.detach()).pow(2).mean()
        if self.ema is None:
            loss = loss + (e - z.detach()).pow(2).mean()
        elif self.training:
            self.ema.update(vq, z, idx)
        if self.restart > 0 and self.training:
            self._restart_dead(vq, z, idx)  # after this batch's loss used the old codes
        zq = z + (e - z).detach()  # straight-through: the decoder's gradient reaches z
        rec = vq.decoder(vq.post_quant_conv(zq.to(x.dtype))).float()
        err = (rec - x).abs() if self.rec_loss == "l1" else (rec - x).pow(2)
        self.hits += torch.bincount(idx.flatten(), minlength=len(self.hits)).to(self.hits)
        return err.mean() + loss, rec

    def usage(self, total: torch.Tensor | None = None) -> dict[str, float]:
        """Perplexity of the code frequencies and the fraction of codes used since the last
        call (`total`: the frequencies summed over processes, if distributed); then reset."""
        hits = self.hits if total is None else total
        n = float(hits.sum())
        self.hits = torch.zeros_like(self.hits)
        if n == 0:
            return {}
        p = hits[hits > 0] / n
        return {"vq_perplexity": math.exp(float(-(p * p.log()).sum())),
                "vq_codes_used": float((hits > 0).float().mean())}
