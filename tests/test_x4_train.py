"""The embedded upscaler's machinery: `sdloom train` with what=x4 (and what=vae) on an SD x4
upscaler, its low-res conditioning, the registry's built-in entry, the SVG data builder's
sprite reading, and bench/eval_upscale.py's PSNR/SSIM."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from sdloom import upscalers
from sdloom.checkpoints.load import load_model
from sdloom.checkpoints.save import save_model
from sdloom.cli import main as cli_main
from sdloom.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdloom.errors import SdloomError
from sdloom.families.sd import LatentDiffusion
from sdloom.families.sd_presets import EMBEDDED
from sdloom.families.x4_upscaler import (EMOJI_X4, FAMILY, MAX_NOISE_LEVEL, LowResConditioning,
                                         X4UpscalerFamily, augmentation_schedule, low_res_of,
                                         noise_augment)
from sdloom.prompts import EmbeddingDB
from sdloom.training.config import PRESETS, TrainConfig
from sdloom.training.emoji_svg_data import read_sprite
from sdloom.training.objectives import conditioning_for
from sdloom.training.train import train

ROOT = Path(__file__).resolve().parents[1]
# the emoji-x4 preset's layout at the smallest widths (detection's group and head rules kept)
TINY = ModelConfig(
    FAMILY,
    UNetConfig(in_channels=7, out_channels=4, model_channels=16, channel_mult=(1, 2),
               num_res_blocks=1, transformer_depth=(0, 1), transformer_depth_middle=1,
               num_heads=8, context_dim=16, use_linear_in_transformer=True, num_groups=16,
               num_classes=1000, disable_self_attentions=(False, False)),
    VAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=8, scale_factor=0.5),
    (TextEncoderConfig(layout="openclip", vocab_size=49408, width=16, layers=1, heads=1,
                       act="gelu", projection_dim=16, hidden_layer=-2, pad_token=0),),
    prediction="v", default_size=64, name="tiny-x4")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six 64² pictures (coloured shapes on white), one held out, as the SVG builder lays
    them out."""
    root = tmp_path_factory.mktemp("x4data")
    rows = []
    for i in range(6):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        d = ImageDraw.Draw(img)
        d.ellipse((6 + i, 8, 50, 40 + i), fill=(40 * i, 200 - 30 * i, 90))
        d.rectangle((30, 30 + i, 60, 60), outline=(0, 0, 0), width=2)
        img.save(root / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": f"shape {i}", "holdout": i == 5})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("x4base") / "base.safetensors"
    save_model(LatentDiffusion(TINY), TINY, path)
    return path


@pytest.fixture(scope="module")
def trained(data, base_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("x4run")
    cfg = TrainConfig(what="x4", model=str(base_file), resolution=64, x4_crop=32,
                      batch_size=2, steps=3, lr=1e-3, warmup=0, caption_dropout=1.0,
                      prediction="v", log_every=1, save_every=3, seed=1)
    seen = []
    real = LowResConditioning.low_res
    with pytest.MonkeyPatch.context() as mp:  # what the low-res input is made from
        mp.setattr(LowResConditioning, "low_res",
                   lambda self, high, gen: seen.append(high.shape) or real(self, high, gen))
        res = train(cfg, data, out, progress=False, device="cpu")
    assert seen == [(2, 3, 32, 32)] * 3  # x4_crop² windows of the 64² images
    return out / "model.safetensors", res


def test_x4_training_changes_only_the_unet(trained, base_file):
    path, res = trained
    assert res["step"] == 3 and len(res["losses"]) == 3
    assert all(math.isfinite(v) and v > 0 for v in res["losses"])
    before, after = load_file(str(base_file)), load_file(str(path))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    unet = {k for k in before if k.startswith("model.diffusion_model.")}
    assert changed and changed <= unet  # the VAE and the text encoder stay frozen
    assert "model.diffusion_model.label_emb.weight" in changed  # the noise level is learnt
    assert len(changed) > len(unet) // 2


def test_trained_file_loads_as_an_x4_upscaler_and_upscales_from_the_cli(trained, data,
                                                                        tmp_path,
                                                                        monkeypatch):
    path, _ = trained
    loaded = load_model(path)
    assert loaded.model.config.family == FAMILY and loaded.model.config.unet == TINY.unet
    # installed as the built-in: listed, found by name, and run by `sdloom upscale`
    monkeypatch.setattr(upscalers, "EMBEDDED", (("sdloom-emoji-x4", path),))
    entry = upscalers.find("sdloom-emoji-x4")
    assert entry.x4 and entry.scale == 4 and entry.path == path
    src = tmp_path / "low.png"
    Image.open(data / "00005.png").resize((16, 16), Image.LANCZOS).save(src)
    out = tmp_path / "big.png"
    assert cli_main(["upscale", str(src), "--upscaler", "sdloom-emoji-x4", "--output",
                     str(out), "--device", "cpu"]) == 0
    big = Image.open(out)
    assert big.size == (64, 64)
    via_registry = upscalers.upscale(Image.open(src).convert("RGB"), "sdloom-emoji-x4", 64, 64,
                                     device="cpu")
    assert np.array_equal(np.asarray(big.convert("RGB")), np.asarray(via_registry))


def test_registry_lists_the_builtin_only_when_its_file_exists(trained, tmp_path, monkeypatch):
    path, _ = trained
    monkeypatch.setattr(upscalers, "EMBEDDED", (("sdloom-emoji-x4", tmp_path / "absent"),))
    assert [e.name for e in upscalers.available()] == ["None", "Lanczos", "Nearest"]
    with pytest.raises(SdloomError, match="upscaler not found"):
        upscalers.find("sdloom-emoji-x4")
    # until installed, a file of that name in the upscaler folder is listed as any other
    (tmp_path / "sdloom-emoji-x4.safetensors").write_bytes(path.read_bytes())
    assert upscalers.find("sdloom-emoji-x4", tmp_path).path.parent == tmp_path
    monkeypatch.setattr(upscalers, "EMBEDDED", (("sdloom-emoji-x4", path),))
    names = [e.name for e in upscalers.available(tmp_path)]
    assert names == ["None", "Lanczos", "Nearest", "sdloom-emoji-x4"]  # not twice
    assert upscalers.find("sdloom-emoji-x4", tmp_path).path == path


def test_vae_stage_trains_only_the_vae_of_an_x4_preset(data, tmp_path):
    cfg = TrainConfig(what="vae", model="emoji-x4", resolution=32, batch_size=1, steps=1,
                      warmup=0, save_every=1, log_every=1, vae_scale_by_std=True)
    # the preset's model is the real size: one step at 32² keeps this quick
    res = train(cfg, data, tmp_path, progress=False, device="cpu")
    assert math.isfinite(res["losses"][0])
    m = load_model(tmp_path / "model.safetensors").model
    assert m.config.family == FAMILY and m.config.unet == EMOJI_X4.unet
    assert m.config.vae.scale_factor != EMOJI_X4.vae.scale_factor  # 1/std of its latents
    size = sum(p.numel() for p in m.parameters()) * 2
    assert size < 14.5e6  # the fp16 file stays under 15 MB


def test_x4_presets_and_refusals():
    assert PRESETS["emoji-x4-vae"]["model"] == "emoji-x4"
    assert PRESETS["emoji-x4"]["what"] == "x4" and PRESETS["emoji-x4"]["caption_dropout"] == 1
    with pytest.raises(SdloomError, match="what=x4 trains an SD x4 upscaler"):
        LowResConditioning(None, EMBEDDED)
    with pytest.raises(SdloomError, match="multiple of 16"):
        LowResConditioning(None, EMOJI_X4, crop=40)
    fam = X4UpscalerFamily()
    assert fam.training_refusal(EMOJI_X4, "x4") is None
    assert "what=vae" in fam.training_refusal(EMOJI_X4, "full")
    with pytest.raises(SdloomError, match="x4_crop"):
        TrainConfig(what="x4", resolution=64, x4_crop=128).validate()


def test_low_res_input_is_the_noised_downscale_of_the_window():
    g = torch.Generator().manual_seed(3)
    high = torch.rand(3, 3, 64, 48, generator=g) * 2 - 1
    cond = LowResConditioning(lambda p: {"context": p["ids"]}, TINY, crop=32)
    gen = torch.Generator().manual_seed(7)
    crops = high[:, :, 5:37, 9:41]  # a training window (the data set cuts them)
    state = gen.get_state()
    got = cond.low_res(crops, gen)
    gen.set_state(state)
    levels = torch.randint(0, MAX_NOISE_LEVEL, (3,), generator=gen)
    noise = torch.randn(3, 3, 8, 8, generator=gen)
    assert torch.equal(got["y"], levels)
    assert torch.allclose(got["c_concat"], noise_augment(low_res_of(crops), noise, levels))
    # per image: √ᾱ_t·x + √(1−ᾱ_t)·ε at its own level
    ac = augmentation_schedule().alphas_cumprod
    low = low_res_of(crops)
    for i, t in enumerate(levels.tolist()):
        want = math.sqrt(ac[t]) * low[i] + math.sqrt(1 - ac[t]) * noise[i]
        assert torch.allclose(got["c_concat"][i], want, atol=1e-6)
    assert set(cond({"ids": 5, **got})) == {"context", "c_concat", "y"}
    # the downscale of a flat image is that image, on 8-bit levels
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(low_res_of(flat), torch.full((1, 3, 4, 4), round(1.3 * 127.5) / 127.5
                                                       - 1))


def test_training_context_equals_the_upscalers_empty_prompt():
    torch.manual_seed(0)
    model = LatentDiffusion(TINY).eval()
    fam = X4UpscalerFamily()
    cond = conditioning_for(fam, model)
    train_ctx = cond(cond.prepare([""], (64, 64), torch.device("cpu")))["context"]
    infer_ctx = fam.prompt_encoder(model, EmbeddingDB()).encode([""])[0].context
    assert train_ctx.shape == infer_ctx.shape == (1, 77, 16)
    assert torch.allclose(train_ctx, infer_ctx, atol=1e-6)


def test_sprite_reading_matches_codepoints_and_skips_other_canvases(tmp_path):
    ns = 'xmlns="http://www.w3.org/2000/svg"'
    sprite = tmp_path / "all.svg"
    sprite.write_text(
        f'<svg viewBox="0 0 2000 2000" {ns}>'
        f'<svg viewBox="0 0 128 128" id="0023-FE0F-20E3" {ns}><path d="M0 0h9v9z"/></svg>'
        f'<svg viewBox="0 0 128 128" id="1F44D-1F3FD" {ns}><circle r="3"/></svg>'
        f'<svg viewBox="0 0 900 600" id="1F1EB-1F1F7" {ns}><rect width="9" height="9"/></svg>'
        '</svg>')
    svgs = read_sprite(sprite)
    assert sorted(svgs) == ["1F44D 1F3FD", "23 20E3"]  # keyed as codepoints() writes them
    assert "<circle" in svgs["1F44D 1F3FD"] and svgs["1F44D 1F3FD"].startswith("<svg")
    (tmp_path / "none.svg").write_text(f'<svg {ns}></svg>')
    with pytest.raises(SdloomError, match="no <svg id"):
        read_sprite(tmp_path / "none.svg")


def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_upscale",
                                                  ROOT / "bench" / "eval_upscale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ssim_and_psnr_on_known_cases():
    ev = _eval_module()
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 20, generator=g)
    assert torch.allclose(ev.ssim(a, a), torch.ones(2, dtype=torch.float64))
    # flat images x and y: no variance, so SSIM = (2xy + C1) / (x² + y² + C1)
    c1 = (0.01 * 1.0) ** 2
    x, y = 0.2, 0.7
    want = (2 * x * y + c1) / (x * x + y * y + c1)
    f64 = dict(dtype=torch.float64)
    got = ev.ssim(torch.full((1, 3, 16, 16), x, **f64), torch.full((1, 3, 16, 16), y, **f64))
    assert got.item() == pytest.approx(want, rel=1e-9)
    # the Gaussian window itself is 11×11, sums to 1 and peaks at its centre
    w = ev.gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max() and torch.allclose(w, w.T)
    # PSNR of a uniform error d: 10·log10(1 / d²)
    assert ev.psnr(a, a + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-6)
    # a worse image scores lower on both
    worse = (a + 0.3 * torch.rand(a.shape, generator=g)).clamp(0, 1)
    bad = (a + 0.6 * torch.rand(a.shape, generator=g)).clamp(0, 1)
    assert (ev.ssim(bad, a) < ev.ssim(worse, a)).all()


def test_hires_fix_uses_the_builtin_upscaler(trained, tmp_path, monkeypatch):
    from sdloom.infotext import parse_infotext
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from tiny import TINY_SD1, tiny_model
    path, _ = trained
    monkeypatch.setattr(upscalers, "EMBEDDED", (("sdloom-emoji-x4", path),))
    save_model(tiny_model(), TINY_SD1, tmp_path / "m.safetensors")
    eng = Engine.load(tmp_path / "m.safetensors", device="cpu", precision="fp32")
    seen = []
    real = upscalers.run_x4
    monkeypatch.setattr(upscalers, "run_x4", lambda m, im, **k: seen.append(im.size)
                        or real(m, im, **k))
    res = generate(eng, GenerationParams(prompt="x", seed=1, steps=2, width=64, height=64,
                                         enable_hr=True, hr_scale=2, denoising_strength=0.5,
                                         hr_upscaler="sdloom-emoji-x4"))
    assert res.images[0].size == (128, 128) and seen == [(64, 64)]
    assert parse_infotext(res.infotexts[0])["Hires upscaler"] == "sdloom-emoji-x4"
