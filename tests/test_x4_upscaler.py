"""The SD x4 upscaler family: U-Net and whole upscale against diffusers on tiny random models,
detection from shapes, the upscaler registry."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdloom import upscalers
from sdloom.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdloom.families import FAMILIES, config_from_json, detect
from sdloom.families.keymaps.unet import unet_ldm_to_diffusers
from sdloom.families.sd import LatentDiffusion
from sdloom.families.sd_presets import OPENCLIP_H, PRESETS
from sdloom.families.x4_upscaler import (FAMILY, X4UpscalerFamily, noise_augment, tiled,
                                         upscale_image, upscale_latents)
from sdloom.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

# GroupNorm groups as detection assumes them (32, or the largest power of two dividing the
# widths), so that a file of this model loads back as this model
TINY_UNET = UNetConfig(in_channels=7, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                       num_res_blocks=1, transformer_depth=(0, 1, 1), transformer_depth_middle=1,
                       num_heads=8, context_dim=48, use_linear_in_transformer=True,
                       num_groups=32, num_classes=1000,
                       disable_self_attentions=(False, True, False))
TINY = ModelConfig(
    FAMILY, TINY_UNET,
    VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=16, scale_factor=0.08333),
    (TextEncoderConfig(layout="openclip", width=48, layers=3, heads=1, act="gelu",
                       projection_dim=48, hidden_layer=-2, pad_token=0),),
    prediction="v", default_size=64, linear_start=1e-4, linear_end=2e-2)


def _randomise(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial biases and norms so a wrong wiring shows
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def tiny_x4(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    return _randomise(LatentDiffusion(TINY), seed)


def _diffusers_unet(c: UNetConfig):
    return diffusers.UNet2DConditionModel(
        in_channels=7, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, use_linear_projection=True,
        norm_num_groups=32, num_class_embeds=1000,
        only_cross_attention=list(c.disable_self_attentions)).eval()


def _to_diffusers(unet: UNetModel) -> dict:
    sd = dict(unet.state_dict())
    label = sd.pop("label_emb.weight")
    out = unet_ldm_to_diffusers(sd, unet.config)
    out["class_embedding.weight"] = label
    return out


def test_unet_matches_diffusers_with_noise_level_and_cross_only_attn1():
    torch.manual_seed(0)
    ours = _randomise(UNetModel(TINY_UNET), 1)
    ref = _diffusers_unet(TINY_UNET)
    ref.load_state_dict(_to_diffusers(ours), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 12, 16, generator=g)
    ctx = torch.randn(2, 77, 48, generator=g)
    t = torch.tensor([999.0, 321.5])
    levels = torch.tensor([20, 350])
    with torch.no_grad():
        got = ours(x, t, ctx, y=levels)
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=levels).sample
        other = ours(x, t, ctx, y=torch.tensor([21, 349]))
    assert (got - want).abs().max() < 1e-4
    assert (other - want).abs().max() > 1e-3  # the noise level reaches the output
    # attn1 attends to the text at level 1 (context-wide keys), to the image at level 2
    assert ours.input_blocks[3][1].transformer_blocks[0].attn1.to_k.weight.shape == (64, 48)
    assert ours.input_blocks[5][1].transformer_blocks[0].attn1.to_k.weight.shape == (64, 64)


def test_unet_without_cross_only_attn1_differs_from_diffusers():
    """Negative control: the same weights with self-attention everywhere fail to load into
    the reference (attn1 key widths), and without the label the output changes."""
    plain = dataclasses.replace(TINY_UNET, disable_self_attentions=None)
    torch.manual_seed(0)
    ours = _randomise(UNetModel(plain), 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _diffusers_unet(TINY_UNET).load_state_dict(_to_diffusers(ours), strict=True)
    x, ctx = torch.randn(1, 7, 8, 8), torch.randn(1, 77, 48)
    with torch.no_grad():
        a = ours(x, torch.tensor([500.0]), ctx, y=torch.tensor([0]))
        ours.label_emb.weight.zero_()
        b = ours(x, torch.tensor([500.0]), ctx, y=torch.tensor([0]))
    assert (a - b).abs().max() > 1e-3


def _save_folder(model: LatentDiffusion, folder):
    def save_tensors(sd, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    sd = model.state_dict()
    X4UpscalerFamily().save_diffusers(model.config, sd.__getitem__, list(sd), folder,
                                      save_tensors)


def _low_res(w: int = 16, h: int = 12, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def test_whole_upscale_matches_diffusers_pipeline(tmp_path):
    model = tiny_x4()
    _save_folder(model, tmp_path / "x4")
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "x4")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    img = _low_res()
    noise = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(5))
    # with latents given, the generator's first draw is the low-res augmentation noise
    want = pipe(prompt="a red cat", negative_prompt="blurry", image=img, num_inference_steps=4,
                guidance_scale=5.0, noise_level=60, latents=noise, output_type="pt",
                generator=torch.Generator().manual_seed(9)).images

    low = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    aug = torch.randn(low.shape, generator=torch.Generator().manual_seed(9))
    enc = X4UpscalerFamily().prompt_encoder(model, None)
    c, u = (enc.encode([p])[0].context for p in ("a red cat", "blurry"))
    lat = upscale_latents(model, low, c, u, noise, aug, noise_level=60, steps=4,
                          sampler="Euler", cfg_scale=5.0)
    got = (model.vae.image_from_latent(lat) / 2 + 0.5).clamp(0, 1)
    assert got.shape == want.shape == (1, 3, 48, 64)
    assert (got - want).abs().max() < 1e-4
    # the noise level matters: 61 is not 60
    lat2 = upscale_latents(model, low, c, u, noise, aug, noise_level=61, steps=4,
                           sampler="Euler", cfg_scale=5.0)
    assert (lat2 - lat).abs().max() > 1e-4


def test_diffusers_folder_reads_back(tmp_path):
    from sdloom.checkpoints.load import load_model
    model = tiny_x4(3)
    _save_folder(model, tmp_path / "x4")
    loaded = load_model(tmp_path / "x4").model
    assert loaded.config.family == FAMILY and loaded.config.unet == TINY_UNET
    assert loaded.config.vae.scale_factor == 0.08333 and loaded.config.prediction == "v"
    low, ctx = torch.randn(1, 7, 8, 8), torch.randn(1, 77, 48)
    with torch.no_grad():
        a = model.unet(low, torch.tensor([10.0]), ctx, y=torch.tensor([20]))
        b = loaded.unet(low, torch.tensor([10.0]), ctx, y=torch.tensor([20]))
    assert torch.equal(a, b)


def _shapes(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        m = LatentDiffusion(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    shapes["low_scale_model.alphas_cumprod"] = (1000,)  # schedule buffers of the original
    return shapes


def test_detection_from_shapes():
    cfg = detect(_shapes(TINY))
    assert cfg == dataclasses.replace(TINY, default_size=512)
    assert X4UpscalerFamily().key_aliases(_shapes(TINY)) == {
        "low_scale_model.alphas_cumprod": None}
    # the published model's shapes (x4-upscaling.yaml)
    published = ModelConfig(
        FAMILY, UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4),
                           transformer_depth=(0, 1, 1, 1), context_dim=1024,
                           use_linear_in_transformer=True, num_classes=1000,
                           disable_self_attentions=(False, True, True, False)),
        VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333), (OPENCLIP_H,), prediction="v",
        linear_start=1e-4, linear_end=2e-2)
    shapes = _shapes(published)
    assert "model.diffusion_model.input_blocks.10.0.skip_connection.bias" in shapes
    assert detect(shapes) == published
    # SD models (SDXL's ADM label_emb.0.0.* included) stay SD's
    fam = next(f for f in FAMILIES if isinstance(f, X4UpscalerFamily))
    for name in ("sd2-v", "sdxl-base"):
        assert not fam.claims(_shapes(PRESETS[name]))
        assert detect(_shapes(PRESETS[name])).family == PRESETS[name].family
    # our metadata config round-trips, family included
    assert config_from_json(TINY.to_json()) == TINY
    assert fam.config_problems(TINY, _shapes(TINY)) == []
    assert fam.config_problems(dataclasses.replace(TINY, unet=dataclasses.replace(
        TINY_UNET, disable_self_attentions=(False, False, False))), _shapes(TINY))


def test_noise_augmentation_is_diffusers_low_res_scheduler():
    sched = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
    x, n = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    want = sched.add_noise(x, n, torch.tensor([350]))
    assert (noise_augment(x, n, 350) - want).abs().max() < 1e-6
    assert (noise_augment(x, n, 20) - want).abs().max() > 1e-2


def test_tiling_blends_to_the_untiled_result():
    """A local 4× map tiled with overlaps equals it untiled; a single tile is the untiled run."""
    full = torch.rand(1, 3, 37, 53)
    up = torch.nn.functional.interpolate(full, scale_factor=4, mode="nearest")
    calls = []

    def fn(y, x, h, w):
        calls.append((y, x, h, w))
        return up[..., 4 * y:4 * (y + h), 4 * x:4 * (x + w)]
    assert torch.allclose(tiled(fn, 37, 53, 16, 4, 4), up, atol=1e-6)
    assert len(calls) > 4 and all(h <= 16 and w <= 16 for _, _, h, w in calls)
    model = tiny_x4()
    low = torch.rand(1, 3, 12, 16) * 2 - 1
    kw = dict(steps=2, sampler="Euler", seed=3)
    one = upscale_image(model, low, tile=16, **kw)
    assert torch.equal(one, upscale_image(model, low, tile=64, **kw))
    parts = upscale_image(model, low, tile=10, overlap=4, **kw)
    assert parts.shape == one.shape == (1, 3, 48, 64)
    assert (parts - one).abs().mean() < (one - one.mean()).abs().mean()


def test_registry_lists_and_runs_an_x4_file(tmp_path):
    model = tiny_x4(4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "x4-tiny.safetensors"))
    (tmp_path / "not-a-model.ckpt").write_bytes(b"junk")
    entries = {e.name: e for e in upscalers.available(tmp_path)}
    assert entries["x4-tiny"].x4 and entries["x4-tiny"].scale == 4
    assert "not-a-model" not in entries
    img = _low_res(12, 8, 1)
    out = upscalers.upscale(img, "x4-tiny", 48, 32, upscaler_dir=tmp_path, device="cpu")
    assert out.size == (48, 32)
    want = upscale_image(model, torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)
                         .permute(2, 0, 1)[None] * 2 - 1, steps=upscalers.X4_STEPS,
                         sampler="DDIM", tile=upscalers.X4_TILE, seed=0, noise_level=20)
    want = upscalers.to_image((want + 1) / 2)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1
    assert np.asarray(out).std() > 1  # not a blank image


def test_generate_refuses_the_upscaler_with_a_clear_line():
    from sdloom.errors import SdloomError
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    eng = Engine(tiny_x4())
    with pytest.raises(SdloomError, match="upscales images rather than generating"):
        generate(eng, GenerationParams(prompt="x", steps=1))
