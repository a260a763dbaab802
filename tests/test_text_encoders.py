"""Text encoder parity with transformers' CLIPTextModel(WithProjection) on random weights.

The hf layout loads transformers' weights as they are; the open_clip layout loads the same
weights through `clip_hf_to_openclip`, so both layouts and the key map are checked against one
oracle, with the hidden-state rules of SD1 (last + norm, A1111 clip skip), SD2 (penultimate +
ln_final) and SDXL (penultimate, no norm; pooled = projected EOS token).
"""
import dataclasses

import pytest
import torch

from sdloom.errors import ModelFileError, SdloomError

import transformers  # noqa: E402  (a test requirement: missing, the test fails)

from sdloom.families.keymaps import clip as km  # noqa: E402
from sdloom.config import TextEncoderConfig  # noqa: E402
from sdloom.families.sd_presets import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H  # noqa: E402
from sdloom.models.text_encoders import (  # noqa: E402
    FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, build_text_encoder)

from conftest import randomize_  # noqa: E402

WIDTH, HEADS = 64, 4


def hf_model(act: str, layers: int = 3, proj: int | None = None, seed: int = 0):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH,
                                      intermediate_size=4 * WIDTH, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=proj or WIDTH)
    cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
    return randomize_(cls(cfg), seed).eval()


def our_config(layout: str, act: str, layers: int = 3, proj: int | None = None,
               **kw) -> TextEncoderConfig:
    return TextEncoderConfig(layout=layout, width=WIDTH, layers=layers, heads=HEADS, act=act,
                             projection_dim=proj, **kw)


def load_ours(ref, cfg: TextEncoderConfig):
    """Our encoder for `cfg`, holding `ref`'s weights (converted for the open_clip layout)."""
    enc = build_text_encoder(cfg).eval()
    sd = km.normalize_hf_clip(ref.state_dict())
    if cfg.layout == "hf":
        enc.transformer.load_state_dict(sd, strict=True)
    else:
        oc = km.clip_hf_to_openclip(sd, cfg.layers)
        oc["logit_scale"] = torch.tensor(4.6)
        # SD2's projection exists in the checkpoint but nothing reads it
        oc.setdefault("text_projection", torch.randn(cfg.width, cfg.width))
        enc.model.load_state_dict(oc, strict=True)
    return enc


def ids(pad: int) -> torch.Tensor:
    """BOS, words, EOS at positions 2, 6, 21 and 76, then `pad` to 77."""
    g = torch.Generator().manual_seed(7)
    out = torch.full((4, 77), pad)
    for b, n in enumerate((1, 5, 20, 75)):
        out[b, 0] = 49406
        out[b, 1:n + 1] = torch.randint(300, 40000, (n,), generator=g)
        out[b, n + 1] = 49407
    return out


def final_ln(ref):
    """The reference's final LayerNorm (transformers ≥ 5 flattens `text_model` away)."""
    return getattr(ref, "text_model", ref).final_layer_norm


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_layout_sd1_rules_and_pooler(act):
    ref = hf_model(act)
    x = ids(49407)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        enc = load_ours(ref, our_config("hf", act))
        h1, pooled = enc(x)
        h2, _ = enc(x, clip_skip=2)
        h3, _ = enc(x, clip_skip=3)
        # SD1: last layer + final norm; A1111 clip skip N: hidden_states[-N] + final norm
        close(h1, out.last_hidden_state)
        close(h2, final_ln(ref)(out.hidden_states[-2]))
        close(h3, final_ln(ref)(out.hidden_states[-3]))
        assert pooled is None
        # pooled without projection = transformers' pooler_output (first EOS token, normed)
        _, pooled = load_ours(ref, our_config("hf", act, pooled=True))(x)
        close(pooled, out.pooler_output)
        # SDXL's CLIP-L: penultimate hidden state without the final norm
        h, _ = load_ours(ref, our_config("hf", act, hidden_layer=-2,
                                         final_norm_on_hidden=False))(x)
        close(h, out.hidden_states[-2])
    assert not torch.allclose(h1, h2, atol=1e-2)


def test_hf_layout_with_projection_matches_clip_text_model_with_projection():
    ref = hf_model("quick_gelu", proj=48, seed=1)
    x = ids(49407)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        enc = load_ours(ref, our_config("hf", "quick_gelu", proj=48))
        h, pooled = enc(x)
    assert "text_projection.weight" in enc.transformer.state_dict()
    close(h, out.last_hidden_state)
    close(pooled, out.text_embeds)


def test_openclip_layout_sd2_rule_equals_diffusers_shortened_encoder():
    # SD2: penultimate layer + ln_final == diffusers' encoder with the last layer removed
    full = hf_model("gelu", layers=3, seed=2)
    short = hf_model("gelu", layers=2, seed=9)
    short.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers.2." not in k},
                          strict=True)
    x = ids(0)
    enc = load_ours(full, dataclasses.replace(OPENCLIP_H, width=WIDTH, layers=3, heads=HEADS,
                                              projection_dim=None))
    with torch.no_grad():
        h, pooled = enc(x)
        h2, _ = enc(x, clip_skip=2)
        out = full(x, output_hidden_states=True)
        close(h, short(x).last_hidden_state)
        close(h, final_ln(full)(out.hidden_states[-2]))
        close(h2, final_ln(full)(out.hidden_states[-3]))
    assert pooled is None


def test_openclip_layout_sdxl_rule_and_pooled_projection():
    ref = hf_model("gelu", proj=48, seed=3)
    x = ids(0)
    cfg = dataclasses.replace(OPENCLIP_BIGG, width=WIDTH, layers=3, heads=HEADS, projection_dim=48)
    enc = load_ours(ref, cfg)
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        h, pooled = enc(x)
    close(h, out.hidden_states[-2])
    close(pooled, out.text_embeds)
    # the pooled token is the first EOS, not the last position
    last = ref.text_projection(final_ln(ref)(out.hidden_states[-1][:, -1]))
    assert not torch.allclose(pooled[:3], last[:3], atol=1e-2)


def test_keymap_round_trip_and_names():
    ref = hf_model("gelu", proj=48, seed=4)
    sd = km.normalize_hf_clip(ref.state_dict())
    # transformers ≥ 5 drops `text_model.` for CLIPTextModel; old files carry position_ids
    assert km.clip_hf_to_openclip({**sd, "text_model.embeddings.position_ids": torch.arange(77)})
    oc = km.clip_hf_to_openclip(sd, 3)
    w = sd["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(oc["transformer.resblocks.1.attn.in_proj_weight"][WIDTH:2 * WIDTH], w)
    assert torch.equal(oc["text_projection"], sd["text_projection.weight"].t())
    assert torch.equal(oc["positional_embedding"],
                       sd["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(oc["ln_final.weight"], sd["text_model.final_layer_norm.weight"])
    assert oc["transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * WIDTH,)
    back = km.clip_openclip_to_hf({**oc, "logit_scale": torch.tensor(4.6)})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ModelFileError, match="config says 4 layers, the weights have 3"):
        km.clip_hf_to_openclip(sd, 4)
    plain = hf_model("gelu", seed=4).state_dict()
    bare = {k.removeprefix("text_model."): v for k, v in plain.items()}
    assert set(km.clip_hf_to_openclip(bare)) == set(oc) - {"text_projection"}


def test_one_wrong_table_entry_breaks_parity(monkeypatch):
    ref = hf_model("gelu", proj=48, seed=5)
    x = ids(0)
    cfg = dataclasses.replace(OPENCLIP_BIGG, width=WIDTH, layers=3, heads=HEADS, projection_dim=48)
    with torch.no_grad():
        want = ref(x, output_hidden_states=True).hidden_states[-2]
        # ln_1 ⇄ ln_2: same shapes, so the strict load succeeds and only the numbers differ
        swapped = {"layer_norm1": "ln_2", "layer_norm2": "ln_1"}
        monkeypatch.setattr(km, "LAYER", [(a, swapped.get(a, b)) for a, b in km.LAYER])
        h, _ = load_ours(ref, cfg)(x)
    assert not torch.allclose(h, want, atol=1e-2)


def test_inputs_embeds_and_token_embedding():
    ref = hf_model("gelu", proj=48, seed=6)
    for cfg in (our_config("hf", "gelu", proj=48),
                dataclasses.replace(OPENCLIP_BIGG, width=WIDTH, layers=3, heads=HEADS,
                                    projection_dim=48)):
        enc = load_ours(ref, cfg)
        x = ids(cfg.pad_token)
        with torch.no_grad():
            e = enc.token_embedding(x)
            torch.testing.assert_close(e, ref.text_model.embeddings.token_embedding(x))
            a, pa = enc(x)
            b, pb = enc(x, inputs_embeds=e)
            e[:, 1] += torch.randn(e.shape[-1])  # not a constant: LayerNorm would remove that
            c, _ = enc(x, inputs_embeds=e)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(pa, pb)
        assert torch.allclose(a[:, :1], c[:, :1], atol=1e-5)  # causal: BOS cannot see token 1
        assert not torch.allclose(a[:, 1:], c[:, 1:], atol=1e-3)
    with pytest.raises(SdloomError, match="clip skip 5 is deeper"):
        enc(x, clip_skip=5)


@pytest.mark.parametrize("preset,hf_kw,count", [
    (CLIP_L, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12), 123_060_480),
    (OPENCLIP_H, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, projection_dim=1024, hidden_act="gelu"), None),
    (OPENCLIP_BIGG, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
     694_659_840),
])
def test_full_size_presets_on_meta_match_transformers(preset, hf_kw, count):
    with torch.device("meta"):
        ours = build_text_encoder(preset)
        hc = transformers.CLIPTextConfig(**hf_kw)
        ref = (transformers.CLIPTextModel(hc) if preset.layout == "hf"
               else transformers.CLIPTextModelWithProjection(hc))
    assert all(p.is_meta for p in ours.parameters())
    sd = km.normalize_hf_clip(ref.state_dict())
    if preset.layout == "hf":
        assert isinstance(ours, FrozenCLIPEmbedder)
        mine = {"transformer." + k: tuple(v.shape)
                for k, v in ours.transformer.state_dict().items()}
        theirs = {"transformer." + k: tuple(v.shape) for k, v in sd.items()}
    else:
        assert isinstance(ours, FrozenOpenCLIPEmbedder)
        mine = {"model." + k: tuple(v.shape) for k, v in ours.model.state_dict().items()}
        theirs = {"model." + k: tuple(v.shape)
                  for k, v in km.clip_hf_to_openclip(sd, preset.layers).items()}
        theirs["model.logit_scale"] = ()
    assert mine == theirs
    assert set(ours.state_dict()) == set(mine)  # the wrapper adds the single-file prefix
    if count is not None:
        assert sum(v.numel() for k, v in ours.state_dict().items()
                   if k != "model.logit_scale") == count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    ref = hf_model("gelu", proj=48, seed=8)
    cfg = dataclasses.replace(OPENCLIP_BIGG, width=WIDTH, layers=3, heads=HEADS, projection_dim=48)
    enc = load_ours(ref, cfg)
    x = ids(0)
    with torch.no_grad():
        h, p = enc(x)
        low = enc.to(dtype)
        hl, pl = low(x)
    assert hl.dtype == dtype and pl.dtype == dtype
    assert (hl.float() - h).abs().max() / h.abs().max() < 0.05
    assert (pl.float() - p).abs().max() / p.abs().max() < 0.05
