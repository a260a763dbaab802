"""Memory modes for small GPUs: the weights live in CPU memory and visit the GPU while they run.

`mode="model"` (A1111's --medvram, diffusers' enable_model_cpu_offload): one component at a time
(text encoder, denoiser, VAE) is on the GPU; entering another moves the previous one out.
`mode="blocks"` (A1111's --lowvram, diffusers' sequential offload): only the block that runs is
on the GPU — each U-Net input/output block, each VAE stage, each text encoder — so the peak is
one block's weights plus the activations, at the cost of copying every weight every call.

Weights are never copied back: each parameter and buffer keeps its CPU tensor (pinned, so the
copy to the GPU is asynchronous) and points at a GPU copy only while it is resident; leaving is
pointing back. Anything that changes weights (LoRA merging) must run with everything out
(`evict()`), which the engine does before merging. Arguments that arrive on the CPU (token ids)
are moved to the GPU by the hook of the block they enter.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "model", "blocks")


def _tensors(module: nn.Module, recurse: bool = True):
    """(owner, name, tensor) of every parameter and buffer."""
    for mod_name, mod in (module.named_modules() if recurse else [("", module)]):
        for name, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is not None:
                yield mod, name, p


def _has_tensors(module: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in _tensors(module, recurse))


def _to(v, device: torch.device):
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v


class _Unit:
    """Modules moved in and out together; `recurse=False` for a module's own tensors only."""

    def __init__(self, modules: list[tuple[nn.Module, bool]], device: torch.device):
        self.device = device
        self.home = []  # (owner, name, cpu tensor)
        for m, recurse in modules:
            for owner, name, t in _tensors(m, recurse):
                cpu = t.data.to("cpu")
                if device.type == "cuda":
                    cpu = cpu.pin_memory()
                self._point(owner, name, cpu)
                self.home.append((owner, name, cpu))
        self.resident = False

    @staticmethod
    def _point(owner: nn.Module, name: str, data: torch.Tensor) -> None:
        t = owner._parameters.get(name)
        if t is None:
            t = owner._buffers[name]
        t.data = data

    def enter(self) -> None:
        if not self.resident:
            for owner, name, cpu in self.home:
                self._point(owner, name, cpu.to(self.device, non_blocking=True))
            self.resident = True

    def leave(self) -> None:
        if self.resident:
            for owner, name, cpu in self.home:
                self._point(owner, name, cpu)
            self.resident = False


class Offload:
    """Attach a memory mode to `model` (whose weights may be anywhere: they move to the CPU)."""

    def __init__(self, model: nn.Module, device: torch.device, mode: str,
                 block_params: int = 0):
        if mode not in MODES[1:]:
            raise ValueError(mode)
        self.device = device
        self.units: list[_Unit] = []
        total = sum(p.numel() for p in model.parameters())
        # blocks: the largest subtrees of at most 1/16 of the model (an SD U-Net's stages)
        self.block_params = block_params or max(1, total // 16)
        for child in model.children():
            if mode == "model":
                self._component(child)
            else:
                self._blocks(child)
        if _has_tensors(model, False):  # tensors held by the top module itself stay resident
            _Unit([(model, False)], device).enter()

    def _component(self, comp: nn.Module) -> None:
        if not _has_tensors(comp):
            return
        unit = _Unit([(comp, True)], self.device)
        self.units.append(unit)
        # the component's entry points: itself and its direct children (a VAE is entered
        # through encoder/decoder/quant convs, not its own forward)
        for m in [comp, *comp.children()]:
            m.register_forward_pre_hook(self._enter_only(unit), with_kwargs=True)

    def _enter_only(self, unit: _Unit):
        def hook(_m, args, kwargs):
            if not unit.resident:
                for other in self.units:
                    if other is not unit:
                        other.leave()
                unit.enter()
            return _to(args, self.device), _to(kwargs, self.device)
        return hook

    def _blocks(self, m: nn.Module) -> None:
        n = sum(p.numel() for p in m.parameters())
        direct = _has_tensors(m, False)
        kids = list(m.children())
        if n == 0 and not direct:
            return
        if n <= self.block_params or not kids:
            unit = _Unit([(m, True)], self.device)
            self.units.append(unit)
            m.register_forward_pre_hook(self._visit_in(unit), with_kwargs=True)
            m.register_forward_hook(lambda *_: unit.leave())
            return
        if direct:  # e.g. a text encoder's positional embedding beside its big layers
            _Unit([(m, False)], self.device).enter()
        for k in kids:
            self._blocks(k)

    def _visit_in(self, unit: _Unit):
        def hook(_m, args, kwargs):
            unit.enter()
            return _to(args, self.device), _to(kwargs, self.device)
        return hook

    def evict(self) -> None:
        """Everything back to CPU memory (before weights are changed)."""
        for u in self.units:
            u.leave()
