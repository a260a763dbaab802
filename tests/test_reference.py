"""Reference-only control (models/reference.py) against sd-webui-controlnet's rules, written
out here: attention sharing (hook.py hacked_basic_transformer_inner_forward), AdaIN
(hacked_group_norm_forward), which blocks take part at a weight, the style fidelity, the
reference latent noised with q_sample at the rounded timestep; and the pipeline with it."""
import numpy as np
import pytest
import torch

from sdloom.controlnet import ControlUnit
from sdloom.models.attention import BasicTransformerBlock
from sdloom.models.reference import (AdaIN, ActiveReference, AttentionShare, ReferenceModel,
                                     _Call, adain_blocks, style_fidelity, transformer_blocks)
from tiny import tiny_model


def _block(seed=0):
    torch.manual_seed(seed)
    b = BasicTransformerBlock(16, 2, 8, 8).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return b


def test_attention_sharing_is_the_extensions_rule():
    b = _block()
    g = torch.Generator().manual_seed(1)
    x, ref, ctx = (torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g),
                   torch.randn(2, 3, 8, generator=g))
    call = _Call()
    b.reference = AttentionShare(call, 0.0)
    call.mode, call.attention, call.weight, call.fidelity = "write", True, 1.0, 0.3
    b(ref, ctx)
    call.mode, call.uc = "read", [1]
    with torch.no_grad():
        got = b(x, ctx)
        # the extension: uc = attn1(n1(x), [n1(x); bank]); c = uc with the uncond rows' plain
        # self-attention; attn = f·c + (1 − f)·uc; then attn2 and ff as usual
        h, bank = b.norm1(x), b.norm1(ref)
        with_ref = b.attn1(h, torch.cat([h, bank], 1))
        c = with_ref.clone()
        c[1] = b.attn1(h[1:2])[0]
        y = x + 0.3 * c + 0.7 * with_ref
        y = y + b.attn2(b.norm2(y), ctx)
        want = y + b.ff(b.norm3(y))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        b.reference = None
        assert (b(x, ctx) - want).abs().max() > 1e-3  # without the bank it differs
    assert call.mode == "read" and not b.reference


def test_adain_is_the_extensions_rule():
    call = _Call()
    hook = AdaIN(call, 0.0)
    g = torch.Generator().manual_seed(2)
    ref, x = torch.randn(2, 3, 4, 4, generator=g) * 3 + 1, torch.randn(2, 3, 4, 4, generator=g)
    call.mode, call.adain, call.weight, call.fidelity = "write", True, 1.0, 0.5
    assert hook(None, (), ref) is None
    call.mode, call.uc = "read", [0]
    got = hook(None, (), x)
    var_r, mean_r = torch.var_mean(ref, dim=(2, 3), keepdim=True, correction=0)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    y_uc = (x - mean) / var.clamp(min=1e-6).sqrt() * var_r.clamp(min=1e-6).sqrt() + mean_r
    y_c = y_uc.clone()
    y_c[0] = x[0]
    torch.testing.assert_close(got, 0.5 * y_c + 0.5 * y_uc)


def test_blocks_taking_part_follow_the_weight():
    unet = tiny_model().unet
    blocks = transformer_blocks(unet)
    widths = [b.norm1.normalized_shape[0] for b in blocks]
    assert widths == sorted(widths, reverse=True) and len(blocks) > 1
    call = _Call()
    shares = [AttentionShare(call, i / len(blocks)) for i in range(len(blocks))]
    call.mode, call.attention, call.weight = "write", True, 0.5
    for s in shares:
        s.self_attention(lambda h, c=None: h, torch.zeros(1, 2, 4))
    assert [len(s.bank.items) for s in shares] == [1 if i / len(blocks) < 0.5 else 0
                                                   for i in range(len(blocks))]
    orders = [w for _, w in adain_blocks(unet, sdxl=False)]
    assert orders[0] == 0.0 and all(0.0 <= w <= 2.0 for w in orders)


@pytest.mark.parametrize("a, mode, hires, sdxl, want", [
    (0.5, 0, False, False, 0.5), (1.7, 0, False, False, 1.0), (0.5, 0, False, True, 0.125),
    (0.5, 1, False, False, 0.0), (0.5, 2, False, False, 1.0), (0.5, 0, True, False, 0.0)])
def test_style_fidelity(a, mode, hires, sdxl, want):
    assert style_fidelity(a, mode, hires, sdxl) == pytest.approx(want)


def test_write_pass_input_is_q_sample_at_the_rounded_timestep():
    seen = []

    class Plain(torch.nn.Module):
        def forward(self, x, t, context, **kw):
            seen.append(x.clone())
            return x

    unet = tiny_model().unet
    ac = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    z = torch.randn(1, 4, 8, 8)
    unit = ActiveReference(z, "reference_only")
    m = ReferenceModel(Plain(), Plain(), unet, [unit], lambda: 0.0, ac,
                       torch.Generator().manual_seed(3), pass_mark=False, sdxl=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([411.6, 411.6])
    m(x, t, torch.zeros(2, 77, 32), cond_mark=torch.tensor([1.0, 0.0]))
    eps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    a = ac[412].float()
    torch.testing.assert_close(seen[0], a.sqrt() * z.expand(2, -1, -1, -1) + (1 - a).sqrt() * eps)
    torch.testing.assert_close(seen[1], x)  # then the real call
    assert all(b.reference is None for b in transformer_blocks(unet))


# ---------------------------------------------------------------- the pipeline

def _gen(units, **kw):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from test_offload import live_model
    p = GenerationParams(prompt="a cat", seed=7, steps=3, cfg_scale=5.0, width=64, height=64,
                         sampler_name="Euler", controlnets=units, **kw)
    res = generate(Engine(live_model()), p)
    return np.asarray(res.images[0], np.int16), res.infotexts[0]


def _ref_image():
    from PIL import Image
    rng = np.random.default_rng(4)
    return Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("module", ["reference_only", "reference_adain", "reference_adain+attn"])
def test_generate_with_a_reference_image(module):
    plain, _ = _gen([])
    unit = ControlUnit("None", _ref_image(), module=module)
    a, info = _gen([unit])
    b, _ = _gen([unit])
    assert np.array_equal(a, b)  # seeded: the same image twice
    assert np.abs(a - plain).max() > 0
    assert f"Module: {module}, Model: None" in info
    off, _ = _gen([ControlUnit("None", _ref_image(), module=module, guidance_start=0.9,
                               guidance_end=1.0)])
    assert np.array_equal(off, plain)  # outside its window it does nothing
