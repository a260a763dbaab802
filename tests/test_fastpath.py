"""The GPU fast path (pipelines/fastpath.py): CUDA-graph replay of the denoiser's network.

The CUDA tests run where a GPU is (the device session runs this file there); on a CPU the
wrapper must be an exact pass-through, which the CPU tests check."""
import pytest
import torch

from sdloom.pipelines.engine import Engine
from sdloom.pipelines.fastpath import GraphedModel, _signature, eager
from tiny import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_model().to(device, dtype).eval()
    from sdloom.families import family_of
    return model, family_of(model.config).denoiser_model(model)


def _inputs(model, n=2, side=8, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.config.unet.in_channels, side, side, generator=g)
    ctx = torch.randn(n, 77, model.config.unet.context_dim, generator=g)
    t = torch.tensor([999.0, 10.5][:n] * (n // 2 or 1))[:n]
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype)


def test_signature_tells_calls_apart():
    a = torch.zeros(2, 4)
    assert _signature((a,), {}) == _signature((torch.ones(2, 4),), {})
    assert _signature((a,), {}) != _signature((torch.zeros(3, 4),), {})
    assert _signature((a,), {}) != _signature((a.half(),), {})
    assert _signature((a,), {"y": None}) != _signature((a,), {"y": a})
    assert _signature((a,), {"k": object()}) is None  # unhashable: the call runs eagerly


def test_cpu_is_a_pass_through():
    model, net = _net()
    g = GraphedModel(net)
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        assert torch.equal(g(x, t, context=ctx), net(x, t, context=ctx))
    assert not g.graphs and not g.failed
    assert eager(g) is net and eager(net) is net


def test_engine_wraps_only_when_asked():
    model, _ = _net()
    assert isinstance(Engine(model).denoiser.model, GraphedModel)
    assert not isinstance(Engine(model, cuda_graphs=False).denoiser.model, GraphedModel)


@cuda
def test_replay_equals_eager_and_follows_inputs():
    model, net = _net("cuda", torch.float16)
    g = GraphedModel(net)
    with torch.no_grad():
        for seed in range(3):  # capture, then replays with new values in the same buffers
            x, t, ctx = _inputs(model, device="cuda", dtype=torch.float16, seed=seed)
            assert torch.equal(g(x, t, context=ctx), net(x, t, context=ctx))
        assert len(g.graphs) == 1 and not g.failed
        x, t, ctx = _inputs(model, n=4, side=16, device="cuda", dtype=torch.float16)
        assert torch.equal(g(x, t, context=ctx), net(x, t, context=ctx))  # a second shape
        assert len(g.graphs) == 2


@cuda
def test_in_place_weight_changes_reach_the_graph():
    """LoRA merges add to the parameters in place: a captured graph must see the new weights."""
    model, net = _net("cuda", torch.float16)
    g = GraphedModel(net)
    x, t, ctx = _inputs(model, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        before = g(x, t, context=ctx)
        g(x, t, context=ctx)
        p = dict(model.named_parameters())["model.diffusion_model.out.2.weight"]
        p.add_(0.05)
        after = g(x, t, context=ctx)
        assert not torch.equal(before, after)
        assert torch.equal(after, net(x, t, context=ctx))


@cuda
def test_evicts_least_recent_graph():
    model, net = _net("cuda", torch.float16)
    g = GraphedModel(net, max_graphs=2)
    with torch.no_grad():
        for side in (8, 16, 24):
            x, t, ctx = _inputs(model, side=side, device="cuda", dtype=torch.float16)
            g(x, t, context=ctx)
    assert len(g.graphs) == 2


def test_cpu_compile_matches_eager_and_follows_weight_changes():
    """--compile on the CPU (inductor with its C++ wrapper, under GraphedModel): the image of
    the eager engine within one 8-bit level, and weights changed in place after compiling (what
    a LoRA merge does) reach the compiled model as they reach eager."""
    import numpy as np

    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    model, _ = _net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would hide the U-Net's weights
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    plain, compiled = Engine(model, cuda_graphs=False), Engine(model, compile=True)
    assert compiled.denoiser.model.fn is not compiled.denoiser.model.model
    p = GenerationParams(prompt="a red apple", steps=3, seed=1, width=64, height=64)

    def pixels(eng):
        return np.asarray(generate(eng, p).images[0], dtype=np.int16)
    before = pixels(plain)
    assert np.abs(pixels(compiled) - before).max() <= 1
    with torch.no_grad():
        model.unet.out[2].weight.mul_(-1.0)
    after = pixels(plain)
    assert np.abs(after - before).max() > 10  # the change shows in the image
    assert np.abs(pixels(compiled) - after).max() <= 1
