"""LDSR (families/ldsr.py) vs diffusers `LDMSuperResolutionPipeline` on a tiny random model:
the whole upscale at eta 0 (the pipeline itself) and eta 1 (diffusers' U-Net, DDIMScheduler
and VQModel stepped with the same noise), the original single-file layout, diffusers folders
both ways, LDM's patch blending, and the upscaler registry."""
import dataclasses
import shutil

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from sdloom import upscalers  # noqa: E402
from sdloom.checkpoints.load import load_model, open_model_source  # noqa: E402
from sdloom.checkpoints.save import convert, save_model  # noqa: E402
from sdloom.errors import SdloomError  # noqa: E402
from sdloom.families import FAMILIES, detect  # noqa: E402
from sdloom.families.base import DetectionError  # noqa: E402
from sdloom.families.ldsr import (PRESETS, LDSRFamily, ddim_sigmas, sample_latents,  # noqa: E402
                                  split_apply)
from sdloom.sampling.schedules import DiscreteSchedule  # noqa: E402

STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def tiny_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        attention_head_dim=16, norm_num_groups=8)
    vq = diffusers.VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, vq_embed_dim=3,
        num_vq_embeddings=64, norm_num_groups=8, layers_per_block=1)
    with torch.no_grad():  # zero-initialised layers would hide mistakes: randomise all
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        vq.quantize.embedding.weight.normal_(0, 1.0)
    sched = diffusers.DDIMScheduler(beta_start=0.0015, beta_end=0.0155,
                                    beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=False, steps_offset=1)
    return diffusers.LDMSuperResolutionPipeline(vqvae=vq.eval(), unet=unet.eval(),
                                                scheduler=sched)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("ldsr") / "ldsr-diffusers"
    pipe.save_pretrained(folder)
    return load_model(folder).model, pipe, folder


def _low(seed=1, size=16):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _ours(model, low, seed, eta):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 3, *low.shape[-2:]), generator=g)
    z = sample_latents(model, low, noise, steps=STEPS, eta=eta, generator=g)
    with torch.no_grad():
        return z, (model.vae.image_from_latent(z).clamp(-1, 1) + 1) / 2


def test_config_from_folder(pair):
    model, _, _ = pair
    cfg = model.config
    assert cfg.family == "ldsr" and cfg.text_encoders == () and cfg.prediction == "eps"
    assert cfg.unet.in_channels == 6 and cfg.unet.transformer_depth == (0, 1)
    assert cfg.unet.num_head_channels == 16 and not cfg.unet.use_spatial_transformer
    assert cfg.vae.n_embed == 64 and cfg.vae.scale_factor == 1.0
    assert (cfg.linear_start, cfg.linear_end) == (0.0015, 0.0155)


def test_whole_upscale_matches_pipeline_eta0(pair):
    model, pipe, _ = pair
    low = _low()
    ref = pipe(low, num_inference_steps=STEPS, eta=0.0, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images
    _, img = _ours(model, low, 3, 0.0)
    assert img.shape == ref.shape == (1, 3, 32, 32)
    assert (img - ref).abs().max() < 1e-4


def _diffusers_loop(pipe, low, seed: int, eta: float):
    """The pipeline's loop with DDIMScheduler.step's variance noise from one generator, in the
    order sdloom draws it (start noise, then one draw per step)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((1, 3, *low.shape[-2:]), generator=g)
    pipe.scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.unet(torch.cat([lat, low], 1), t).sample
            noise = torch.randn(lat.shape, generator=g)
            lat = pipe.scheduler.step(eps, t, lat, eta=eta, variance_noise=noise).prev_sample
        return lat, (pipe.vqvae.decode(lat).sample.clamp(-1, 1) + 1) / 2


def test_eta1_matches_diffusers_ddim(pair):
    """A1111's LDSR runs eta 1: the same noise gives the same latent and image."""
    model, pipe, _ = pair
    low = _low(2)
    lat, ref = _diffusers_loop(pipe, low, 5, 1.0)
    z, img = _ours(model, low, 5, 1.0)
    assert (z - lat).abs().max() / lat.abs().max() < 1e-5
    assert (img - ref).abs().max() < 1e-4
    _, img0 = _ours(model, low, 5, 0.0)
    assert (img0 - img).abs().max() > 1e-2  # eta matters


def test_negative_control_attention_heads(pair):
    """A perturbed weight breaks the match: a per-head qkv block of the lowest level's legacy
    attention (wrong interleaving would break it the same way)."""
    model, pipe, _ = pair
    bad = LDSRFamily().build(model.config)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.unet.input_blocks[3][1].qkv.weight[16:32].mul_(1.5)  # head 0's k only
    low = _low()
    lat, _ = _diffusers_loop(pipe, low, 3, 0.0)
    z_good, _ = _ours(model, low, 3, 0.0)
    z_bad, _ = _ours(bad.eval(), low, 3, 0.0)
    assert (z_good - lat).abs().max() / lat.abs().max() < 1e-5
    assert (z_bad - lat).abs().max() / lat.abs().max() > 1e-3


def test_single_file_layout_detection_and_ckpt(pair, tmp_path):
    """The original layout (model.diffusion_model.*, first_stage_model.*, EMA and schedule
    buffers) in a .ckpt through the safe loader: detected from shapes, loads, same weights."""
    model, _, _ = pair
    sd = model.state_dict()
    assert "model.diffusion_model.input_blocks.3.1.qkv.weight" in sd
    assert "first_stage_model.quantize.embedding.weight" in sd
    extra = {"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000),
             "model_ema.decay": torch.tensor(0.999),
             "model_ema.input_blocks00weight": sd["model.diffusion_model.input_blocks.0.0.weight"]}
    torch.save({"state_dict": {**sd, **extra}, "global_step": 1}, tmp_path / "model.ckpt")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg = detect(shapes)
    assert cfg.family == "ldsr" and cfg.unet.num_head_channels == 32  # LDSR's convention
    assert LDSRFamily().config_problems(model.config, shapes) == []  # groups, heads aside
    wrong = dataclasses.replace(model.config, vae=dataclasses.replace(model.config.vae,
                                                                      n_embed=65))
    assert "vae.n_embed is 65" in LDSRFamily().config_problems(wrong, shapes)[0]
    assert next(f for f in FAMILIES if f.claims(shapes)).names == ("ldsr",)
    loaded = load_model(tmp_path / "model.ckpt").model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    broken = {k: v for k, v in shapes.items() if "middle_block.0.out_layers.3" not in k}
    with pytest.raises(DetectionError):
        LDSRFamily().detect({k: v for k, v in broken.items() if "out.2" not in k})


def test_convert_to_diffusers_and_back(pair, tmp_path):
    """sdloom's own file → a diffusers folder that diffusers loads and runs identically."""
    model, pipe, _ = pair
    save_model(model, model.config, tmp_path / "ldsr.safetensors")
    convert(tmp_path / "ldsr.safetensors", tmp_path / "out")
    back = diffusers.LDMSuperResolutionPipeline.from_pretrained(tmp_path / "out")
    low = _low(4)
    kw = dict(num_inference_steps=3, eta=0.0, output_type="pt")
    a = back(low, generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe(low, generator=torch.Generator().manual_seed(1), **kw).images
    assert (a - b).abs().max() < 1e-5
    cfg, src = open_model_source(tmp_path / "out")
    assert cfg == model.config
    assert all(torch.equal(src.get(k), v) for k, v in model.state_dict().items())


def test_ddim_timesteps_as_ldm():
    sched = DiscreteSchedule.scaled_linear(1000, 0.0015, 0.0155)
    s = ddim_sigmas(100, sched)
    t = sched.sigma_to_t(s).round().long().tolist()
    assert len(s) == 101 and t[:2] == [991, 981] and t[-2:] == [1, 0]
    assert float(s[-1]) == pytest.approx(((1 - (1 - 0.0015)) / (1 - 0.0015)) ** 0.5, rel=1e-4)


def test_split_apply_blends_to_the_whole():
    """Patches (LDM's unfold/weights/fold) of a pointwise fn give the fn of the whole image, for
    the U-Net's 1× and the decoder's f× patches; uncovered sizes are refused."""
    x = torch.randn(1, 2, 64, 96)
    c = torch.randn(1, 1, 64, 96)
    out = split_apply(lambda a, b: a * b + 1, [x, c], tile=32, stride=16)
    assert torch.allclose(out, x * c + 1, atol=1e-5)
    up = split_apply(lambda a: torch.nn.functional.interpolate(a, scale_factor=4.0), [x],
                     tile=32, stride=16, scale=4)
    assert torch.allclose(up, torch.nn.functional.interpolate(x, scale_factor=4.0), atol=1e-5)
    # a fn that sees where it is (patch-local coordinates) blends differently from the whole
    ramp = split_apply(lambda a: a + torch.arange(a.shape[-1]).float(), [x], tile=32, stride=16)
    assert (ramp - (x + torch.arange(96).float())).abs().max() > 1
    with pytest.raises(SdloomError, match="pad"):
        split_apply(lambda a: a, [torch.zeros(1, 1, 40, 40)], tile=32, stride=16)


def test_tiled_sampling_close_to_whole(pair):
    """The U-Net over 2×2 overlapping patches (a 24-cell latent in 16-cell tiles) stays close
    to the untiled result on a smooth image, and is not identical to it."""
    model, _, _ = pair
    low = torch.nn.functional.interpolate(_low(6, 8), size=(24, 24), mode="bilinear")
    noise = torch.randn((1, 3, 24, 24), generator=torch.Generator().manual_seed(0))
    whole = sample_latents(model, low, noise, steps=2, eta=0.0)
    tiled = sample_latents(model, low, noise, steps=2, eta=0.0, tile=16, stride=8)
    diff = (whole - tiled).abs().max() / whole.abs().max()
    assert 0 < diff < 0.5


def test_registry_lists_and_runs_ldsr(pair, tmp_path, monkeypatch):
    """A1111's models/LDSR layout (a folder with model.ckpt + project.yaml) and a diffusers
    folder in the upscaler dir are entries; LDSR upscales 16² to 32² (its factor 2 here) with
    A1111's pre-resize, through the registry hires fix, extras and the CLI use."""
    model, _, folder = pair
    d = tmp_path / "upscalers"
    (d / "LDSR").mkdir(parents=True)
    save_model(model, model.config, d / "LDSR" / "model.safetensors")  # exact config
    (d / "LDSR" / "project.yaml").write_text("model: {}\n")
    (d / "junk").mkdir()
    shutil.copytree(folder, d / "ldsr-diffusers")
    names = {e.name: e for e in upscalers.available(d)}
    assert names["LDSR"].ldsr and names["LDSR"].scale == 2
    assert names["ldsr-diffusers"].ldsr and "junk" not in names
    monkeypatch.setattr(upscalers, "LDSR_STEPS", 1)  # A1111's ldsr_steps option (100)
    img = Image.new("RGB", (16, 12), (200, 40, 90))
    out = upscalers.upscale(img, "ldsr", 32, 24, upscaler_dir=d, device="cpu")
    assert out.size == (32, 24)
    # the model ran (a flat image does not come back flat from random weights)
    assert len(set(out.getchannel("R").tobytes())) > 4
    assert PRESETS["ldsr"].unet.model_channels == 160


def test_published_sizes_map_both_ways():
    """The published LDSR (bsr_sr project.yaml) and diffusers' LDMSuperResolutionPipeline at
    the published config (CompVis/ldm-super-resolution-4x-openimages), on the meta device:
    every diffusers tensor maps onto the preset's model with its shape, and shapes alone
    detect the preset."""
    from sdloom.families.keymaps.unet import unet_diffusers_to_ldm
    from sdloom.families.keymaps.vae import vae_diffusers_to_ldm
    from sdloom.families.ldsr import _heads, _qkv_from_diffusers
    preset = PRESETS["ldsr"]
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(
            sample_size=64, in_channels=6, out_channels=3, block_out_channels=(160, 320, 320, 640),
            down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, layers_per_block=2,
            attention_head_dim=32)
        vq = diffusers.VQModel(
            block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3, vq_embed_dim=3,
            num_vq_embeddings=8192, layers_per_block=2)
        ours = LDSRFamily().build(preset)
    want = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {"model.diffusion_model." + k: tuple(v.shape) for k, v in _qkv_from_diffusers(
        unet_diffusers_to_ldm(unet.state_dict(), preset.unet), _heads(preset.unet)).items()}
    got.update({"first_stage_model." + k: tuple(v.shape)
                for k, v in vae_diffusers_to_ldm(vq.state_dict()).items()})
    assert got == want
    assert want["model.diffusion_model.input_blocks.10.1.qkv.weight"] == (1920, 640, 1)
    assert detect(want) == preset.replace(name="")
    n = sum(v.numel() for v in ours.unet.parameters())
    assert n == sum(v.numel() for v in unet.parameters()) == 113_622_563


def test_unet_training_on_vq_latents(pair, tmp_path):
    """`sdloom train what=unet` on an LDSR model: ε on the VQ latents with the batch made f×
    smaller as the concatenated input; the loss falls and the saved model upscales."""
    from sdloom.training.config import TrainConfig
    from sdloom.training.train import train
    from test_vq import _shapes_data
    model, _, _ = pair
    save_model(model, model.config, tmp_path / "init.safetensors")
    data = _shapes_data(tmp_path / "data")
    c = TrainConfig().override(dict(
        what="unet", model=str(tmp_path / "init.safetensors"), resolution=32, batch_size=4,
        lr=2e-3, warmup=2, steps=30, save_every=1000, log_every=5, caption_dropout=0.0, seed=0))
    res = train(c, data, tmp_path / "out", progress=False)
    assert sum(res["losses"][-2:]) < 0.7 * sum(res["losses"][:2])
    trained = load_model(tmp_path / "out" / "model.safetensors").model
    assert trained.config == model.config
    moved = (trained.unet.out[2].weight - model.unet.out[2].weight).abs().max()
    assert moved > 1e-3 and torch.equal(trained.vae.quantize.embedding.weight,
                                        model.vae.quantize.embedding.weight)  # VQ frozen
    with pytest.raises(SdloomError, match="does not apply to LDSR"):
        train(c.override({"what": "lora"}), data, tmp_path / "lora", progress=False)
