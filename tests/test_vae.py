"""VAE parity with diffusers' AutoencoderKL on random weights, through our key map."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdloom.checkpoints.keymaps import vae as km  # noqa: E402
from sdloom.checkpoints.load import vae_config_from_diffusers  # noqa: E402
from sdloom.models.vae import AutoencoderKL  # noqa: E402

from conftest import randomize_  # noqa: E402


def make_pair(seed=0):
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3,
                                  latent_channels=4, norm_num_groups=16)
    randomize_(ref, seed).eval()
    cfg = vae_config_from_diffusers(dict(ref.config), sdxl=False)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(km.vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    return ref, ours


def test_vae_encode_decode_match_diffusers():
    ref, ours = make_pair()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=1e-4)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        want = ref.decode(z).sample
        assert want.abs().mean() > 0.1
        torch.testing.assert_close(ours.decode(z), want, atol=1e-4, rtol=1e-4)


def test_vae_keymap_round_trip_and_wrong_entry_fails(monkeypatch):
    ref, _ = make_pair()
    sd = ref.state_dict()
    ldm = km.vae_diffusers_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "decoder.up.2.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    back = km.vae_ldm_to_diffusers(ldm)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # q and k swapped: same shapes, different numbers
    monkeypatch.setattr(km, "LEAF", [("to_q", "k") if a == "to_q" else ("to_k", "q") if a == "to_k"
                                     else (a, b) for a, b in km.LEAF])
    bad = AutoencoderKL(make_pair()[1].config).eval()
    bad.load_state_dict(km.vae_diffusers_to_ldm(sd), strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(bad.encode(x)[0], ref.encode(x).latent_dist.mean, atol=1e-3)


def test_latent_scaling_and_seeded_sampling():
    _, ours = make_pair()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(ours.latent_from_image(x), mean * 0.18215)
        a = ours.latent_from_image(x, torch.Generator().manual_seed(3), sample=True)
        b = ours.latent_from_image(x, torch.Generator().manual_seed(3), sample=True)
        c = ours.latent_from_image(x, torch.Generator().manual_seed(4), sample=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
