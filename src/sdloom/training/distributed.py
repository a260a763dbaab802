"""torch.distributed under `torchrun`: process group, rank-0 writes, DDP wrapping, checks."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the job; a single process is rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (one collective for a whole window of scalars)."""
        if not self.enabled:
            return values
        t = values.detach().to(_collective_device(), torch.float64).clone()
        dist.all_reduce(t)
        return (t / self.world).to(values.device)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> tuple[Dist, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU.
    Without it (or with WORLD_SIZE=1) this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world <= 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local), torch.device("cuda", local) if cuda else torch.device("cpu")


def wrap_ddp(module: nn.Module, d: Dist, device: torch.device, find_unused: bool = False
             ) -> nn.Module:
    """DDP over `module` when distributed (gradients of its trainable parameters all-reduced);
    the module itself otherwise."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=find_unused)


def checksum(module: nn.Module) -> str:
    """sha256 of a module's trainable parameters (fp32 bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def shutdown(d: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
