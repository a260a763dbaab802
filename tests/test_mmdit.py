"""MMDiT (SD3 / SD3.5) parity with diffusers' SD3Transformer2DModel on random weights, through
our key map; key-map round trips; config detection from shapes, tiny and full size."""
import dataclasses

import diffusers
import pytest
import torch

from sdloom.families.keymaps import mmdit as km
from sdloom.errors import ModelFileError, SdloomError
from sdloom.models.mmdit import MMDiT, MMDiTConfig

from conftest import randomize_

# depth 3: a plain block, then the pre-only last block; dual layers (0, 1) leave block 2 plain.
# SD3 has no qk-norm, so nothing in its shapes gives the head width: the tiny SD3 keeps the real
# head width 64 for detect() to hold; with qk-norm the head width comes from ln_q, so 16 is fine.
COMMON = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24)
TINY = {
    "sd3": dict(COMMON, attention_head_dim=64, caption_projection_dim=128, pos_embed_max_size=12),
    "sd35_medium": dict(COMMON, attention_head_dim=16, caption_projection_dim=32,
                        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd35_large": dict(COMMON, attention_head_dim=16, caption_projection_dim=32,
                       pos_embed_max_size=12, qk_norm="rms_norm"),
}
TINY_EXPECTED = {
    "sd3": MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=3, hidden_size=128,
                       num_heads=2, context_dim=32, pooled_dim=24, pos_embed_max_size=12),
    "sd35_medium": MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=3,
                               hidden_size=32, num_heads=2, context_dim=32, pooled_dim=24,
                               pos_embed_max_size=16, qk_norm=True, dual_attention_layers=(0, 1)),
    "sd35_large": MMDiTConfig(patch_size=2, in_channels=16, out_channels=16, depth=3,
                              hidden_size=32, num_heads=2, context_dim=32, pooled_dim=24,
                              pos_embed_max_size=12, qk_norm=True),
}
# transformer/config.json of the published diffusers repos (see the report for sources)
FULL = {
    "sd3_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                       pos_embed_max_size=192),
    "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                        pos_embed_max_size=384, qk_norm="rms_norm",
                        dual_attention_layers=tuple(range(13))),
    "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                       attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                       caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                       pos_embed_max_size=192, qk_norm="rms_norm"),
}
FULL_EXPECTED = {
    "sd3_medium": MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192),
    "sd35_medium": MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=384,
                               qk_norm=True, dual_attention_layers=tuple(range(13))),
    "sd35_large": MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192,
                              qk_norm=True),
}


def diffusers_mmdit(name: str, seed: int = 0):
    ref = randomize_(diffusers.SD3Transformer2DModel(**TINY[name]), seed)
    with torch.no_grad():  # the position table is a buffer: randomize_ leaves it at sin-cos
        g = torch.Generator().manual_seed(seed + 1)
        ref.pos_embed.pos_embed.copy_(torch.randn(ref.pos_embed.pos_embed.shape, generator=g))
    return ref.eval()


@pytest.fixture(scope="module", params=list(TINY))
def pair(request):
    ref = diffusers_mmdit(request.param)
    ours = MMDiT(km.mmdit_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(km.mmdit_diffusers_to_original(ref.state_dict()), strict=True)
    return request.param, ref, ours


def inputs(cfg: MMDiTConfig, h: int = 8, w: int = 6, seed: int = 3):
    """Non-square latent, smaller than the table: the centre crop has unequal offsets."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, h, w, generator=g),
            torch.tensor([937.5, 120.0]),  # σ·1000, fractional as flow-matching sigmas give
            torch.randn(2, 7, cfg.context_dim, generator=g),
            torch.randn(2, cfg.pooled_dim, generator=g))


def run_both(ref, ours, x, t, ctx, y):
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y,
                   timestep=t).sample
        return ours(x, t, ctx, y), want


def test_forward_matches_diffusers(pair):
    name, ref, ours = pair
    got, want = run_both(ref, ours, *inputs(ours.config))
    assert want.abs().mean() > 0.1  # not a degenerate output that anything would match
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("key", ["final_layer.adaLN_modulation.1",
                                 "joint_blocks.2.context_block.adaLN_modulation.1"])
def test_unswapped_adaln_is_caught(pair, key):
    """Negative control: loading either swapped adaLN as diffusers stores it (scale, shift)
    must change the output well beyond the parity tolerance."""
    name, ref, ours = pair
    sd = km.mmdit_diffusers_to_original(ref.state_dict())
    for p in ("weight", "bias"):
        sd[f"{key}.{p}"] = km.swap_halves(sd[f"{key}.{p}"])
    wrong = MMDiT(ours.config).eval()
    wrong.load_state_dict(sd, strict=True)
    got, want = run_both(ref, wrong, *inputs(ours.config))
    assert (got - want).abs().max() > 100 * 1e-4
    assert (got - want).abs().mean() > 0.01 * want.abs().mean()


def test_dual_attention_blocks_are_wider(pair):
    name, ref, ours = pair
    sd = ours.state_dict()
    c = ours.config.hidden_size
    for i in range(ours.config.depth):
        n = 9 if i in ours.config.dual_attention_layers else 6
        assert sd[f"joint_blocks.{i}.x_block.adaLN_modulation.1.weight"].shape == (n * c, c)
        assert (f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd) == (n == 9)
    last = f"joint_blocks.{ours.config.depth - 1}.context_block"
    assert sd[f"{last}.adaLN_modulation.1.weight"].shape == (2 * c, c)
    assert not any(k.startswith((f"{last}.mlp", f"{last}.attn.proj")) for k in sd)


def test_key_map_round_trips(pair):
    name, ref, ours = pair
    original = ours.state_dict()
    back = km.mmdit_diffusers_to_original(km.mmdit_original_to_diffusers(original))
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k
    # diffusers → ours → diffusers loads strictly into diffusers and gives its tensors back
    dsd = ref.state_dict()
    again = km.mmdit_original_to_diffusers(km.mmdit_diffusers_to_original(dsd))
    twin = diffusers.SD3Transformer2DModel(**km.mmdit_config_to_diffusers(ours.config,
                                                                          sample_size=8))
    twin.load_state_dict(again, strict=True)
    assert again.keys() == dsd.keys()
    for k in dsd:
        assert torch.equal(again[k], dsd[k]), k


def test_config_maps_and_detects_tiny(pair):
    name, ref, ours = pair
    assert ours.config == TINY_EXPECTED[name]
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert MMDiTConfig.detect(shapes) == TINY_EXPECTED[name]


@pytest.mark.parametrize("name", list(FULL))
def test_detect_full_size_from_diffusers_config(name):
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**FULL[name])
        shapes = {k: tuple(v.shape) for k, v in km.mmdit_diffusers_to_original(
            ref.state_dict()).items()}
        ours = MMDiT(FULL_EXPECTED[name])
    assert km.mmdit_config_from_diffusers(dict(ref.config)) == FULL_EXPECTED[name]
    assert MMDiTConfig.detect(shapes) == FULL_EXPECTED[name]
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def test_detect_tells_sd3_from_sd35_medium_by_table_size():
    base = {k: tuple(v.shape) for k, v in MMDiT(TINY_EXPECTED["sd3"]).state_dict().items()}
    bigger = dict(base, pos_embed=(1, 24 * 24, 128))
    assert MMDiTConfig.detect(bigger) == dataclasses.replace(TINY_EXPECTED["sd3"],
                                                             pos_embed_max_size=24)
    del bigger["context_embedder.weight"]
    with pytest.raises(ModelFileError, match="context_embedder.weight"):
        MMDiTConfig.detect(bigger)


def test_fresh_position_table_is_diffusers_sincos():
    cfg = TINY_EXPECTED["sd35_large"]
    # diffusers scales positions by max_size / (sample_size / patch); equal sizes make it 1
    ref = diffusers.SD3Transformer2DModel(**dict(TINY["sd35_large"], sample_size=24))
    torch.testing.assert_close(MMDiT(cfg).pos_embed, ref.pos_embed.pos_embed)


def test_bad_latent_sizes_are_refused(pair):
    name, ref, ours = pair
    x, t, ctx, y = inputs(ours.config)
    with pytest.raises(SdloomError, match="multiple of the MMDiT patch size"):
        ours(x[:, :, :7], t, ctx, y)
    m = ours.config.pos_embed_max_size
    with pytest.raises(SdloomError, match="larger than"):
        ours(torch.zeros(1, 16, 2 * m + 2, 2), t[:1], ctx[:1], y[:1])
