"""IP-Adapter: the CLIP vision tower and its preprocessing against transformers, the U-Net's
image cross-attention against diffusers' IP-Adapter loading (original file layout, random
weights), and generate() with a reference image."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import transformers

from sdloom.errors import ModelFileError, SdloomError
from sdloom.families.sd import UNetAdapter
from sdloom.models.clip_vision import (CLIPVisionConfig, CLIPVisionModel, load_clip_vision,
                                       preprocess)
from sdloom.models.ip_adapter import (ActiveIPAdapter, IPAdaptedModel, IPAdapter,
                                      IPAdapterUnit, cross_attentions, load_ip_adapter)
from sdloom.models.text_encoders import HFAttention

from conftest import randomize_
from test_unet import inputs, make_pair

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7, projection_dim=16, hidden_act="gelu")


def _hf_vision(seed=0):
    cfg = transformers.CLIPVisionConfig(**VISION)
    ref = transformers.CLIPVisionModelWithProjection(cfg)
    return randomize_(ref, seed).eval()


def _ours(ref):
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    cfg = CLIPVisionConfig.detect({k: tuple(v.shape) for k, v in sd.items()},
                                  ref.config.to_dict())
    m = CLIPVisionModel(cfg).eval()
    m.load_state_dict(sd, strict=True)
    return m


def test_vision_tower_matches_transformers():
    ref = _hf_vision()
    ours = _ours(ref)
    assert ours.config.image_size == 28 and ours.config.layers == 3
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(px, output_hidden_states=True)
        got, hidden = ours(px)
    assert want.image_embeds.abs().mean() > 0.1
    torch.testing.assert_close(got, want.image_embeds, atol=1e-4, rtol=1e-4)
    assert len(hidden) == len(want.hidden_states)
    torch.testing.assert_close(hidden[-2], want.hidden_states[-2], atol=1e-4, rtol=1e-4)
    # negative control: the text tower's causal attention gives other embeddings
    for layer in ours.vision_model.encoder.layers:
        layer.self_attn.forward = HFAttention.forward.__get__(layer.self_attn)
    with torch.no_grad():
        assert (ours(px)[0] - want.image_embeds).abs().max() > 1e-2


def test_preprocess_matches_clip_image_processor():
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((50, 83, 3)) * 255).astype(np.uint8))
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                           crop_size={"height": 28, "width": 28})
    want = proc(images=[img], return_tensors="pt").pixel_values
    got = preprocess([img], 28)
    assert got.shape == want.shape == (1, 3, 28, 28)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # negative control: a plain resize to a square (no crop) differs
    assert (preprocess([img.resize((28, 28))], 28) - want).abs().max() > 1e-2


def _adapter_sd(unet, embed_dim: int, context: int, seed=3, tokens=4):
    """A random plain IP-Adapter state dict in the original layout for `unet` (ours)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"image_proj.proj.weight": torch.randn(tokens * context, embed_dim, generator=g) * 0.3,
          "image_proj.proj.bias": torch.randn(tokens * context, generator=g) * 0.1,
          "image_proj.norm.weight": 1 + torch.randn(context, generator=g) * 0.1,
          "image_proj.norm.bias": torch.randn(context, generator=g) * 0.1}
    for i, a in cross_attentions(unet).items():
        inner = a.to_q.weight.shape[0]
        for n in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{i}.{n}.weight"] = torch.randn(inner, context, generator=g) * 0.3
    return sd


def _nested(sd):
    out = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        top, rest = k.split(".", 1)
        out[top][rest] = v
    return out


def test_unet_with_ip_adapter_matches_diffusers(tmp_path):
    ref, ours, cfg = make_pair("sd1")
    assert sorted(cross_attentions(ours)) == [1, 3, 5, 7]
    sd = _adapter_sd(ours, 16, cfg.context_dim)
    ref._load_ip_adapter_weights([_nested(sd)])
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale") and isinstance(proc.scale, list):
            proc.scale = [0.7]
    save_file(sd, tmp_path / "ip.safetensors")
    torch.save(_nested(sd), tmp_path / "ip.bin")
    adapter = load_ip_adapter(tmp_path / "ip.safetensors", torch.device("cpu"), torch.float32)
    from_bin = load_ip_adapter(tmp_path / "ip.bin", torch.device("cpu"), torch.float32)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, from_bin.state_dict()[k])
    x, t, ctx = inputs(cfg)
    embeds = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    # row 0: two reference images (tokens concatenated); row 1: uncond, zero embeds
    image_embeds = torch.stack([embeds, torch.zeros_like(embeds)])  # [B, images, D]
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs={"image_embeds": [image_embeds]}).sample
        cond = adapter.image_proj(embeds).reshape(1, -1, cfg.context_dim)
        uncond = adapter.image_proj(torch.zeros_like(embeds)).reshape(cond.shape)
        unit = ActiveIPAdapter(adapter, cond, uncond, weight=0.7)

        def run(model):
            return model(x, t, ctx, cond_mark=torch.tensor([1.0, 0.0]))

        m = IPAdaptedModel(UNetAdapter(ours), ours, [unit], lambda: 0.0, pass_mark=False)
        got = run(m)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        without = ours(x, t, ctx)
        assert (want - without).abs().max() > 1e-2  # the adapter changes the output
        assert all(a.image_kv is None for a in cross_attentions(ours).values())
        # negative control: processor indices 1 and 3 (same widths) swapped
        m.attns = {1: m.attns[3], 3: m.attns[1], 5: m.attns[5], 7: m.attns[7]}
        assert (run(m) - want).abs().max() > 1e-3
        # outside its start/end window the adapter does nothing
        late = IPAdaptedModel(UNetAdapter(ours), ours, [ActiveIPAdapter(adapter, cond, uncond,
                                                                   0.7, 0.5, 1.0)],
                              lambda: 0.25, pass_mark=False)
        torch.testing.assert_close(run(late), without, atol=0, rtol=0)


def _plus_sd(unet, embed_dim: int, context: int, seed=4, queries=6, dim=64, depth=4):
    """A random IP-Adapter plus state dict (original Resampler layout) for `unet` (ours)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"image_proj.latents": r(1, queries, dim, s=1.0),
          "image_proj.proj_in.weight": r(dim, embed_dim), "image_proj.proj_in.bias": r(dim),
          "image_proj.proj_out.weight": r(context, dim), "image_proj.proj_out.bias": r(context),
          "image_proj.norm_out.weight": 1 + r(context), "image_proj.norm_out.bias": r(context)}
    for i in range(depth):
        pre = f"image_proj.layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = 1 + r(dim), r(dim)
        sd[pre + "0.to_q.weight"], sd[pre + "0.to_kv.weight"] = r(64, dim), r(128, dim)
        sd[pre + "0.to_out.weight"] = r(dim, 64)
        sd[pre + "1.1.weight"], sd[pre + "1.3.weight"] = r(4 * dim, dim), r(dim, 4 * dim)
    for i, a in cross_attentions(unet).items():
        for n in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{i}.{n}.weight"] = r(a.to_q.weight.shape[0], context, s=0.3)
    return sd


def test_plus_adapter_matches_diffusers(tmp_path):
    """IP-Adapter plus: the Resampler and the U-Net with its tokens against diffusers'
    IPAdapterPlusImageProjection loaded from the same original-layout file."""
    ref, ours, cfg = make_pair("sd1")
    sd = _plus_sd(ours, 32, cfg.context_dim)  # depth 4, as published (and diffusers assumes)
    ref._load_ip_adapter_weights([_nested(sd)], low_cpu_mem_usage=False)
    save_file(sd, tmp_path / "plus.safetensors")
    adapter = load_ip_adapter(tmp_path / "plus.safetensors", torch.device("cpu"), torch.float32)
    assert adapter.plus and len(adapter.image_proj.layers) == 4
    x, t, ctx = inputs(cfg)
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(1, 10, 32, generator=g)  # one image's penultimate hidden states
    blank = torch.randn(1, 10, 32, generator=g)  # those of the zero image
    with torch.no_grad():
        tokens = adapter.image_proj(torch.cat([feats, blank]))
        want_tokens = ref.encoder_hid_proj.image_projection_layers[0](torch.cat([feats, blank]))
        torch.testing.assert_close(tokens, want_tokens, atol=1e-5, rtol=1e-5)
        want = ref(x, t, ctx, added_cond_kwargs={
            "image_embeds": [torch.stack([feats, blank])]}).sample  # [B, images, L, E]
        unit = ActiveIPAdapter(adapter, tokens[:1], tokens[1:], weight=1.0)
        m = IPAdaptedModel(UNetAdapter(ours), ours, [unit], lambda: 0.0, pass_mark=False)
        got = m(x, t, ctx, cond_mark=torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # negative control: the latent queries in another order change the result
        adapter.image_proj.latents.data = adapter.image_proj.latents.data.flip(1)
        assert (adapter.image_proj(feats) - tokens[:1]).abs().max() > 1e-3


def test_full_face_adapter_matches_diffusers(tmp_path):
    """Full-face IP-Adapter: its MLP projection of every penultimate hidden state against
    diffusers' IPAdapterFullImageProjection loaded from the same original-layout file."""
    ref, ours, cfg = make_pair("sd1")
    g = torch.Generator().manual_seed(11)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"image_proj.proj.0.weight": r(32, 32), "image_proj.proj.0.bias": r(32),
          "image_proj.proj.2.weight": r(cfg.context_dim, 32),
          "image_proj.proj.2.bias": r(cfg.context_dim),
          "image_proj.proj.3.weight": 1 + r(cfg.context_dim), "image_proj.proj.3.bias": r(
              cfg.context_dim)}
    for i, a in cross_attentions(ours).items():
        for n in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{i}.{n}.weight"] = r(a.to_q.weight.shape[0], cfg.context_dim, s=0.3)
    ref._load_ip_adapter_weights([_nested(sd)], low_cpu_mem_usage=False)
    save_file(sd, tmp_path / "full.safetensors")
    adapter = load_ip_adapter(tmp_path / "full.safetensors", torch.device("cpu"), torch.float32)
    assert adapter.plus  # it reads hidden states, as plus does
    x, t, ctx = inputs(cfg)
    feats, blank = torch.randn(1, 10, 32, generator=g), torch.randn(1, 10, 32, generator=g)
    with torch.no_grad():
        tokens = adapter.image_proj(torch.cat([feats, blank]))
        want_tokens = ref.encoder_hid_proj.image_projection_layers[0](torch.cat([feats, blank]))
        torch.testing.assert_close(tokens, want_tokens, atol=1e-5, rtol=1e-5)
        want = ref(x, t, ctx, added_cond_kwargs={"image_embeds": [torch.stack([feats, blank])]}
                   ).sample
        unit = ActiveIPAdapter(adapter, tokens[:1], tokens[1:], weight=1.0)
        got = IPAdaptedModel(UNetAdapter(ours), ours, [unit], lambda: 0.0, pass_mark=False)(
            x, t, ctx, cond_mark=torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - ours(x, t, ctx)).abs().max() > 1e-2


def test_plus_unit_reads_the_penultimate_hidden_states():
    from sdloom.models.ip_adapter import encode_unit
    ref = _hf_vision(seed=2)
    enc = _ours(ref)
    adapter = IPAdapter.from_state_dict(_plus_sd(make_pair("sd1")[1], 32, 32), "plus")
    img = Image.fromarray((np.random.default_rng(0).random((30, 30, 3)) * 255).astype(np.uint8))
    unit = encode_unit(IPAdapterUnit("a", "b", [img, img]), adapter, enc)
    px = preprocess([img], 28)
    with torch.no_grad():
        hs = ref(px, output_hidden_states=True).hidden_states[-2]
        zero = ref(torch.zeros_like(px), output_hidden_states=True).hidden_states[-2]
        want = adapter.image_proj(hs)
        torch.testing.assert_close(unit.cond, torch.cat([want, want], 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unit.uncond[:, :6], adapter.image_proj(zero), atol=1e-5,
                                   rtol=1e-5)
        last = adapter.image_proj(ref(px, output_hidden_states=True).hidden_states[-1])
        assert (last - want).abs().max() > 1e-3  # the last layer would be another input


def test_adapter_files_are_checked(tmp_path):
    save_file({"image_proj.latents": torch.zeros(1, 4, 8)}, tmp_path / "plus.safetensors")
    with pytest.raises(ModelFileError, match="plus file lacks"):
        load_ip_adapter(tmp_path / "plus.safetensors", torch.device("cpu"), torch.float32)
    save_file({"image_proj.weird": torch.zeros(1)}, tmp_path / "faceid.safetensors")
    with pytest.raises(ModelFileError, match="not an IP-Adapter"):
        load_ip_adapter(tmp_path / "faceid.safetensors", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelFileError, match="missing keys"):
        IPAdapter.from_state_dict({"image_proj.proj.weight": torch.zeros(8, 4),
                                   "image_proj.norm.weight": torch.zeros(2),
                                   "image_proj.norm.bias": torch.zeros(2)}, "x")
    with pytest.raises(SdloomError, match="reference image"):
        IPAdapterUnit("a", "b").check()


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sdloom.checkpoints.save import save_model
    from tiny import TINY_SD1, tiny_model
    root = tmp_path_factory.mktemp("ip")
    model = tiny_model(TINY_SD1, seed=3)
    save_model(model, TINY_SD1, root / "m.safetensors")
    _hf_vision(seed=4).save_pretrained(root / "enc")
    sd = _adapter_sd(model.unet, 16, TINY_SD1.unet.context_dim, seed=6)
    save_file(sd, root / "ip.safetensors")
    rng = np.random.default_rng(2)
    ref = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    return root, ref


def _gen(root, units, **kw):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    eng = Engine.load(root / "m.safetensors", device="cpu", precision="fp32")
    p = GenerationParams(prompt="a cat", seed=7, steps=3, cfg_scale=5.0, width=64, height=64,
                         sampler_name="Euler", ip_adapters=units, **kw)
    return np.asarray(generate(eng, p).images[0], np.float32)


def test_generate_with_a_reference_image(tiny):
    root, ref = tiny

    def unit(**kw):
        return IPAdapterUnit(str(root / "ip.safetensors"), str(root / "enc"), [ref], **kw)

    base = _gen(root, [])
    with_ip = _gen(root, [unit()])
    assert np.abs(with_ip - base).max() > 2
    np.testing.assert_array_equal(_gen(root, [unit(weight=0.0)]), base)
    # two images averaged is not two images concatenated
    flipped = ref.transpose(Image.FLIP_LEFT_RIGHT)
    cat = _gen(root, [IPAdapterUnit(str(root / "ip.safetensors"), str(root / "enc"),
                                    [ref, flipped])])
    avg = _gen(root, [IPAdapterUnit(str(root / "ip.safetensors"), str(root / "enc"),
                                    [ref, flipped], combine="average")])
    assert np.abs(cat - avg).max() > 0


def test_encoder_from_a_single_file_and_refusals(tiny, tmp_path):
    root, _ = tiny
    enc = load_clip_vision(root / "enc", torch.device("cpu"), torch.float32)
    assert enc.config.heads == 4 and enc.config.act == "gelu"
    with pytest.raises(ModelFileError, match="config.json"):  # width 32: no preset
        CLIPVisionConfig.detect({k: tuple(v.shape) for k, v in enc.state_dict().items()})
    bad = IPAdapterUnit(str(root / "ip.safetensors"), str(root / "enc"),
                        [Image.new("RGB", (8, 8))], guidance_start=0.8, guidance_end=0.2)
    with pytest.raises(SdloomError, match="start/end"):
        _gen(root, [bad])


def test_cli_style_image(tiny, tmp_path, capsys):
    from sdloom.cli import main
    root, ref = tiny
    ref.save(tmp_path / "ref.png")
    common = ["generate", "a cat", "--model", str(root / "m.safetensors"), "--steps", "2",
              "--width", "64", "--height", "64", "--sampler", "Euler", "--seed", "7"]
    assert main([*common, "--output", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--style-image", str(tmp_path / "ref.png"), "--ip-adapter",
                 str(root / "ip.safetensors"), "--ip-image-encoder", str(root / "enc"),
                 "--output", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n), np.float32) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() > 2
    capsys.readouterr()
    assert main([*common, "--style-image", str(tmp_path / "ref.png"),
                 "--output", str(tmp_path / "c.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert "go together" in err and len(err.splitlines()) == 1, err
