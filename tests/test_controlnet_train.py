"""ControlNet training (what=controlnet): the initialisation diffusers' `from_unet` gives, the
base model's output at the first step, only the ControlNet trained, a file that loads and
steers generation, exact resume, condition images that follow the crop and flip, the shipped
ControlNet listed only when present and fitting, and one clear error for bad input."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdloom import controlnet as cn_mod
from sdloom.checkpoints.save import save_model
from sdloom.config import ModelConfig, TextEncoderConfig, VAEConfig
from sdloom.controlnet import (ControlUnit, canny, find_controlnet, list_controlnets,
                               load_controlnet)
from sdloom.errors import SdloomError
from sdloom.families.sd import LatentDiffusion, UNetAdapter
from sdloom.families.sd_presets import EMBEDDED
from sdloom.training.config import PRESETS, TrainConfig
from sdloom.training.controlnet_train import (ControlDataset, attach_controlnet,
                                              controlled_denoiser)
from sdloom.training.data import Augment
from sdloom.training.train import main, train

from test_training import make_shapes
from tiny import TINY_SD1, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("cntrain")
    make_shapes(r / "data")
    save_model(tiny_model(), TINY_SD1, r / "base.safetensors")
    return r


def cfg(root: Path, **kw) -> TrainConfig:
    base = dict(what="controlnet", model=str(root / "base.safetensors"), resolution=32,
                batch_size=4, lr=2e-3, warmup=1, steps=4, save_every=2, log_every=1,
                caption_dropout=0.5, control_preprocessor="canny", seed=5)
    return TrainConfig().override({**base, **kw})


@pytest.fixture(scope="module")
def run(root):
    n = torch.get_num_threads()  # module fixtures start before `one_thread`: the resume test
    torch.set_num_threads(1)  # must see the same reduction order
    try:
        res = train(cfg(root), root / "data", root / "out", progress=False)
    finally:
        torch.set_num_threads(n)
    return res, root / "out" / "controlnet.safetensors"


def _xtc(cfg_unet, batch=2, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([900, 20]),
            torch.randn(batch, 77, cfg_unet.context_dim, generator=g),
            torch.rand(batch, 3, size * 8, size * 8, generator=g))


def test_init_is_diffusers_from_unet_and_starts_at_the_base_model():
    import diffusers
    from sdloom.families.sd_controlnet import controlnet_keys
    from test_unet import make_pair
    ref, ours, ucfg = make_pair("sd1")
    mcfg = ModelConfig("sd1", ucfg, VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                                              num_groups=8),
                       (TextEncoderConfig(width=24, layers=1, heads=2),), name="")
    model = LatentDiffusion(mcfg).eval()
    model.unet.load_state_dict(ours.state_dict())
    net = attach_controlnet(model, seed=0)
    assert model.control_model is net and all(p.requires_grad for p in net.parameters())
    theirs = diffusers.ControlNetModel.from_unet(ref).state_dict()
    names = controlnet_keys({k: tuple(v.shape) for k, v in theirs.items()})
    theirs = {names[k]: v for k, v in theirs.items()}
    mine = net.state_dict()
    assert theirs.keys() == mine.keys()
    for k, v in mine.items():
        if k.startswith("input_hint_block.") and not k.startswith("input_hint_block.14."):
            assert v.abs().sum() > 0, k  # random (diffusers: its own random draw)
        else:  # copied from the U-Net, or zero
            torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)
    assert float(mine["zero_convs.3.0.weight"].abs().sum()) == 0
    assert float(mine["input_blocks.1.0.in_layers.2.weight"].abs().sum()) > 0
    # zero-initialised: the first forward is the base U-Net's, bit for bit
    x, t, ctx, hint = _xtc(ucfg, size=8)
    with torch.no_grad():
        base = UNetAdapter(model.unet)(x, t, ctx)
        assert torch.equal(controlled_denoiser(model, hint)(x, t, ctx), base)
        net.zero_convs[2][0].bias.fill_(0.1)  # negative control: a live residual shows
        assert (controlled_denoiser(model, hint)(x, t, ctx) - base).abs().max() > 1e-3


def test_training_changes_only_the_controlnet_and_writes_its_file(root, run):
    res, path = run
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))
    model = res["model"]
    init = load_file(root / "base.safetensors")
    now = {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    assert now.keys() == init.keys()
    for k, v in init.items():
        assert torch.equal(now[k], v), k  # U-Net, VAE and text encoder bit-identical
    saved = load_file(path)
    assert all(k.startswith("control_model.") for k in saved)
    assert float(saved["control_model.zero_convs.0.0.weight"].abs().sum()) > 0  # it learned
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sdloom_base_model"] == "base" and meta["sdloom_step"] == "4"
    assert json.loads(meta["sdloom_preprocessor"]) == {"module": "canny", "threshold_a": 100,
                                                        "threshold_b": 200}


def test_loss_falls_below_the_base_models(root, tmp_path):
    """A short run on the 16 shapes: the objective on fixed timesteps and noise, with the
    trained ControlNet against the base model alone (what the zero init starts from)."""
    from sdloom.families import family_of
    from sdloom.training.objectives import conditioning_for, objective_for
    res = train(cfg(root, steps=20, batch_size=8, lr=3e-3, caption_dropout=0.0,
                    save_every=1000), root / "data", tmp_path / "o", progress=False)
    model = res["model"].eval()
    ds = ControlDataset(root / "data", 32, preprocessor="canny")
    fam = family_of(model.config)
    obj, cond = objective_for(fam.model_sampling(model.config)), conditioning_for(fam, model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = model.first_stage_model.latent_from_image(
            torch.stack([ds.image(i) for i in range(len(ds))]))
        hint = torch.stack([ds.hint(i) for i in range(len(ds))]).float() / 255
        c = cond(cond.prepare([ds.caption(i) for i in range(len(ds))], (32, 32), x0.device))
        with_cn, without = 0.0, 0.0
        for _ in range(4):
            t, noise = torch.randint(0, 1000, (len(ds),), generator=g), torch.randn(
                x0.shape, generator=g)
            with_cn += float(obj(controlled_denoiser(model, hint), x0, t, noise, c))
            without += float(obj(fam.denoiser_model(model), x0, t, noise, c))
    assert with_cn < 0.85 * without, (with_cn, without)


def test_file_loads_and_steers_generation(root, run):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    res, path = run
    net = load_controlnet(path, TINY_SD1.unet, 4, torch.device("cpu"), torch.float32)
    trained = res["model"].control_model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k]), k
    eng = Engine.load(root / "base.safetensors", device="cpu", precision="fp32")
    hint = Image.open(root / "data" / "red-square-large.png")
    base = dict(prompt="a red square", seed=3, steps=3, width=64, height=64,
                sampler_name="Euler")

    def image(**unit):
        units = [ControlUnit(str(path), hint, module="canny", **unit)] if unit else []
        return np.asarray(generate(eng, GenerationParams(**base, controlnets=units))
                          .images[0], float)
    plain = image()
    assert np.abs(image(weight=1.0) - plain).max() > 0  # the trained residuals act
    assert np.array_equal(image(weight=0.0), plain)  # and only they


def test_resume_continues_exactly(root, run):
    res, path = run
    out = root / "resumed"
    first = train(cfg(root), root / "data", out, progress=False, stop_after=2)
    assert first["step"] == 2
    second = train(cfg(root), root / "data", out, resume=True, progress=False)
    assert len(second["losses"]) == 2
    assert first["losses"] + second["losses"] == res["losses"]
    a, b = load_file(path), load_file(out / "controlnet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_conditions_follow_the_images_crop_and_flip(root, tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):  # the condition file is the image itself, so hint = image pixels
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"x{i}",
                     "conditioning_file_name": f"{i}.png"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ControlDataset(data, 32, random_crop=True, flip=True)
    aug, other = Augment(True, (0.9, 0.2), False), Augment(False, (0.1, 0.8), False)
    for i in range(3):
        img = ((ds.image(i, aug) + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(ds.hint(i, aug), img)
        assert not torch.equal(ds.hint(i, other), img)
    # with a preprocessor: the preprocessor on the image as augmented, at its own size
    ds = ControlDataset(root / "data", 32, flip=True, preprocessor="canny")
    aug = Augment(True, (0.5, 0.5), False)
    img = ((ds.image(2, aug) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    want = canny(img, 100, 200)
    assert want.any() and torch.equal(ds.hint(2, aug)[0], torch.from_numpy(want))


def test_bad_input_is_one_clear_error(root, tmp_path, capsys):
    no_column = cfg(root, control_preprocessor=None)
    with pytest.raises(SdloomError, match="conditioning_file_name.*control_preprocessor"):
        train(no_column, root / "data", tmp_path / "a", progress=False)
    args = ["--data", str(root / "data"), "--output", str(tmp_path / "b"), "--what",
            "controlnet", "--model", str(root / "base.safetensors"), "--resolution", "32",
            "--steps", "1", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "conditioning_file_name" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    with pytest.raises(SdloomError, match="need the trained model"):
        train(cfg(root, model="sd1"), root / "data", tmp_path / "c", progress=False)
    with pytest.raises(SdloomError, match="predicts eps; a controlnet .* cannot be trained on v"):
        train(cfg(root, prediction="v"), root / "data", tmp_path / "d", progress=False)


def test_shipped_controlnet_is_listed_only_when_present_and_fitting(root, run, tmp_path,
                                                                    monkeypatch):
    from fastapi.testclient import TestClient
    from sdloom.server.app import Server, create_app
    path = tmp_path / "sdloom-emoji-canny.safetensors"  # the asset's name
    monkeypatch.setitem(cn_mod.BUILTIN, "sdloom-emoji-canny", path)
    assert list_controlnets(None, TINY_SD1) == {}  # no file: not listed, no error
    shutil.copy(run[1], path)
    listed = list_controlnets(None, TINY_SD1)
    assert list(listed) == [f"sdloom-emoji-canny [{cn_mod.legacy_hash(path)}]"]
    assert find_controlnet("sdloom-emoji-canny", None, TINY_SD1) == path
    wider = dataclasses.replace(TINY_SD1, unet=dataclasses.replace(TINY_SD1.unet,
                                                                   model_channels=48))
    for other in (None, EMBEDDED, wider):  # not for models it does not fit
        assert list_controlnets(None, other) == {}
    server = Server(str(root / "base.safetensors"), device="cpu", precision="fp32",
                    outdir=str(tmp_path / "o"))
    client = TestClient(create_app(server))
    assert client.get("/controlnet/model_list").json()["model_list"] == list(listed)
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_model"] == list(listed)[0]
    # by name in the library (and so the CLI's --control IMAGE:sdloom-emoji-canny)
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    hint = Image.open(root / "data" / "red-square-large.png")
    res = generate(server.engine, GenerationParams(
        prompt="a red square", seed=1, steps=1, width=64, height=64, sampler_name="Euler",
        controlnets=[ControlUnit("sdloom-emoji-canny", hint, module="canny")]))
    assert f"Model: {list(listed)[0]}" in res.infotexts[0]


def test_emoji_canny_preset_is_a_valid_controlnet_run():
    c = TrainConfig().override(PRESETS["emoji-canny"])
    c.validate()
    assert c.what == "controlnet" and c.model == "embedded" and c.control_preprocessor == "canny"
    assert c.resolution == EMBEDDED.default_size and c.save_dtype == "fp16"
