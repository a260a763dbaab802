"""U-Net parity with diffusers' UNet2DConditionModel on random weights, through our key map."""
import pytest
import torch

import diffusers  # noqa: E402  (a test requirement: missing, the test fails)

from sdloom.families.keymaps import unet as km  # noqa: E402
from sdloom.config import UNetConfig  # noqa: E402
from sdloom.models.unet import UNetModel, sdxl_adm, timestep_embedding  # noqa: E402

from conftest import randomize_  # noqa: E402

TINY = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=40,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=48,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=16 + 6 * 256),
    "sd1-inpaint": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
                        in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
}


def make_pair(name: str, seed: int = 0):
    kw = dict(TINY[name])
    kw.setdefault("in_channels", 4)
    ref = diffusers.UNet2DConditionModel(sample_size=16, out_channels=4, norm_num_groups=8, **kw)
    randomize_(ref, seed).eval()
    cfg = km.unet_config_from_diffusers(dict(ref.config))
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(km.unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours, cfg


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1, size: tuple[int, int] = (16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 37.5][:batch])
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-inpaint"])
def test_unet_matches_diffusers(name):
    ref, ours, cfg = make_pair(name)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# latents whose sides do not halve evenly at every level: 136×128 px (17×16), 200×152 px
# (25×19), 600×600 px (75×75, here 15×15 for two levels); diffusers upsamples to the skip size
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("size", [(17, 16), (19, 25), (15, 15)])
def test_unet_matches_diffusers_at_any_latent_size(name, size):
    ref, ours, cfg = make_pair(name)
    x, t, ctx = inputs(cfg, size=size)
    kw = {}
    y = None
    if cfg.adm_in_channels:
        pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
        kw["added_cond_kwargs"] = {"text_embeds": pooled,
                                   "time_ids": torch.tensor([[136.0, 128.0, 0, 0, 136, 128]] * 2)}
        y = sdxl_adm(pooled, (136, 128), (0, 0), (136, 128))
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, **kw).sample
        got = ours(x, t, ctx, y=y)
    assert got.shape == x.shape[:1] + (4,) + x.shape[2:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sdxl_unet_matches_diffusers_with_size_conditioning():
    ref, ours, cfg = make_pair("sdxl")
    assert cfg.adm_in_channels == 16 + 6 * 256 and cfg.transformer_depth == (0, 1, 2)
    x, t, ctx = inputs(cfg)
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0]] * 2)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        y = sdxl_adm(pooled, (1024, 768), (0, 16), (1024, 768))
        got = ours(x, t, ctx, y=y)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_keymap_round_trip_and_one_wrong_entry_breaks_parity(monkeypatch):
    ref, ours, cfg = make_pair("sd2")
    sd = ref.state_dict()
    back = km.unet_ldm_to_diffusers(km.unet_diffusers_to_ldm(sd, cfg), cfg)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # swap the two resnets of the first level: the shapes still fit, the numbers must not
    orig = km.unet_prefix_table

    def swapped(c):
        rows = orig(c)
        i = rows.index(("down_blocks.0.resnets.0", "input_blocks.1.0", True))
        j = rows.index(("down_blocks.0.resnets.1", "input_blocks.2.0", True))
        rows[i], rows[j] = (rows[i][0], rows[j][1], True), (rows[j][0], rows[i][1], True)
        return rows

    monkeypatch.setattr(km, "unet_prefix_table", swapped)
    bad = UNetModel(cfg).eval()
    bad.load_state_dict(km.unet_diffusers_to_ldm(sd, cfg), strict=True)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        assert not torch.allclose(bad(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample,
                                  atol=1e-3)


def test_timestep_embedding_cos_first():
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert abs(e[1, 0].item() - torch.cos(torch.tensor(1.0)).item()) < 1e-6
