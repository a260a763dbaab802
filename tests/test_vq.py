"""VQ autoencoder (models/vq.py) vs diffusers `VQModel` on random weights: encode, code
indices, decode; LDM and diffusers key layouts; the vq-f4/vq-f8 configs; VQ training."""
import dataclasses
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdloom.checkpoints.load import load_vae_into, vae_source  # noqa: E402
from sdloom.checkpoints.save import save_safetensors  # noqa: E402
from sdloom.config import VAEConfig  # noqa: E402
from sdloom.errors import ModelFileError  # noqa: E402
from sdloom.families.keymaps.vae import vae_diffusers_to_ldm, vae_ldm_to_diffusers  # noqa: E402
from sdloom.families.ldsr import VQ_F4, VQ_F8, detect_vq  # noqa: E402
from sdloom.models.vq import VQModel  # noqa: E402

# two levels, attention at the second (as vq-f8 has at its last), 64 codes
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3,
                 num_groups=8, n_embed=64, attn_levels=(1,), scale_factor=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def diffusers_vq(cfg: VAEConfig):
    down = tuple("AttnDownEncoderBlock2D" if i in cfg.attn_levels else "DownEncoderBlock2D"
                 for i in range(len(cfg.ch_mult)))
    up = tuple(b.replace("DownEncoder", "UpDecoder") for b in reversed(down))
    return diffusers.VQModel(block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
                             down_block_types=down, up_block_types=up,
                             latent_channels=cfg.z_channels, vq_embed_dim=cfg.embed_dim,
                             num_vq_embeddings=cfg.n_embed, norm_num_groups=cfg.num_groups,
                             layers_per_block=cfg.num_res_blocks).eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = diffusers_vq(TINY)
    with torch.no_grad():  # spread the codebook so that nearest codes are well separated
        ref.quantize.embedding.weight.normal_(0, 1.0)
    ours = VQModel(TINY).eval()
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict()), strict=True)
    return ours, ref


def _run(ours, ref, x):
    with torch.no_grad():
        h, hd = ours.encode(x), ref.encode(x).latents
        idx, idx_ref = ours.quantize(h)[1], ref.quantize(hd)[2][2].view(h.shape[0], *h.shape[2:])
        return h, hd, idx, idx_ref, ours.decode(h), ref.decode(hd).sample


def test_vq_matches_diffusers(pair):
    ours, ref = pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    h, hd, idx, idx_ref, img, img_ref = _run(ours, ref, x)
    assert (h - hd).abs().max() < 1e-5
    assert torch.equal(idx, idx_ref)
    assert idx.unique().numel() > 3  # the test sees several codes, not one
    assert (img - img_ref).abs().max() < 1e-4
    # decode(quantize=False) skips the codebook: different from the quantised decode
    with torch.no_grad():
        assert (ours.decode(h, quantize=False) - img).abs().max() > 1e-3


def test_vq_negative_control(pair):
    """A perturbed weight (a level attention, which only VQ-f8-style configs have) breaks it."""
    ours, ref = pair
    bad = VQModel(TINY).eval()
    bad.load_state_dict(ours.state_dict())
    with torch.no_grad():
        bad.encoder.down[1].attn[0].q.weight.add_(0.05)
        bad.decoder.up[1].attn[0].k.weight.add_(0.05)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    h, hd, _, _, img, img_ref = _run(bad, ref, x)
    assert (h - hd).abs().max() > 1e-3
    with torch.no_grad():
        assert (bad.decode(hd) - img_ref).abs().max() > 1e-3


def test_nearest_code_and_straight_through():
    q = VQModel(TINY).quantize
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(64, 3))
    z = torch.randn(1, 3, 4, 5, requires_grad=True)
    zq, idx = q(z)
    d = ((z.detach().permute(0, 2, 3, 1)[..., None, :] - q.embedding.weight) ** 2).sum(-1)
    assert torch.equal(idx, d.argmin(-1))
    assert torch.allclose(zq, q.embedding.weight[idx].permute(0, 3, 1, 2))
    zq.sum().backward()  # straight-through: dz = 1
    assert torch.equal(z.grad, torch.ones_like(z))


def test_key_layouts_round_trip_and_detection(pair, tmp_path):
    ours, ref = pair
    sd = ours.state_dict()
    assert "quantize.embedding.weight" in sd and "encoder.down.1.attn.0.q.weight" in sd
    back = vae_ldm_to_diffusers(sd)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    cfg = detect_vq({k: tuple(v.shape) for k, v in sd.items()}, "")
    assert dataclasses.replace(cfg, num_groups=8) == TINY
    # a standalone LDM first-stage file (training leftovers under loss.*) and a diffusers one
    ldm = {**sd, "loss.discriminator.main.0.weight": torch.zeros(1)}
    save_safetensors(ldm, tmp_path / "vq-ldm.safetensors")
    save_safetensors(ref.state_dict(), tmp_path / "vq-diffusers.safetensors")
    for f in ("vq-ldm.safetensors", "vq-diffusers.safetensors"):
        got = vae_source(tmp_path / f)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_published_configs_build_with_ldm_shapes():
    with torch.device("meta"):
        f4, f8 = VQModel(VQ_F4), VQModel(VQ_F8)
    s4 = {k: tuple(v.shape) for k, v in f4.state_dict().items()}
    s8 = {k: tuple(v.shape) for k, v in f8.state_dict().items()}
    assert s4["quantize.embedding.weight"] == (8192, 3) and VQ_F4.downscale == 4
    assert s8["quantize.embedding.weight"] == (16384, 4) and VQ_F8.downscale == 8
    assert "encoder.down.3.attn.1.q.weight" in s8 and "decoder.up.3.attn.2.q.weight" in s8
    assert not any(".attn." in k for k in s4)  # vq-f4 has attention in the middle only
    assert s4["encoder.conv_out.weight"][0] == 3  # double_z off
    assert detect_vq(s4, "") == VQ_F4 and detect_vq(s8, "") == VQ_F8


def test_vq_file_into_ldsr_model(pair, tmp_path):
    """An LDM vq-f4-style file replaces an LDSR model's first stage (--vae), strictly."""
    from sdloom.families.ldsr import LDSRFamily, PRESETS
    ours, _ = pair
    cfg = PRESETS["ldsr"].replace(vae=TINY, unet=dataclasses.replace(
        PRESETS["ldsr"].unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        transformer_depth=(0, 1), num_groups=8))
    model = LDSRFamily().build(cfg)
    save_safetensors(ours.state_dict(), tmp_path / "vq.safetensors")
    load_vae_into(model, tmp_path / "vq.safetensors")
    assert torch.equal(model.vae.quantize.embedding.weight, ours.quantize.embedding.weight)
    wrong = {k: v for k, v in ours.state_dict().items() if "attn" not in k}
    save_safetensors(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFileError, match="missing"):
        load_vae_into(model, tmp_path / "wrong.safetensors")
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["vae"]["n_embed"] == 64


# ---------------------------------------------------------------- training

def _shapes_data(root):
    from PIL import Image, ImageDraw
    root.mkdir(parents=True)
    rows = []
    for i, rgb in enumerate([(220, 30, 30), (30, 180, 60), (40, 60, 220), (240, 220, 30)]):
        for j, box in enumerate([(4, 4, 28, 28), (10, 6, 22, 26)]):
            im = Image.new("RGB", (32, 32), "white")
            (ImageDraw.Draw(im).ellipse if j else ImageDraw.Draw(im).rectangle)(box, fill=rgb)
            im.save(root / f"{i}-{j}.png")
            rows.append({"file_name": f"{i}-{j}.png", "text": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory):
    """A tiny LDSR-family model (what=vae trains its VQ first stage) saved as a file."""
    from sdloom.checkpoints.save import save_model
    from sdloom.families.ldsr import LDSRFamily, PRESETS
    base = PRESETS["ldsr"]
    cfg = base.replace(vae=TINY, default_size=64, unet=dataclasses.replace(
        base.unet, model_channels=16, channel_mult=(1,), num_res_blocks=1,
        transformer_depth=(0,), transformer_depth_middle=0, num_groups=8))
    torch.manual_seed(0)
    model = LDSRFamily().build(cfg)
    root = tmp_path_factory.mktemp("vqtrain")
    save_model(model, cfg, root / "tiny-ldsr.safetensors")
    return root / "tiny-ldsr.safetensors", _shapes_data(root / "data")


def _train_cfg(path, **kw):
    from sdloom.training.config import TrainConfig
    base = dict(what="vae", model=str(path), resolution=32, batch_size=4, lr=3e-3, warmup=2,
                steps=24, save_every=1000, log_every=4, caption_dropout=0.0, seed=1,
                rec_loss="l2")
    return TrainConfig().override({**base, **kw})


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_vq_training_loss_falls_and_usage_is_logged(vq_file, tmp_path, ema):
    from sdloom.checkpoints.load import load_model
    from sdloom.training.train import train
    path, data = vq_file
    before = load_model(path).model.vae.quantize.embedding.weight.clone()
    res = train(_train_cfg(path, vq_ema=ema), data, tmp_path, progress=False)
    losses = res["losses"]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("vq_perplexity" in r and 0 < r["vq_codes_used"] <= 1 for r in rows)
    assert rows[-1]["vq_perplexity"] >= 1.0
    assert rows[-1]["vq_codes_used"] * TINY.n_embed == pytest.approx(
        round(rows[-1]["vq_codes_used"] * TINY.n_embed))  # a count of codes
    m = load_model(tmp_path / "model.safetensors").model
    assert m.config.vae.scale_factor == 1.0  # VQ latents are not rescaled
    moved = (m.vae.quantize.embedding.weight - before).abs().max()
    assert moved > 1e-3  # trained by its loss, or set by its EMA
    st = torch.load(next((tmp_path / "states").iterdir()) / "trainer.pt", weights_only=True)
    assert ("vq" in st) == (ema > 0)


def test_vq_commitment_and_codebook_terms():
    """The loss equals rec + ‖sg[z] − e‖² + β‖z − sg[e]‖², gradients: the codebook term moves
    only the codebook, the commitment term only the encoder."""
    from sdloom.training.vq_train import VQLoss
    torch.manual_seed(0)
    vq = VQModel(TINY)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss_fn = VQLoss(vq, "l2", beta=0.25)
    loss, rec = loss_fn(vq, x)
    with torch.no_grad():
        z = vq.encode(x)
        e = vq.quantize.lookup(vq.quantize.indices(z))
        want = (vq.decode(z) - x).pow(2).mean() + 1.25 * (z - e).pow(2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert loss_fn.usage()["vq_codes_used"] == pytest.approx(
        e.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0).shape[0] / 64)
    assert loss_fn.usage() == {}  # reset after reading


def test_vq_ema_resume_reproduces_the_run(vq_file, tmp_path):
    """The EMA codebook (not an optimizer parameter) and the restarts' running usage come back
    from the training state."""
    from sdloom.checkpoints.load import load_model
    from sdloom.training.train import train
    path, data = vq_file
    c = _train_cfg(path, vq_ema=0.9, vq_restart=0.5, steps=4, log_every=1, save_every=2,
                   warmup=0)
    full = train(c, data, tmp_path / "a", progress=False)["losses"]
    train(c, data, tmp_path / "b", progress=False, stop_after=2)
    rest = train(c, data, tmp_path / "b", resume=True, progress=False)["losses"]
    assert rest == pytest.approx(full[2:], rel=1e-5)
    wa, wb = (load_model(tmp_path / d / "model.safetensors").model.vae.quantize.embedding.weight
              for d in "ab")
    assert torch.allclose(wa, wb, atol=1e-6)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_dead_codes_restart_on_batch_latents(ema):
    """A codebook whose entries all sit far from the latents: one training pass with restarts
    moves the unused codes onto latents of the batch, so the next pass uses many codes; without
    restarts it stays at one."""
    from sdloom.training.vq_train import VQLoss
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    used = []
    for restart in (0.0, 0.5):
        vq = VQModel(TINY)
        with torch.no_grad():
            vq.quantize.embedding.weight.fill_(100.0)
            vq.quantize.embedding.weight[0].zero_()  # the one code anything is near
        loss_fn = VQLoss(vq, "l2", 0.25, ema_decay=ema, restart=restart).train()
        loss_fn(vq, x)
        with torch.no_grad():
            used.append(vq.quantize.indices(vq.encode(x)).unique().numel())
    assert used[0] == 1 and used[1] > 20
