"""Text encoder parity with transformers' CLIPTextModel(WithProjection) on random weights."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sdloom.checkpoints.keymaps.clip import (  # noqa: E402
    clip_hf_to_openclip, clip_openclip_to_hf, normalize_hf_clip)
from sdloom.checkpoints.load import text_config_from_hf  # noqa: E402
from sdloom.models.text_encoders import build_text_encoder  # noqa: E402

from conftest import randomize_  # noqa: E402


def hf_model(act="quick_gelu", layers=3, proj=None, seed=0):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      max_position_embeddings=77, hidden_act=act,
                                      projection_dim=proj or 64)
    cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
    return randomize_(cls(cfg), seed).eval()


def ids(pad: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    out = torch.full((3, 77), pad)
    for b, n in enumerate((5, 20, 75)):
        out[b, 0] = 49406
        out[b, 1:n + 1] = torch.randint(300, 40000, (n,), generator=g)
        out[b, n + 1] = 49407
    return out


def ours_from_hf(ref, **overrides):
    cfg = dataclasses.replace(text_config_from_hf(ref.config.to_dict() | {
        "architectures": [type(ref).__name__]}), **overrides)
    enc = build_text_encoder(cfg).eval()
    sd = normalize_hf_clip(ref.state_dict())
    if cfg.layout == "openclip":
        oc = clip_hf_to_openclip(sd) | {"logit_scale": torch.tensor(0.0)}
        oc.setdefault("text_projection", torch.zeros(cfg.width, cfg.width))  # SD2: unused
        enc.model.load_state_dict(oc, strict=True)
    else:
        enc.transformer.load_state_dict(sd, strict=True)
    return enc


def test_sd1_clip_l_last_layer_and_clip_skip():
    ref = hf_model("quick_gelu")
    enc = ours_from_hf(ref)
    x = ids(49407)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        h1, pooled = enc(x)
        h2, _ = enc(x, clip_skip=2)
    torch.testing.assert_close(h1, out.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert pooled is None
    # A1111 clip skip 2: the penultimate hidden state through the final layer norm
    want = ref.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(h2, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(h1, h2, atol=1e-2)


def test_openclip_layout_matches_hf_sd2_rule():
    # SD2: penultimate layer + ln_final == diffusers' encoder with the last layer removed
    full = hf_model("gelu", layers=3, seed=1)
    short = hf_model("gelu", layers=2, seed=1)
    short.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers.2." not in k},
                          strict=True)
    enc = ours_from_hf(full, hidden_layer=-2, pad_token=0)
    x = ids(0)
    with torch.no_grad():
        h, _ = enc(x)
        torch.testing.assert_close(h, short(x).last_hidden_state, atol=1e-4, rtol=1e-4)


def test_sdxl_bigg_penultimate_and_pooled_projection():
    ref = hf_model("gelu", proj=48, seed=2)
    enc = ours_from_hf(ref, hidden_layer=-2, final_norm_on_hidden=False, pooled=True, pad_token=0)
    x = ids(0)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        h, pooled = enc(x)
    torch.testing.assert_close(h, out.hidden_states[-2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out.text_embeds, atol=1e-4, rtol=1e-4)


def test_clip_keymap_round_trip_and_inputs_embeds():
    ref = hf_model("gelu", proj=48, seed=3)
    sd = normalize_hf_clip(ref.state_dict())
    oc = clip_hf_to_openclip(sd, 3)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
    assert oc["text_projection"].shape == (64, 48)
    back = clip_openclip_to_hf(oc)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    enc = ours_from_hf(ref, hidden_layer=-2, pooled=True, pad_token=0)
    x = ids(0)
    with torch.no_grad():
        a = enc(x)[0]
        b = enc(x, inputs_embeds=enc.token_embedding(x))[0]
        e = enc.token_embedding(x)
        e[:, 1] += torch.randn(e.shape[-1])  # not a constant: LayerNorm would remove that
        c = enc(x, inputs_embeds=e)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[:, 1:], c[:, 1:], atol=1e-3)
