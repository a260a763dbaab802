"""Training on a tiny synthetic data set: data order and augmentation, config, objectives,
losses that fall, exact resume, VAE training, LoRA files that load, checkpoints that generate."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdloom.checkpoints.load import load_model
from sdloom.checkpoints.save import save_model
from sdloom.errors import SdloomError
from sdloom.training.config import PRESETS, TrainConfig
from sdloom.training.data import (Augment, BatchSampler, ImageCaptionDataset, bucket_sizes,
                                  collate, read_items)
from sdloom.training.ema import EMA
from sdloom.training.state import find_state
from sdloom.training.objectives import diffusion_target, min_snr_weight
from sdloom.training.train import add_train_args, config_from_args, lr_factor, main, train

from tiny import TINY_SD1, tiny_model

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
          "yellow": (240, 220, 30)}


def make_shapes(root: Path) -> Path:
    """16 images 32×32 (4 colours × square/circle × small/large) + metadata.jsonl, and one
    held-out row."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLORS.items():
        for shape in ("square", "circle"):
            for size, box in (("small", (10, 10, 22, 22)), ("large", (4, 4, 28, 28))):
                im = Image.new("RGB", (32, 32), "white")
                draw = ImageDraw.Draw(im)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
                fn = f"{name}-{shape}-{size}.png"
                im.save(root / fn)
                rows.append({"file_name": fn, "text": f"a {size} {name} {shape}"})
    rows.append({"file_name": rows[0]["file_name"], "text": "held out", "holdout": True})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("init") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, p)
    return p


def cfg(init, **kw):
    base = dict(what="unet", model=str(init), resolution=32, batch_size=4, lr=2e-3, warmup=2,
                steps=30, save_every=1000, log_every=1, caption_dropout=0.0, seed=3)
    base.update(kw)
    return TrainConfig().override(base)


def trainer_state(out: Path) -> dict:
    """trainer.pt of the run's newest state."""
    return torch.load(find_state(Path(out)) / "trainer.pt", weights_only=True)


def unet_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


# ------------------------------------------------------------------ data

def test_captions_from_txt_files_and_metadata_jsonl(tmp_path, data):
    items = read_items(data)
    assert len(items) == 16 and items[0].text == "a small red square" and items[0].row == 0
    assert len(read_items(data, include_holdout=True)) == 17
    folder = tmp_path / "txt"
    folder.mkdir()
    for name in ("b", "a"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
    (folder / "a.txt").write_text("first caption\n")
    assert [(i.path.name, i.text) for i in read_items(folder)] == [("a.png", "first caption"),
                                                                     ("b.png", "")]
    (folder / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(SdloomError, match="row 1"):
        read_items(folder)
    with pytest.raises(SdloomError, match="not found"):
        read_items(tmp_path / "missing")


def test_resize_crop_flip_and_caption_dropout(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    arr = np.zeros((32, 128, 3), np.uint8)
    arr[:, :16] = 255  # white on the left, red on the right, black between
    arr[:, 112:, 0] = 200
    Image.fromarray(arr).save(folder / "x.png")
    (folder / "x.txt").write_text("wide")
    ds = ImageCaptionDataset(folder, 16, flip=True, random_crop=True, caption_dropout=0.5)
    center = ds.image(0)
    assert center.shape == (3, 16, 16) and center.min() >= -1 and center.max() <= 1
    # shorter side 32 → 16: the image becomes 64 wide; the centred window (x 24…40) is black
    assert torch.allclose(center, torch.full_like(center, -1.0), atol=0.02)
    augs = [ds.augment(s) for s in range(400)]
    assert augs[5] == ds.augment(5)  # a key gives the same sample every time
    crops = {round(ds.image(0, a)[0, 0, 0].item(), 1) for a in augs[:40]}
    assert len(crops) > 1  # random crops reach the white and the red edges
    flipped = next(a for a in augs if a.flip)
    plain = Augment(False, flipped.crop, False)
    assert torch.equal(ds.image(0, flipped), ds.image(0, plain).flip(-1))
    assert 0.4 < sum(a.flip for a in augs) / 400 < 0.6
    assert 0.4 < sum(ds.caption(0, a) == "" for a in augs) / 400 < 0.6
    assert ImageCaptionDataset(folder, 16).augment(7).flip is False  # options off: no change


def test_training_windows_are_random_squares_cut_from_the_prepared_image(tmp_path):
    folder = tmp_path / "grad"
    folder.mkdir()
    yy, xx = np.mgrid[0:32, 0:32]
    arr = np.stack([yy * 8, xx * 8, np.full_like(yy, 77)], -1).astype(np.uint8)
    Image.fromarray(arr).save(folder / "g.png")  # every pixel tells where it is
    (folder / "g.txt").write_text("gradient")
    full = ImageCaptionDataset(folder, 32, flip=True)
    ds = ImageCaptionDataset(folder, 32, flip=True, window=8)
    assert ds.image(0).shape == (3, 8, 8)
    assert torch.equal(ds.image(0), full.image(0)[:, 12:20, 12:20])  # no augmentation: centred
    seen = set()
    for seed in range(200):
        a = ds.augment(seed)
        assert a.flip == full.augment(seed).flip  # the window draws come after the others
        x = ds.image(0, a)
        whole = full.image(0, full.augment(seed))  # the same flip, uncut
        y0 = round(24 * a.window[1])
        x0 = round(24 * a.window[0])
        assert torch.equal(x, whole[:, y0:y0 + 8, x0:x0 + 8])
        seen.add((y0, x0))
    assert len(seen) > 100 and {y for y, _ in seen} >= {0, 24}  # reaching every edge
    assert ImageCaptionDataset(folder, 32).augment(3).window == (0.5, 0.5)  # off: no draw used
    with pytest.raises(SdloomError, match="window does not fit"):
        ImageCaptionDataset(folder, 32, window=40)


def test_caption_templates(tmp_path, data):
    plain = ImageCaptionDataset(data, 32, caption_dropout=0.2)
    ds = ImageCaptionDataset(data, 32, caption_dropout=0.2, caption_templates=("{}", "a {} x"))
    augs = [ds.augment(s) for s in range(400)]
    caps = [ds.caption(1, a) for a in augs]
    text = ds.items[1].text
    assert set(caps) == {"", text, f"a {text} x"}
    assert 0.3 < caps.count(f"a {text} x") / 400 < 0.5  # half of the 80% not dropped
    # templates add a draw after the others: flips, crops and dropout are unchanged
    assert [plain.caption(1, plain.augment(s)) == "" for s in range(400)] == \
        [c == "" for c in caps]
    assert ds.caption(1) == text  # no augmentation: the caption as written
    cfg = TrainConfig().override({"caption_templates": "{}|a {}"})
    assert cfg.caption_templates == ("{}", "a {}")
    with pytest.raises(SdloomError, match="caption template"):
        TrainConfig().override({"caption_templates": "a photo"}).validate()


def test_caption_variants(tmp_path, data):
    root = tmp_path / "v"
    root.mkdir()
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        (root / r["file_name"]).write_bytes((data / r["file_name"]).read_bytes())
    rows[1]["variants"] = ["one", "two", "three"]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = ImageCaptionDataset(root, 32, caption_dropout=0.2, flip=True)
    ds = ImageCaptionDataset(root, 32, caption_dropout=0.2, flip=True, caption_variants=True)
    text = ds.items[1].text
    caps = [ds.caption(1, ds.augment(s)) for s in range(1200)]
    counts = {c: caps.count(c) for c in set(caps)}
    assert set(counts) == {"", text, "one", "two", "three"}
    kept = 1200 - counts[""]
    assert 0.42 < counts[text] / kept < 0.58  # half keep the caption
    assert all(0.1 < counts[v] / kept < 0.23 for v in ("one", "two", "three"))
    # the variant is drawn after the others: flips and dropout are unchanged; rows without
    # variants keep their caption; without the option the column is ignored
    assert [(plain.augment(s).flip, plain.caption(1, plain.augment(s)) == "")
            for s in range(300)] == [(ds.augment(s).flip, c == "") for s, c in
                                     zip(range(300), caps)]
    assert {ds.caption(0, ds.augment(s)) for s in range(100)} == {"", ds.items[0].text}
    assert {plain.caption(1, plain.augment(s)) for s in range(100)} == {"", text}
    assert ds.caption(1) == text
    rows[1]["variants"] = "one"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SdloomError, match="variants must be a list"):
        ImageCaptionDataset(root, 32)


def test_buckets_batches_shards_and_resume_positions(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(12):
        w, h = (48, 24) if i % 3 == 0 else (24, 24)
        Image.new("RGB", (w, h), (i * 20, 0, 0)).save(folder / f"{i:02d}.png")
    assert all(w * h <= 64 * 64 and w % 8 == 0 and h % 8 == 0 for w, h in bucket_sizes(64, 8))
    ds = ImageCaptionDataset(folder, 32, buckets=True, bucket_step=8)
    wide = [s for i, s in enumerate(ds.sizes) if i % 3 == 0]
    assert len(set(wide)) == 1 and wide[0][0] > wide[0][1]
    assert ds.image(0).shape[1:] == (wide[0][1], wide[0][0])
    s = BatchSampler(ds.sizes, 2, seed=1)
    for batch in s.epoch(0) + s.epoch(1):
        assert len({ds.sizes[i] for i, _ in batch}) == 1  # one bucket per batch
    batch = collate([ds[k] for k in s.epoch(0)[0]])
    assert batch["pixels"].shape[0] == 2 and len(batch["captions"]) == 2
    assert s.epoch(0) != s.epoch(1) and s.epoch(3) == BatchSampler(ds.sizes, 2, 1).epoch(3)
    stream = s.from_position(0)
    flat = [next(stream) for _ in range(3 * len(s))]
    assert flat == s.epoch(0) + s.epoch(1) + s.epoch(2)
    assert next(s.from_position(len(s) + 2)) == s.epoch(1)[2]
    r0, r1 = BatchSampler(ds.sizes, 2, 1, 0, 2), BatchSampler(ds.sizes, 2, 1, 1, 2)
    i0 = {i for b in r0.epoch(0) for i, _ in b}
    i1 = {i for b in r1.epoch(0) for i, _ in b}
    assert len(r0) == len(r1) == len(s) // 2 and not i0 & i1
    with pytest.raises(SdloomError, match="fewer than one batch"):
        BatchSampler(ds.sizes, 13, 0)


def test_images_npy_is_used_when_fresh(tmp_path, data):
    folder = tmp_path / "npy"
    folder.mkdir()
    for p in data.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    png = ImageCaptionDataset(folder, 32).image(3)
    n = len((folder / "metadata.jsonl").read_text().splitlines())
    arr = np.stack([np.asarray(Image.open(folder / json.loads(r)["file_name"]).convert("RGB"))
                    for r in (folder / "metadata.jsonl").read_text().splitlines()])
    np.save(folder / "images.npy", 255 - arr)  # inverted, so its use shows
    assert arr.shape[0] == n
    assert torch.allclose(ImageCaptionDataset(folder, 32).image(3), -png, atol=1e-6)
    small = ImageCaptionDataset(folder, 16).image(3)  # resized from the array
    assert small.shape == (3, 16, 16) and small.mean() < -0.2
    import os
    t = (folder / "images.npy").stat().st_mtime
    os.utime(folder / "metadata.jsonl", (t + 10, t + 10))  # cache older than the metadata
    assert torch.equal(ImageCaptionDataset(folder, 32).image(3), png)


# ------------------------------------------------------------------ config, schedule, objective

def test_config_overrides_presets_and_command_line(tmp_path):
    c = TrainConfig().override({"steps": "12", "flip": "yes", "lr": "3e-4", "text_lr": "none",
                                "sample_prompts": "a cat|a dog", "adam_betas": "0.8,0.9"})
    assert (c.steps, c.flip, c.lr, c.text_lr) == (12, True, 3e-4, None)
    assert c.sample_prompts == ("a cat", "a dog") and c.adam_betas == (0.8, 0.9)
    assert TrainConfig.load(_write(tmp_path / "c.json", c.to_json())) == c
    with pytest.raises(SdloomError, match="unknown training option"):
        TrainConfig().override({"stepz": 1})
    with pytest.raises(SdloomError, match="prediction"):
        TrainConfig(prediction="x0").validate()
    for p in PRESETS.values():
        TrainConfig().override(p).validate()
    ap = argparse.ArgumentParser()
    add_train_args(ap)
    a = ap.parse_args(["--data", "d", "--output", str(tmp_path), "--preset", "lora",
                       "--steps", "7", "--flip", "--no-cache-latents", "--set", "seed=5",
                       "--sample-prompts", "x", "y", "--config",
                       str(_write(tmp_path / "f.json", '{"lora_rank": 4, "steps": 99}'))])
    c = config_from_args(a)
    assert (c.what, c.steps, c.flip, c.cache_latents, c.seed, c.lora_rank) == \
        ("lora", 7, True, False, 5, 4)
    assert c.sample_prompts == ("x", "y")
    _write(tmp_path / "config.json", TrainConfig(steps=50, lr=0.5).to_json())
    r = config_from_args(ap.parse_args(["--data", "d", "--output", str(tmp_path), "--resume",
                                        "--steps", "60"]))
    assert (r.lr, r.steps) == (0.5, 60)  # a resume keeps the run's config, flags on top


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_lr_schedule_and_ema():
    c = TrainConfig(warmup=4, steps=14, schedule="cosine")
    assert [lr_factor(c, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(c, 9) == pytest.approx(0.5) and lr_factor(c, 14) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(warmup=0, steps=10, schedule="linear"), 5) == 0.5
    m = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(m.weight)
    ema = EMA(m, 0.5, warmup=False)
    for v in (1.0, 2.0):
        m.weight.data.fill_(v)
        ema.update(m)
    assert ema.shadow["weight"].item() == 0.5 * (0.5 * 1.0) + 0.5 * 2.0  # 1.25
    warm = EMA(m, 0.999)
    assert warm.current_decay() == pytest.approx(2 / 11)  # LDM's (1+n)/(10+n)
    backup = ema.copy_to(m)
    assert m.weight.item() == 1.25
    ema.restore(m, backup)
    assert m.weight.item() == 2.0
    again = EMA(m, 0.5, warmup=False)
    again.load_state_dict(ema.state_dict())
    assert again.shadow["weight"].item() == 1.25 and again.updates == 2


def test_v_target_and_min_snr_weights():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    a = torch.tensor([0.9, 0.5, 0.01]).view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = diffusion_target(x0, eps, a, "v")
    # v-parameterisation identities (Salimans & Ho 2022, §4)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0)
    torch.testing.assert_close((1 - a).sqrt() * xt + a.sqrt() * v, eps)
    assert diffusion_target(x0, eps, a, "eps") is eps
    snr = torch.tensor([20.0, 5.0, 0.5])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "eps"), torch.tensor([0.25, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"),
                               torch.tensor([5 / 21, 5 / 6, 0.5 / 1.5]))


# ------------------------------------------------------------------ training runs

def test_unet_loss_decreases_checkpoint_loads_and_generates(data, init_ckpt, tmp_path):
    calls = []

    def sampler(model, prompts, step):
        calls.append((step, list(prompts), model.training))
        return [Image.new("RGB", (8, 8), (step, 0, 0)) for _ in prompts]

    c = cfg(init_ckpt, steps=40, sample_every=20, sample_prompts="one|two|three")
    res = train(c, data, tmp_path, progress=False, sample_fn=sampler)
    first, last = sum(res["losses"][:8]) / 8, sum(res["losses"][-8:]) / 8
    assert len(res["losses"]) == 40 and last < 0.8 * first, (first, last)
    assert [(s, p, t) for s, p, t in calls] == [(20, ["one", "two", "three"], False),
                                               (40, ["one", "two", "three"], False)]
    grid = Image.open(tmp_path / "samples" / "step-0000040.png")
    assert grid.size == (16, 16)  # 3 images in 2×2, the grid of 8×8 tiles
    loaded = load_model(tmp_path / "model.safetensors").model
    trained, saved = unet_params(res["model"]), unet_params(loaded)
    before = unet_params(load_model(init_ckpt).model)
    assert all(torch.equal(trained[k], saved[k]) for k in trained)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and {"loss", "lr", "grad_norm"} <= json.loads(lines[-1]).keys()
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 40
    st = trainer_state(tmp_path)
    assert st["step"] == 40 and st["optimizer"]["state"]
    assert [p.name for p in (tmp_path / "states").iterdir()] == ["step-0000040"]
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    eng = Engine.load(tmp_path / "model.safetensors", device="cpu", precision="fp32")
    img = generate(eng, GenerationParams(prompt="a red square", steps=3, seed=1)).images[0]
    assert img.size == (64, 64)


def test_resume_reproduces_the_uninterrupted_run(data, init_ckpt, tmp_path):
    c = cfg(init_ckpt, steps=8, what="full", ema_decay=0.9, flip=True, caption_dropout=0.3,
            grad_accum=2, batch_size=3, prediction="v", min_snr_gamma=5.0, offset_noise=0.1,
            save_every=3)
    res = train(c, data, tmp_path / "a", progress=False)
    full = res["losses"]
    part = train(c, data, tmp_path / "b", progress=False, stop_after=5)["losses"]
    assert trainer_state(tmp_path / "b")["step"] == 5
    rest = train(c, data, tmp_path / "b", resume=True, progress=False)["losses"]
    assert len(part) == 5 and len(rest) == 3
    torch.testing.assert_close(torch.tensor(part + rest), torch.tensor(full), rtol=0, atol=1e-6)
    a = load_model(tmp_path / "a" / "model.safetensors").model
    b = load_model(tmp_path / "b" / "model.safetensors").model
    assert a.config.prediction == "v"  # the objective trained is what the file says
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    # the file holds the EMA weights (of U-Net and text encoder), not the raw ones
    shadow = trainer_state(tmp_path / "a")["ema"]["shadow"]
    raw = dict(res["model"].named_parameters())
    assert {k.split(".")[0] for k in shadow} == {"model", "cond_stage_model"}
    assert all(torch.equal(sa[k], v) for k, v in shadow.items())
    assert any(not torch.equal(sa[k], raw[k]) for k in shadow)


def test_first_step_matches_a_hand_computation(data, init_ckpt, tmp_path):
    """Step 1 by hand: the sampler's first batch, t and ε drawn from the seeded generator,
    x_t = √ᾱ·x0 + √(1−ᾱ)·ε, MSE to ε (Ho et al. 2020); AdamW's first update is −lr_t·sign(g)."""
    from sdloom.sampling.schedules import DiscreteSchedule
    from sdloom.tokenizer import get_tokenizer
    c = cfg(init_ckpt, steps=1, warmup=2, weight_decay=0.0, grad_clip=0.0)
    res = train(c, data, tmp_path, progress=False)
    m = load_model(init_ckpt).model
    ds = ImageCaptionDataset(data, 32)
    idx = [i for i, _ in BatchSampler(ds.sizes, 4, c.seed).epoch(0)[0]]
    ids = get_tokenizer()([ds.items[i].text for i in idx],
                          pad_token=m.config.text_encoders[0].pad_token)
    gen = torch.Generator().manual_seed(c.seed * 7919)
    t = torch.randint(0, 1000, (4,), generator=gen)
    with torch.no_grad():
        x0 = m.first_stage_model.latent_from_image(torch.stack([ds.image(i) for i in idx]))
        context = m.text_encoders[0](ids)[0]
    eps = torch.randn(x0.shape, generator=gen)
    a = DiscreteSchedule.scaled_linear(1000, m.config.linear_start, m.config.linear_end
                                       ).alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    m.unet.requires_grad_(True)
    loss = (m.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, context) - eps).pow(2).mean()
    assert res["losses"] == [pytest.approx(loss.item(), rel=1e-5)]
    loss.backward()
    lr = c.lr * lr_factor(c, 0)
    assert lr == c.lr / 2 and json.loads((tmp_path / "metrics.jsonl").read_text())["lr"] == lr
    trained = dict(res["model"].unet.named_parameters())
    for name, p in m.unet.named_parameters():
        big = p.grad.abs() > 1e-4  # |g| ≫ Adam's ε: the step is lr in size
        delta = (trained[name] - p).detach()[big]
        torch.testing.assert_close(delta, -lr * p.grad[big].sign(), rtol=2e-3, atol=1e-8)


def test_vae_loss_decreases_with_discriminator_and_scale(data, init_ckpt, tmp_path):
    c = cfg(init_ckpt, what="vae", steps=24, lr=3e-3, adv_weight=0.05, adv_start=12,
            log_every=4, flip=True)
    res = train(c, data, tmp_path, progress=False)
    assert sum(res["losses"][-4:]) < 0.8 * sum(res["losses"][:4])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "disc_loss" not in rows[0] and "disc_loss" in rows[-1]
    assert "disc" in trainer_state(tmp_path)
    m = load_model(tmp_path / "model.safetensors").model
    ds = ImageCaptionDataset(data, 32)
    with torch.no_grad():
        z = m.vae.latent_from_image(torch.stack([ds.image(i) for i in range(16)]))
    assert z.std().item() == pytest.approx(1.0, rel=0.05)  # scale_by_std stored in the file


def test_lora_file_has_kohya_keys_and_matches_training(data, init_ckpt, tmp_path):
    c = cfg(init_ckpt, what="lora", steps=12, lr=1e-2, lora_rank=4, lora_alpha=2,
            lora_text_encoder=True)
    res = train(c, data, tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "lora.safetensors"))
    ups = [k for k in sd if k.endswith(".lora_up.weight")]
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    assert sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert all(sd[k].abs().sum() > 0 for k in ups)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    from sdloom.families.sd_lora import lora_targets
    from sdloom.models.lora import LoraManager, read_lora
    m = load_model(init_ckpt).model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500])
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        before = m.unet(x, t, m.text_encoders[0](ids)[0])
        mgr = LoraManager(m, lambda: lora_targets(m))
        assert mgr.apply(read_lora(tmp_path / "lora.safetensors"), 1.0) == len(ups)
        merged = m.unet(x, t, m.text_encoders[0](ids)[0])
        tm = res["model"].eval()  # the adapters as trained, not merged
        trained = tm.unet(x, t, tm.text_encoders[0](ids)[0])
    assert not torch.allclose(before, merged, atol=1e-4)
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)


def test_buckets_and_workers_keep_the_data_identical(init_ckpt, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (name, rgb) in enumerate(list(COLORS.items()) * 2):
        im = Image.new("RGB", (96, 48) if i % 2 else (48, 48), "white")
        ImageDraw.Draw(im).ellipse((8, 8, 40, 40), fill=rgb)
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} {'wide' if i % 2 else 'square'} picture")
    c = cfg(init_ckpt, resolution=48, buckets=True, bucket_step=16, batch_size=2, steps=4,
            random_crop=True, flip=True, caption_dropout=0.2)
    a = train(c, folder, tmp_path / "a", progress=False)["losses"]
    b = train(c.override({"num_workers": 2}), folder, tmp_path / "b", progress=False)["losses"]
    assert a == b  # workers see keys only: the same crops, flips and captions
    centred = c.override({"random_crop": False})  # latents cached once vs encoded every step
    cached = train(centred, folder, tmp_path / "c", progress=False)["losses"]
    fresh = train(centred.override({"cache_latents": False}), folder, tmp_path / "e",
                  progress=False)["losses"]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(fresh), rtol=1e-5, atol=1e-6)
    with pytest.raises(SdloomError, match="multiples of 16"):
        train(c.override({"bucket_step": 8}), folder, tmp_path / "d", progress=False)


def test_command_line_stop_and_resume_bf16(data, init_ckpt, tmp_path, capsys):
    args = ["--data", str(data), "--output", str(tmp_path), "--model", str(init_ckpt),
            "--resolution", "32", "--batch-size", "4", "--steps", "4", "--warmup", "1",
            "--precision", "bf16", "--no-progress", "--set", "log_every=1",
            "--sample-every", "4", "--sample-steps", "2", "--sample-prompts", "a cat", "a dog"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert trainer_state(tmp_path)["step"] == 2
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if it had run on past its last save
        f.write('{"step": 3, "loss": -1.0}\n')
    assert main(["--data", str(data), "--output", str(tmp_path), "--resume",
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] > 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "trained to step 4" in capsys.readouterr().err
    # the txt2img pipeline drew the sample grid: two images (64×64, its smallest) side by side
    assert Image.open(tmp_path / "samples" / "step-0000004.png").size == (128, 64)
    assert main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 1
