"""Tiled VAE decode/encode (tiled_vae.py): seams, bounds against untiled, any family's VAE."""
import pytest
import torch
import torch.nn.functional as F

import sdloom.pipelines.engine as engine_mod
from sdloom.checkpoints.load import load_model
from sdloom.config import VAEConfig
from sdloom.errors import SdloomError
from sdloom.models.vae import AutoencoderKL
from sdloom.pipelines.engine import EMBEDDED_MODEL, Engine
from sdloom.tiled_vae import (decode_tiled, encode_tiled, image_from_latent_tiled,
                              latent_from_image_tiled, spans)

from tiny import tiny_model


@pytest.fixture(scope="module")
def trained():
    """The embedded model's trained VAE (f = 8, 4 channels) and a smooth 256² image's latent:
    random weights would say nothing about seams a real VAE shows."""
    vae = load_model(EMBEDDED_MODEL, dtype=torch.float32, device=torch.device("cpu")).model.vae
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 6, 6, generator=g) * 2 - 1, size=(256, 256),
                      mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        ref = vae.decode(mean)
    return vae.eval(), x, mean, logvar, ref


@pytest.mark.parametrize("size,tile,overlap", [(32, 16, 4), (21, 8, 2), (27, 8, 3), (8, 16, 4),
                                               (17, 16, 8)])
def test_spans_cover_evenly_with_at_least_the_overlap(size, tile, overlap):
    sp = spans(size, tile, overlap)
    assert sp[0][0] == 0 and sp[-1][1] == size
    assert all(e - s == min(tile, size) for s, e in sp)
    assert all(a[1] - b[0] >= overlap for a, b in zip(sp, sp[1:]))


def test_blending_is_exact_for_a_local_decoder():
    # a "VAE" with no reach beyond its cell (×8 nearest upsampling of 3 channels): every blend
    # and overlap must give the untiled image exactly, in the right place
    class Local(torch.nn.Module):
        config = VAEConfig()

        def decode(self, z):
            return F.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(1, 4, 21, 27, generator=torch.Generator().manual_seed(3))
    ref = Local().decode(z)
    for blend in ("linear", "cosine", "none"):
        for overlap in (0, 2, 5):
            out = decode_tiled(Local(), z, tile=8, overlap=overlap, blend=blend)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def seam_error(out, ref, cuts, f=8, width=8):
    """Mean |out - ref| in `width`-pixel bands around the latent-cell positions `cuts`."""
    cols = torch.cat([torch.arange(c * f - width // 2, c * f + width // 2) for c in cuts])
    d = (out - ref).abs()
    return (d[..., :, cols].mean() + d[..., cols, :].mean()).item() / 2


def test_tiled_decode_is_close_to_untiled_and_the_ramps_hide_the_seams(trained):
    vae, _, z, _, ref = trained  # 32² latent, 256² image; tiles of 16² cells = 128² pixels
    with torch.no_grad():
        lin = decode_tiled(vae, z, tile=16, overlap=4)
        cut = decode_tiled(vae, z, tile=16, overlap=0)  # control: tiles butt, no blending
        exact = decode_tiled(vae, z, tile=16, overlap=4, norm_stats="whole", stats_side=32)
    assert lin.shape == ref.shape == (1, 3, 256, 256)
    d = (lin - ref).abs()
    # measured: max 0.587, mean 0.066 on a [-1, 1] image (per-tile GroupNorm statistics)
    assert d.max() < 0.7 and d.mean() < 0.08
    # measured: overlap 0 max 2.32; at its seam (cell 16) 0.33 vs 0.12 with the ramps
    assert (cut - ref).abs().max() > 1.5
    assert seam_error(cut, ref, [16]) > 2 * seam_error(lin, ref, [14, 16, 18])
    # whole-image GroupNorm statistics (the stats pass sees all 32² cells) halve the error:
    # measured mean 0.026 — what remains is tile-edge padding and the middle attention's reach
    assert (exact - ref).abs().mean() < 0.5 * d.mean()


def test_tiled_encode_is_close_and_draws_the_noise_once_for_the_whole_latent(trained):
    vae, x, mean, logvar, _ = trained
    with torch.no_grad():
        m, lv = encode_tiled(vae, x, tile=16, overlap=4)
        # measured: max 1.37, mean 0.077 against a latent std of 1.07
        assert m.shape == mean.shape and (m - mean).abs().mean() < 0.1
        assert (encode_tiled(vae, x, tile=16, overlap=0)[0] - mean).abs().mean() > \
            (m - mean).abs().mean()
        g = torch.Generator().manual_seed(7)
        zs = latent_from_image_tiled(vae, x, g, sample=True, tile=16, overlap=4)
        z0 = latent_from_image_tiled(vae, x, tile=16, overlap=4)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        sc = vae.config.scale_factor
        torch.testing.assert_close(zs, z0 + torch.exp(0.5 * lv) * eps * sc, atol=1e-5, rtol=1e-5)
        # one tile (tile ≥ latent): exactly the untiled sampled latent, same seed
        one = latent_from_image_tiled(vae, x, torch.Generator().manual_seed(7), sample=True,
                                      tile=32, overlap=4)
        untiled = vae.latent_from_image(x, torch.Generator().manual_seed(7), sample=True)
        torch.testing.assert_close(one, untiled, atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [
    # SD3-like: 16 channels, no quant convs, f = 8
    VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=8, z_channels=16,
              embed_dim=16, scale_factor=1.5305, shift_factor=0.0609, use_quant_conv=False),
    # f = 4
    VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8),
], ids=["16ch-f8", "4ch-f4"])
def test_any_vae_tiles_to_exact_sizes(cfg):
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    f, c = cfg.downscale, cfg.z_channels
    z = torch.randn(1, c, 21, 27, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = image_from_latent_tiled(vae, z, tile=8, overlap=2, factor=f)
        assert img.shape == (1, 3, 21 * f, 27 * f) and torch.isfinite(img).all()
        ref = vae.image_from_latent(z)
        # default-init random weights and 8-cell tiles are far from a real VAE, so no absolute
        # bound; but the order must hold: whole-image GroupNorm statistics < per-tile < no
        # overlap (measured 0.117 < 0.162 < 0.185 for 16ch-f8, 0.043 < 0.069 < 0.098 for f4)
        err = [(image_from_latent_tiled(vae, z, tile=8, factor=f, **kw) - ref).abs().mean()
               for kw in ({"overlap": 2, "norm_stats": "whole", "stats_side": 32},
                          {"overlap": 2}, {"overlap": 0})]
        assert err[0] < err[1] < err[2] and torch.isclose(err[1], (img - ref).abs().mean())
        x = img.clamp(-1, 1)
        lat = latent_from_image_tiled(vae, x, tile=8, overlap=2, factor=f)
        assert lat.shape == (1, c, 21, 27)
        # a size not a multiple of the factor: the encoder's own rounding down
        lat = latent_from_image_tiled(vae, x[..., :21 * f - 3, :], tile=8, overlap=2, factor=f)
        assert lat.shape == vae.latent_from_image(x[..., :21 * f - 3, :]).shape
        # one tile covering everything is the untiled pass, bit for bit
        torch.testing.assert_close(image_from_latent_tiled(vae, z, tile=32, factor=f), ref,
                                   atol=0, rtol=0)


def test_engine_tiles_above_its_pixel_threshold_and_by_option(monkeypatch):
    e = Engine(tiny_model())  # f = 8; a 16² latent is a 128² image
    calls = []
    real_dec, real_enc = engine_mod.image_from_latent_tiled, engine_mod.latent_from_image_tiled
    monkeypatch.setattr(engine_mod, "image_from_latent_tiled",
                        lambda *a, **k: calls.append(("dec", k)) or real_dec(*a, **k))
    monkeypatch.setattr(engine_mod, "latent_from_image_tiled",
                        lambda *a, **k: calls.append(("enc", k)) or real_enc(*a, **k))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    px = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    untiled = e.decode(z)
    e.vae_tile_pixels = 128 * 128  # not above: untiled
    assert torch.equal(e.decode(z), untiled) and e.encode(px, [1]).shape == (1, 4, 16, 16)
    assert calls == []
    e.vae_tile_pixels = 128 * 128 - 1
    e.vae_tile = (8, 2)
    tiled = e.decode(z)
    lat = e.encode(px, [1])
    assert [c for c, _ in calls] == ["dec", "enc"]
    assert calls[0][1] == {"tile": 8, "overlap": 2, "factor": 8}
    assert not torch.equal(tiled, untiled) and tiled.shape == untiled.shape
    with torch.no_grad():
        torch.testing.assert_close(tiled, image_from_latent_tiled(e.model.vae, z, tile=8,
                                                                  overlap=2))
    torch.testing.assert_close(lat, real_enc(e.model.vae, px, torch.Generator().manual_seed(1),
                                             sample=True, tile=8, overlap=2))
    calls.clear()
    e.vae_tiling = "off"
    assert torch.equal(e.decode(z), untiled) and calls == []
    e.vae_tiling, e.vae_tile_pixels = "on", 10**9
    e.decode(z)
    assert [c for c, _ in calls] == ["dec"]
    e.vae_tiling = "sometimes"
    with pytest.raises(SdloomError, match="vae_tiling"):
        e.decode(z)
