"""`sdloom train --what esrgan` (training/sr_train.py): what the network is shown, that it learns
and writes a BasicSR-layout file the registry reads, exact resume, the preset; the shipped
sdloom-emoji-esrgan-x4 in the registry, `sdloom upscale` and the hires fix; and that
bench/eval_upscale.py scores an ESRGAN file by what it outputs."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from sdloom import upscalers
from sdloom.cli import main as cli_main
from sdloom.errors import SdloomError
from sdloom.families.x4_upscaler import low_res_of
from sdloom.models import esrgan
from sdloom.training import sr_train
from sdloom.training.config import PRESETS, TrainConfig
from sdloom.training.train import train

from test_training import make_shapes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = dict(upscalers.EMBEDDED)["sdloom-emoji-esrgan-x4"]
TINY = esrgan.CompactConfig(nf=8, num_conv=2, scale=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("srdata"))


@pytest.fixture(scope="module")
def init_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("srinit") / "init.safetensors"
    save_file(esrgan.build(TINY).state_dict(), str(path))
    return path


def cfg_for(init: Path, **kw) -> TrainConfig:
    base = dict(what="esrgan", model=str(init), resolution=32, x4_crop=16, batch_size=4,
                lr=3e-3, warmup=0, schedule="constant", steps=4, rec_loss="l2", log_every=1,
                save_every=2, seed=1)
    return TrainConfig(**{**base, **kw})


def window_offsets(window: torch.Tensor, images: torch.Tensor) -> list[tuple[int, int, int]]:
    """Every (image, y, x) at which `window` [3, s, s] sits in `images` [N, 3, H, W]."""
    s = window.shape[-1]
    return [(n, y, x) for n, im in enumerate(images)
            for y in range(im.shape[-2] - s + 1) for x in range(im.shape[-1] - s + 1)
            if torch.equal(im[:, y:y + s, x:x + s], window)]


def test_the_network_sees_the_bicubic_quarter_of_a_random_window(data, init_file, tmp_path,
                                                                 monkeypatch):
    inputs, targets = [], []
    real_loss = sr_train.reconstruction
    monkeypatch.setattr(sr_train, "reconstruction",
                        lambda cfg, out, t: targets.append(t) or real_loss(cfg, out, t))
    real_build = sr_train.build_network

    def recording(cfg, device):
        net = real_build(cfg, device)
        net.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
        return net
    monkeypatch.setattr(sr_train, "build_network", recording)
    train(cfg_for(init_file, steps=2), data, tmp_path / "run", progress=False, device="cpu")
    assert len(targets) == len(inputs) == 2
    images = shapes_batch(data)
    off_centre = 0
    for x, t in zip(inputs, targets):
        w = t * 2 - 1  # the high-res window, back in [-1, 1]
        assert w.shape == (4, 3, 16, 16) and x.shape == (4, 3, 4, 4)
        for wi in w:  # a 16² window of a 32² training image (some shapes repeat: any place)
            found = window_offsets(wi, images)
            assert found
            off_centre += all((y, x0) != (8, 8) for _, y, x0 in found)
        # the input: antialiased bicubic to a quarter, on 8-bit levels, in [0, 1]
        want = F.interpolate(w, scale_factor=0.25, mode="bicubic", antialias=True)
        want = ((want.clamp(-1, 1) + 1) * 127.5).round() / 255
        assert torch.allclose(x, want, atol=1e-6)
        assert (x * 255 - (x * 255).round()).abs().max() < 1e-4
    assert off_centre  # windows at random places: some cannot be the centre one
    assert not torch.equal(targets[0], targets[1])  # fresh windows each step


def shapes_batch(data: Path) -> torch.Tensor:
    """Every training image of the shapes set, [N, 3, 32, 32] in [-1, 1]."""
    files = sorted(data.glob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                        for f in files]).float() / 127.5 - 1


def sr_error(net: torch.nn.Module, hi: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net((low_res_of(hi) + 1) / 2) - (hi + 1) / 2).pow(2).mean())


def test_training_learns_and_writes_a_basicsr_file_the_registry_reads(data, init_file,
                                                                      tmp_path):
    out = tmp_path / "run"
    res = train(cfg_for(init_file, steps=100, save_every=100, log_every=10, x4_crop=0, lr=1e-2), data,
                out, progress=False, device="cpu")
    assert res["step"] == 100 and len(res["losses"]) == 100  # one per step
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(init_file))
    assert saved.keys() == before.keys()  # BasicSR's body.N names, nothing added
    assert all(not torch.equal(saved[k], before[k]) for k in saved if k.endswith("weight"))
    entry = upscalers.describe(out / "model.safetensors")
    assert entry.scale == 4 and not entry.x4 and not entry.ldsr
    assert esrgan.file_config(out / "model.safetensors") == TINY
    # the saved network reconstructs its images better than at the start, and than nearest
    hi = shapes_batch(data)
    trained, init = (esrgan.load_upscaler(p) for p in (out / "model.safetensors", init_file))
    near = float((F.interpolate((low_res_of(hi) + 1) / 2, scale_factor=4) - (hi + 1) / 2)
                 .pow(2).mean())
    assert sr_error(trained, hi) < 0.5 * sr_error(init, hi)
    assert sr_error(trained, hi) < near


def test_resume_continues_the_exact_run(data, init_file, tmp_path):
    whole = train(cfg_for(init_file), data, tmp_path / "whole", progress=False, device="cpu")
    cut = tmp_path / "cut"
    train(cfg_for(init_file), data, cut, progress=False, device="cpu", stop_after=2)
    again = train(cfg_for(init_file), data, cut, resume=True, progress=False, device="cpu")
    assert again["step"] == whole["step"] == 4
    a, b = whole["model"].state_dict(), again["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(SdloomError, match="holds a training run"):
        train(cfg_for(init_file), data, cut, progress=False, device="cpu")


def test_blur_degradation():
    # an impulse spreads into the normalised Gaussian of σ, separably; flat images stay flat
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1
    y = sr_train.gaussian_blur(x, 1.5)
    t = torch.arange(-5, 6, dtype=torch.float32)  # the kernel reaches ceil(3σ)
    g = torch.exp(-t * t / (2 * 1.5 ** 2))
    g = g / g.sum()
    assert torch.allclose(y[0, 0, 5:16, 5:16], g[:, None] * g[None, :], atol=1e-6)
    assert abs(float(y.sum()) - 1) < 1e-5
    flat = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(sr_train.gaussian_blur(flat, 2.0), flat)
    assert sr_train.gaussian_blur(x, 0.0) is x
    # blurred(): one σ per image, uniform in [0, max), drawn from the generator
    hi = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = sr_train.blurred(hi, 2.0, torch.Generator().manual_seed(5))
    sig = (torch.rand(3, generator=torch.Generator().manual_seed(5)) * 2.0).tolist()
    for i, s in enumerate(sig):
        assert torch.allclose(got[i], sr_train.gaussian_blur(hi[i:i + 1], s)[0])
    assert sr_train.blurred(hi, 0.0, torch.Generator()) is hi


def test_preset_and_refusals(data, tmp_path):
    cfg = TrainConfig().override(PRESETS["emoji-esrgan-x4"])
    cfg.validate()
    net = sr_train.build_network(cfg, torch.device("cpu"))
    assert net.config == sr_train.PRESETS["emoji-esrgan-x4"]
    assert sum(p.numel() for p in net.parameters()) < 400_000
    assert cfg.blur_max == 2.0 and cfg.rec_loss == "l2"
    with pytest.raises(SdloomError, match="blur_max"):
        TrainConfig(what="esrgan", blur_max=-1.0).validate()
    with pytest.raises(SdloomError, match="neither an upscaler preset"):
        train(TrainConfig(what="esrgan", model="embedded", resolution=32), data,
              tmp_path / "a", progress=False, device="cpu")
    with pytest.raises(SdloomError, match="multiple of the network's factor 4"):
        train(TrainConfig(what="esrgan", model="emoji-esrgan-x4", resolution=32, x4_crop=18),
              data, tmp_path / "b", progress=False, device="cpu")


# ---------------------------------------------------------------------- the shipped file
def test_shipped_upscaler_is_listed_and_small():
    entry = upscalers.find("sdloom-emoji-esrgan-x4")
    assert entry.path == SHIPPED and entry.scale == 4 and not entry.x4
    assert SHIPPED.stat().st_size < 15e6
    assert esrgan.file_config(SHIPPED) == sr_train.PRESETS["emoji-esrgan-x4"]


def test_shipped_upscaler_beats_lanczos_on_a_held_out_render(tmp_path):
    """tests/golden/noto-sailboat-512.png, a 512² render of Noto's SVG art that training held
    out (data/emoji512svg row 15), made 4× smaller: the shipped network's 4× through the CLI
    is closer to it than Lanczos's."""
    target_file = ROOT / "tests" / "golden" / "noto-sailboat-512.png"
    hi = torch.from_numpy(np.array(Image.open(target_file).convert("RGB")))
    hi = hi.permute(2, 0, 1)[None].float() / 127.5 - 1
    low = upscalers.to_image((low_res_of(hi) + 1) / 2)
    low.save(tmp_path / "low.png")
    assert cli_main(["upscale", str(tmp_path / "low.png"), "--upscaler",
                     "sdloom-emoji-esrgan-x4", "--output", str(tmp_path / "up.png"),
                     "--device", "cpu"]) == 0
    target = np.asarray(Image.open(target_file).convert("RGB"), dtype=np.float64)
    ours = np.asarray(Image.open(tmp_path / "up.png").convert("RGB"), dtype=np.float64)
    lanczos = np.asarray(low.resize((512, 512), Image.LANCZOS), dtype=np.float64)
    assert ours.shape == target.shape
    mse_ours, mse_lanczos = ((ours - target) ** 2).mean(), ((lanczos - target) ** 2).mean()
    assert mse_ours < 0.5 * mse_lanczos  # ≥ 3 dB better (measured: see docs/embedded-model.md)


def test_hires_fix_runs_the_shipped_upscaler(tmp_path, monkeypatch):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from sdloom.checkpoints.save import save_model
    from tiny import TINY_SD1, tiny_model
    save_model(tiny_model(), TINY_SD1, tmp_path / "m.safetensors")
    eng = Engine.load(tmp_path / "m.safetensors", device="cpu", precision="fp32")
    seen = []
    real = upscalers.run_model
    monkeypatch.setattr(upscalers, "run_model",
                        lambda m, im, **k: seen.append((m.config, im.size)) or real(m, im, **k))
    res = generate(eng, GenerationParams(prompt="x", seed=1, steps=2, width=64, height=64,
                                         enable_hr=True, hr_scale=2, denoising_strength=0.3,
                                         hr_upscaler="sdloom-emoji-esrgan-x4"))
    assert res.images[0].size == (128, 128)  # one 4× pass, then Lanczos down to 2×
    assert seen == [(sr_train.PRESETS["emoji-esrgan-x4"], (64, 64))]


# ---------------------------------------------------------------------- the benchmark
def test_eval_scores_an_esrgan_file_by_its_output(tmp_path):
    """A compact net whose last conv is zero outputs the nearest-neighbour 4× of its input:
    the benchmark's "model" score must be exactly that image's PSNR/SSIM."""
    spec = importlib.util.spec_from_file_location("eval_upscale",
                                                  ROOT / "bench" / "eval_upscale.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    root = tmp_path / "d"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):
        a = (torch.rand(3, 8, 8, generator=g) * 255).byte()
        a = F.interpolate(a[None].float(), scale_factor=8, mode="bilinear")[0].round().byte()
        Image.fromarray(a.permute(1, 2, 0).numpy()).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": str(i), "holdout": i > 0})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    net = esrgan.build(TINY)
    with torch.no_grad():
        net.body[-1].weight.zero_()
        net.body[-1].bias.zero_()
    save_file(net.state_dict(), str(tmp_path / "near.safetensors"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ev.main(["--data", str(root), "--model", str(tmp_path / "near.safetensors"),
                        "--device", "cpu"]) == 0
    res = json.loads(buf.getvalue())
    assert res["images"] == 2 and "vae" not in res
    hi = torch.stack([torch.from_numpy(np.array(Image.open(root / f"{i}.png"))).permute(2, 0, 1)
                      for i in (1, 2)]).float() / 127.5 - 1
    target = ev.to_unit(hi)
    near = F.interpolate(ev.to_unit(low_res_of(hi)), scale_factor=4, mode="nearest")
    assert res["model"]["psnr"] == round(float(ev.psnr(near, target).mean()), 4)
    assert res["model"]["ssim"] == round(float(ev.ssim(near, target).mean()), 4)
    lz = ev.lanczos(ev.to_unit(low_res_of(hi)), 64)
    assert res["lanczos"]["psnr"] == round(float(ev.psnr(lz, target).mean()), 4)
    # --blur: the inputs come from the blurred targets, the scores against the sharp ones
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ev.main(["--data", str(root), "--model", str(tmp_path / "near.safetensors"),
                        "--device", "cpu", "--blur", "1.5"]) == 0
    res = json.loads(buf.getvalue())
    soft = ev.to_unit(low_res_of(sr_train.gaussian_blur(hi, 1.5)))
    near = F.interpolate(soft, scale_factor=4, mode="nearest")
    assert res["blur"] == 1.5
    assert res["model"]["psnr"] == round(float(ev.psnr(near, target).mean()), 4)
