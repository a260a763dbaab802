"""Training a VQ autoencoder (models/vq.py) with `sdloom train what=vae` on a model whose first
stage is one (LDSR presets `ldsr`, `ldsr-vq-f8`, or such a file).

Loss (van den Oord et al. 2017, eq. 3): reconstruction (l1 | l2) through the straight-through
estimator + codebook term ‖sg[z] − e‖² + β·commitment ‖z − sg[e]‖², β = vq_beta (0.25, as
LDM). LDM's (taming's) `legacy` quantiser puts β on the codebook term instead; the paper's form
is used here. With vq_ema > 0 the codebook is not trained by its term but set to exponential
moving averages of the encoder outputs assigned to each code (VQ-VAE App. A.1; Razavi et al.
2019), with Laplace-smoothed counts. Usage is reported at every log step: the perplexity
exp(−Σ p·log p) of the code frequencies and the fraction of codes used since the last log.
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
        if dist.is_available() and dist.is_initialized():
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


class VQLoss(nn.Module):
    """Reconstruction + codebook + β·commitment of a VQModel, counting the codes it assigns."""

    def __init__(self, vq: VQModel, rec_loss: str, beta: float, ema_decay: float = 0.0):
        super().__init__()
        self.rec_loss, self.beta = rec_loss, beta
        # with an EMA the codebook is no trained parameter (train.trainable freezes it)
        self.ema = CodebookEMA(vq, ema_decay) if ema_decay > 0 else None
        # code frequencies since the last `usage()` (a plain tensor: DDP must not broadcast it)
        self.hits = torch.zeros(vq.config.n_embed, device=vq.quantize.embedding.weight.device)

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
