"""The GPU fast path: the denoiser's network replayed from CUDA graphs, optionally compiled.

Eager SD1.5 at batch 1 + CFG is launch-bound on a large GPU: the U-Net's ~1,400 kernels take
longer to launch from Python than to run (docs/benchmarks.md; shared/reference/performance.md:
a plain CUDA-graph capture of the eager U-Net replayed 2.4× faster with identical output).
`GraphedModel` wraps the denoiser's network `model(x, t, **cond)`: on the first call with a
new input signature (shapes, dtypes, non-tensor arguments) it runs the model once eagerly on a
side stream, captures one call into a CUDA graph with static input buffers, and from then on
copies the inputs into those buffers and replays. It is used only where replaying is the same
function as calling:

- on CUDA, without autograd (inference), for the plain network (ControlNet and IP-Adapter
  wrappers read per-step Python state and are not captured; see generate.py);
- weights change only in place (LoRA merging adds to the parameters, `LoraManager`), so a
  graph keeps reading the current weights; where weights move between calls (offload.py) the
  engine turns graphs off;
- a model whose capture fails (an op that syncs with the host) falls back to eager for good,
  with one line on stderr.

`compile=True` puts `torch.compile` (inductor, dynamic=False) under the same graphs: inductor's
kernels are fused, the graphs remove their launch cost (what mode="reduce-overhead" does, here
without its recompilation on every new shape being hidden). Inductor caches its kernels on disk
($TORCHINDUCTOR_CACHE_DIR), so a second process compiles much faster. On the CPU the engine asks
for inductor's C++ wrapper (`cpp_wrapper`): the compiled U-Net's launches of its kernels then
run from C++ instead of Python — at the embedded model's tiny ops that per-call cost is most of
what is left (docs/benchmarks.md, 2026-11-30).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn


def _signature(args: tuple, kwargs: dict):
    """A hashable key of the call: tensors by (shape, dtype, device), other values as they are;
    None when a value cannot be part of a key (then the call runs eagerly)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device, v.requires_grad)
        if v is None or isinstance(v, (bool, int, float, str)):
            return ("V", v)
        if isinstance(v, (tuple, list)):
            return ("L", tuple(one(x) for x in v))
        raise TypeError
    try:
        return tuple(one(a) for a in args), tuple((k, one(v)) for k, v in kwargs.items())
    except TypeError:
        return None


class _Graph:
    """One captured call: its static inputs (every tensor argument) and output."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, pool, warmup: int):
        self.tensors: list[torch.Tensor] = []

        def static(v):
            if isinstance(v, torch.Tensor):
                s = v.clone()
                self.tensors.append(s)
                return s
            if isinstance(v, (tuple, list)):
                return type(v)(static(x) for x in v)
            return v
        self.args = tuple(static(a) for a in args)
        self.kwargs = {k: static(v) for k, v in kwargs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuDNN/cuBLAS handles, compilation) off-graph
            for _ in range(warmup):
                self.first = fn(*self.args, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = fn(*self.args, **self.kwargs)

    def feed(self, args: tuple, kwargs: dict) -> None:
        new: list[torch.Tensor] = []

        def collect(v):
            if isinstance(v, torch.Tensor):
                new.append(v)
            elif isinstance(v, (tuple, list)):
                for x in v:
                    collect(x)
        for v in (*args, *kwargs.values()):  # the order `static` met them in
            collect(v)
        for s, v in zip(self.tensors, new):
            s.copy_(v, non_blocking=True)


class GraphedModel(nn.Module):
    """`model(x, t, **cond)` replayed from one CUDA graph per input signature (module doc)."""

    def __init__(self, model: Callable[..., torch.Tensor], *, graphs: bool = True,
                 compile: bool = False, compile_options: dict | None = None,
                 max_graphs: int = 8):
        super().__init__()
        self.model = model
        self.use_graphs = graphs
        self.fn = (torch.compile(model, dynamic=False, options=compile_options) if compile
                   else model)
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.failed = False
        self.pool = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        x = args[0] if args else None
        if (not self.use_graphs or self.failed or torch.is_grad_enabled()
                or not isinstance(x, torch.Tensor) or x.device.type != "cuda"):
            return self.fn(*args, **kwargs)
        kwargs = dict(sorted(kwargs.items()))  # one order for the key and the buffers
        key = _signature(args, kwargs)
        if key is None:
            return self.fn(*args, **kwargs)
        g = self.graphs.get(key)
        if g is None:
            return self._capture(key, args, kwargs)
        self.graphs.move_to_end(key)
        g.feed(args, kwargs)
        g.graph.replay()
        return g.out.clone()

    def _capture(self, key, args: tuple, kwargs: dict) -> torch.Tensor:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            g = _Graph(self.fn, args, kwargs, self.pool, warmup=2 if self.fn is not self.model
                       else 1)
        except Exception as e:  # an op that cannot be captured: eager from now on
            self.failed = True
            self.graphs.clear()
            self.pool = None
            print(f"sdloom: CUDA graphs off for this model ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running eagerly",
                  file=sys.stderr)
            return self.fn(*args, **kwargs)
        self.graphs[key] = g
        return g.first.clone()


def eager(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The network under a GraphedModel (for wrappers that set per-call state around it)."""
    return model.model if isinstance(model, GraphedModel) else model
