"""VAE parity with diffusers' AutoencoderKL on random weights, through our key map."""
import dataclasses
import re

import pytest
import torch

import diffusers  # noqa: E402  (a test requirement: missing, the test fails)

from sdloom.families.keymaps import vae as km  # noqa: E402
from sdloom.config import VAEConfig  # noqa: E402
from sdloom.families.sd_presets import VAE_SD  # noqa: E402
from sdloom.models.vae import AutoencoderKL  # noqa: E402

from conftest import randomize_  # noqa: E402

# three levels with equal widths at the bottom: decoder up.1 and up.2 have the same shapes, so
# only the numbers can tell a wrong level order
TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8)


# SD3/SD3.5's 16-channel VAE: no quant convs, z = (x - 0.0609) * 1.5305
TINY_SD3 = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8, z_channels=16,
                     embed_dim=16, scale_factor=1.5305, shift_factor=0.0609, use_quant_conv=False)


def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    n = len(cfg.ch_mult)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
        norm_num_groups=cfg.num_groups, scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor, use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_quant_conv)
    return randomize_(ref, seed).eval()


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_vae(TINY)
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(km.vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    return ref, ours


def image(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latent(seed: int = 2, channels: int = 4) -> torch.Tensor:
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_parity(ref, ours, x, z):
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=1e-4)
        want = ref.decode(z).sample
        assert want.abs().mean() > 0.1  # not a degenerate output that anything would match
        torch.testing.assert_close(ours.decode(z), want, atol=1e-4, rtol=1e-4)


def test_encode_decode_match_diffusers(pair):
    ref, ours = pair
    assert_parity(ref, ours, image(), latent())


def test_ldm_key_names_and_round_trip(pair):
    ref, _ = pair
    sd = ref.state_dict()
    ldm = km.vae_diffusers_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(ldm["encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       sd["encoder.mid_block.attentions.0.to_out.0.weight"])
    # up_blocks.0 (run first) is LDM's lowest resolution level, up.{n-1}
    assert torch.equal(ldm["decoder.up.2.block.0.conv1.weight"],
                       sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ldm["decoder.up.0.block.0.nin_shortcut.weight"],
                       sd["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"])
    assert "decoder.up.2.upsample.conv.weight" in ldm
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert "encoder.down.2.downsample.conv.weight" not in ldm
    back = km.vae_ldm_to_diffusers(ldm)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_legacy_diffusers_attention_names_are_read(pair):
    ref, ours = pair
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in ref.state_dict().items():
        for new, name in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    ldm = km.vae_diffusers_to_ldm(old)
    want = ours.state_dict()
    assert set(ldm) == set(want) and all(torch.equal(ldm[k], want[k]) for k in want)


def test_one_wrong_table_entry_breaks_parity(pair, monkeypatch):
    ref, _ = pair
    x, z = image(), latent()
    # q ⇄ k: same shapes, so the strict load succeeds and only the numbers differ
    swapped = {"to_q": "k", "to_k": "q"}
    monkeypatch.setattr(km, "LEAF", [(a, swapped.get(a, b)) for a, b in km.LEAF])
    bad = AutoencoderKL(TINY).eval()
    bad.load_state_dict(km.vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    with pytest.raises(AssertionError):
        assert_parity(ref, bad, x, z)
    monkeypatch.undo()
    # decoder levels not reversed: up.1 ⇄ up.2 have equal shapes here
    orig = km._prefix_pairs

    def swap_levels(n_down, n_up):
        flip = {"1": "2", "2": "1"}
        return [(d, re.sub(r"^decoder\.up\.([12])\.", lambda m: f"decoder.up.{flip[m[1]]}.", l))
                for d, l in orig(n_down, n_up)]
    monkeypatch.setattr(km, "_prefix_pairs", swap_levels)
    bad = AutoencoderKL(TINY).eval()
    bad.load_state_dict(km.vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert not torch.allclose(bad.decode(z), ref.decode(z).sample, atol=1e-2)


def test_full_size_layout_on_meta_matches_diffusers():
    # SD's VAE as published: 248 tensors, 83,653,863 parameters; built without memory
    with torch.device("meta"):
        ours = AutoencoderKL(VAE_SD)
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    assert all(p.is_meta for p in ours.parameters())
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in km.vae_diffusers_to_ldm(ref.state_dict()).items()}
    assert mine == theirs
    assert len(mine) == 248 and sum(p.numel() for p in ours.parameters()) == 83_653_863
    # names as in `first_stage_model.*` of the SD 1.x checkpoints
    assert mine["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert mine["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert mine["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert mine["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert mine["quant_conv.weight"] == (8, 8, 1, 1)


def test_logvar_is_clamped_like_ldm(pair):
    ref, ours = pair
    x = image()
    saved = ours.quant_conv.bias.detach().clone(), ref.quant_conv.bias.detach().clone()
    with torch.no_grad():
        ours.quant_conv.bias[4:] += 1000.0
        ref.quant_conv.bias[4:] += 1000.0
        try:
            _, logvar = ours.encode(x)
            torch.testing.assert_close(logvar, ref.encode(x).latent_dist.logvar)
        finally:
            ours.quant_conv.bias.copy_(saved[0])
            ref.quant_conv.bias.copy_(saved[1])
    assert (logvar == 20.0).all()


def test_latent_scaling_shift_and_seeded_sampling():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=8,
                    scale_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    randomize_(vae, 3)
    x = image(size=16)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        torch.testing.assert_close(vae.latent_from_image(x), (mean - 0.1159) * 0.3611)
        a = vae.latent_from_image(x, torch.Generator().manual_seed(3), sample=True)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, (mean + (0.5 * logvar).exp() * eps - 0.1159) * 0.3611)
        c = vae.latent_from_image(x, torch.Generator().manual_seed(4), sample=True)
        assert not torch.allclose(a, c)
        torch.testing.assert_close(vae.image_from_latent(a), vae.decode(a / 0.3611 + 0.1159))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(pair, dtype):
    _, ours = pair
    low = AutoencoderKL(TINY).eval()
    low.load_state_dict(ours.state_dict())
    low.to(dtype)
    x, z = image(), latent()
    with torch.no_grad():
        want = ours.decode(z)
        got = low.decode(z.to(dtype))
        mean = low.encode(x.to(dtype))[0]
    assert got.dtype == dtype and mean.dtype == dtype
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.05


@pytest.fixture(scope="module")
def sd3_pair():
    ref = diffusers_vae(TINY_SD3, seed=5)
    ours = AutoencoderKL(TINY_SD3).eval()
    ours.load_state_dict(km.vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    return ref, ours


def test_sd3_vae_without_quant_convs_matches_diffusers(sd3_pair):
    ref, ours = sd3_pair
    assert not any("quant_conv" in k for k in ref.state_dict())
    assert not any("quant_conv" in k for k in ours.state_dict())
    assert ours.state_dict()["encoder.conv_out.weight"].shape == (32, 64, 3, 3)
    assert_parity(ref, ours, image(), latent(channels=16))
    # the key map round-trips a folder without quant convs
    sd = ref.state_dict()
    back = km.vae_ldm_to_diffusers(km.vae_diffusers_to_ldm(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # ... and an SD1-style model refuses it, naming the missing convs
    sd1_shaped = AutoencoderKL(dataclasses.replace(TINY_SD3, use_quant_conv=True))
    with pytest.raises(RuntimeError, match="post_quant_conv.weight"):
        sd1_shaped.load_state_dict(km.vae_diffusers_to_ldm(sd), strict=True)


def sd3_latent_pair(ref, ours, x, z):
    """(ours, diffusers' SD3 convention) for encode and decode, in fp32."""
    s, k = ref.config.shift_factor, ref.config.scaling_factor
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        # as diffusers' StableDiffusion3Pipeline applies them
        enc = (ours.latent_from_image(x), (mean - s) * k)
        dec = (ours.image_from_latent(z), ref.decode(z / k + s).sample)
    return enc, dec, mean


def test_sd3_latent_scale_and_shift_match_diffusers(sd3_pair):
    ref, ours = sd3_pair
    assert (ref.config.scaling_factor, ref.config.shift_factor) == (1.5305, 0.0609)
    enc, dec, _ = sd3_latent_pair(ref, ours, image(), latent(channels=16))
    torch.testing.assert_close(*enc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(*dec, atol=1e-4, rtol=1e-4)
    assert dec[1].abs().mean() > 0.1


def test_sd3_scale_shift_order_is_observable(sd3_pair):
    # the parity test above means something only if the other orders give other numbers here
    ref, ours = sd3_pair
    s, k = 0.0609, 1.5305
    x, z = image(), latent(channels=16)
    enc, dec, mean = sd3_latent_pair(ref, ours, x, z)
    with torch.no_grad():
        wrong_enc = mean * k - s  # scale, then shift
        wrong_dec = ref.decode((z + s) / k).sample  # inverse of the wrong order
        unshifted = ref.decode(z / k).sample  # shift forgotten
    for wrong, (got, _) in ((wrong_enc, enc), (wrong_dec, dec), (unshifted, dec)):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, wrong, atol=1e-4, rtol=1e-4)
    # encode: the two orders differ by the constant shift·(1 - scale)
    torch.testing.assert_close(enc[0] - wrong_enc, torch.full_like(mean, s * (1 - k)),
                               atol=1e-4, rtol=0)


def test_vae_without_quant_conv_needs_equal_widths():
    with pytest.raises(ValueError, match="embed_dim == z_channels"):
        AutoencoderKL(dataclasses.replace(TINY_SD3, embed_dim=4))


def test_sd3_full_size_layout_on_meta_matches_diffusers():
    cfg = dataclasses.replace(VAE_SD, z_channels=16, embed_dim=16, scale_factor=1.5305,
                              shift_factor=0.0609, use_quant_conv=False)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False)
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in km.vae_diffusers_to_ldm(ref.state_dict()).items()}
    assert mine == theirs
    # SD3's VAE: SD's 248 tensors less the 4 of the quant convs
    assert len(mine) == 244 and sum(p.numel() for p in ours.parameters()) == 83_819_683
    assert mine["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert mine["decoder.conv_in.weight"] == (512, 16, 3, 3)
