"""End to end on a tiny random SD-shaped model: sizes, determinism, batches, img2img, inpaint."""
import pytest
import torch
from PIL import Image

from sdloom.checkpoints.save import save_model
from sdloom.errors import SdloomError
from sdloom.infotext import parse_infotext
from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate, outpaint_canvas
from sdloom.pipelines.params import GenerationParams

from tiny import TINY_SD1, tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    return Engine.load(path, device="cpu", precision="fp32")


def run(engine, **kw):
    kw.setdefault("steps", 4)
    return generate(engine, GenerationParams(**kw))


def test_txt2img_size_determinism_and_infotext(engine):
    a = run(engine, prompt="a red apple", seed=42, width=64, height=96)
    b = run(engine, prompt="a red apple", seed=42, width=64, height=96)
    c = run(engine, prompt="a red apple", seed=43, width=64, height=96)
    assert a.images[0].size == (64, 96)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert a.images[0].tobytes() != c.images[0].tobytes()
    info = parse_infotext(a.infotexts[0])
    assert info["Prompt"] == "a red apple" and info["Seed"] == "42" and info["Size"] == "64x96"
    assert info["Sampler"] == "DPM++ 2M" and info["Schedule type"] == "Karras"
    assert info["Model hash"] == engine.hash and len(engine.hash) == 10


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Euler a", "DPM++ 2M SDE"])
def test_batch_equals_single_images_with_consecutive_seeds(engine, sampler):
    # ancestral and SDE samplers too: each image's sampling noise comes from its own generator
    batch = run(engine, prompt="cat", seed=7, batch_size=2, sampler_name=sampler)
    one = run(engine, prompt="cat", seed=7, sampler_name=sampler)
    two = run(engine, prompt="cat", seed=8, sampler_name=sampler)
    assert batch.seeds == [7, 8]
    for got, want in zip(batch.images, one.images + two.images):
        diff = (torch.tensor(list(got.getdata())) - torch.tensor(list(want.getdata()))).abs()
        assert diff.max() <= 1  # same noise; batched matmuls may differ in the last bit


def test_all_prompts_gives_each_image_its_prompt(engine):
    batch = run(engine, prompt="ignored", all_prompts=["cat", "red dog"], seed=7, batch_size=2,
                sampler_name="Euler")
    one = run(engine, prompt="cat", seed=7, sampler_name="Euler")
    two = run(engine, prompt="red dog", seed=8, sampler_name="Euler")
    for got, want in zip(batch.images, one.images + two.images):
        diff = (torch.tensor(list(got.getdata())) - torch.tensor(list(want.getdata()))).abs()
        assert diff.max() <= 2
    assert [parse_infotext(t)["Prompt"] for t in batch.infotexts] == ["cat", "red dog"]
    with pytest.raises(SdloomError, match="all_prompts"):
        run(engine, all_prompts=["a"], batch_size=2)


def test_and_prompts_combine_guidance(engine):
    def pixels(**kw):
        return torch.tensor(list(run(engine, seed=3, sampler_name="Euler", **kw)
                                 .images[0].getdata()), dtype=torch.float32)
    cat = pixels(prompt="cat")
    # u + s·(½(c−u) + ½(c−u)) = u + s·(c−u); a part of weight 0 changes nothing
    assert (pixels(prompt="cat:0.5 AND cat:0.5") - cat).abs().max() <= 2
    assert (pixels(prompt="cat AND red dog:0") - cat).abs().max() <= 2
    both = pixels(prompt="cat AND red dog")
    assert (both - cat).abs().max() >= 8  # the second part moves the image (here by 10)
    # a batch mixing AND prompts and plain ones: each image as its single run (up to the last
    # bits of batched matmuls, which can round a pixel either way)
    batch = run(engine, all_prompts=["cat AND red dog", "cat"], batch_size=2, seed=3,
                sampler_name="Euler")
    second = run(engine, prompt="cat", seed=4, sampler_name="Euler").images[0]
    got = [torch.tensor(list(im.getdata()), dtype=torch.float32) for im in batch.images]
    assert (got[0] - both).abs().max() <= 2
    assert (got[1] - torch.tensor(list(second.getdata()), dtype=torch.float32)).abs().max() <= 2


# ------------------------------------------------------------------ A1111's step rules
# A recording denoiser sees every U-Net call: its sigma and the context it was given. The
# expected values are A1111's rules written out here (sd_samplers_kdiffusion.sample_img2img,
# sd_samplers_common.setup_img2img_steps, prompt_parser, CFGDenoiser.step), not our output.

class Recorder:
    def __init__(self, inner):
        self.inner, self.sigmas, self.contexts = inner, [], []

    def __call__(self, x, sigma, **kw):
        self.sigmas.append(float(sigma.flatten()[0]))
        self.contexts.append(kw["context"][0].clone())  # row 0: image 0's cond
        return self.inner(x, sigma, **kw)


@pytest.fixture
def recorder(engine, monkeypatch):
    rec = Recorder(engine.denoiser)
    monkeypatch.setattr(engine, "denoiser", rec)
    return rec


def a1111_sigmas(engine, steps, sampler="Euler"):
    from sdloom.sampling.samplers import resolve_sampler
    spec, sched = resolve_sampler(sampler, "automatic")
    return [float(s) for s in spec.sigmas(sched, steps, engine.schedule)]


def progress_log():
    log = []
    return log, lambda step, total, _x: log.append((step, total))


def test_img2img_runs_int_strength_times_steps_plus_one_steps(engine, recorder):
    log, cb = progress_log()
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    generate(engine, GenerationParams(prompt="x", seed=1, steps=20, sampler_name="Euler",
                                      init_image=init, denoising_strength=0.75), cb)
    t_enc = int(min(0.75, 0.999) * 20)  # A1111: 15, and t_enc + 1 = 16 steps
    want = a1111_sigmas(engine, 20)[20 - t_enc - 1:-1]
    assert recorder.sigmas == pytest.approx(want) and len(want) == 16
    assert log[-1] == (16, 16) and {t for _, t in log} == {16}


def test_hires_pass_runs_exactly_the_requested_steps(engine, recorder):
    log, cb = progress_log()
    generate(engine, GenerationParams(prompt="x", seed=1, steps=6, sampler_name="Euler",
                                      width=64, height=64, enable_hr=True, hr_scale=1.5,
                                      hr_second_pass_steps=10, denoising_strength=0.3), cb)
    # A1111 (setup_img2img_steps with steps given): total = int(10 / 0.3) = 33 sigmas' schedule,
    # t_enc = 10 − 1, and sigmas[total − t_enc − 1:] → exactly 10 steps
    total = int(10 / 0.3)
    want = a1111_sigmas(engine, 6)[:-1] + a1111_sigmas(engine, total)[total - 10:-1]
    assert recorder.sigmas == pytest.approx(want)
    assert log[-1] == (16, 16) and {t for _, t in log} == {16}


def which(engine, contexts, words, clip_skip=1):
    enc = {w: engine.prompt_encoder.encode([w], clip_skip)[0].context[0] for w in words}
    return [next(w for w, c in enc.items() if torch.allclose(ctx.float(), c.float(), atol=1e-5))
            for ctx in contexts]


def test_prompt_editing_switches_on_a1111s_step_counter(engine, recorder):
    # txt2img, 10 steps, [cat:dog:4]: A1111 uses "cat" while step <= 4, step counted from 0
    generate(engine, GenerationParams(prompt="[cat:dog:4]", seed=1, steps=10,
                                      sampler_name="Euler"))
    assert which(engine, recorder.contexts, ["cat", "dog"]) == \
        ["cat" if s <= 4 else "dog" for s in range(10)]


def test_prompt_editing_counts_calls_not_steps_for_heun(engine, recorder):
    # A1111's CFGDenoiser.step counts model calls: Heun calls twice per step but the last
    generate(engine, GenerationParams(prompt="[cat:dog:3]", seed=1, steps=4,
                                      sampler_name="Heun"))
    calls = 2 * 4 - 1
    assert which(engine, recorder.contexts, ["cat", "dog"]) == \
        ["cat" if s <= 3 else "dog" for s in range(calls)]


def test_prompt_editing_in_img2img_counts_from_the_first_img2img_step(engine, recorder):
    # A1111 schedules on p.steps (20) and its step counter starts at 0 in the img2img pass:
    # [cat:dog:10] at strength 0.5 runs 11 steps, 0..10, all "cat"
    generate(engine, GenerationParams(prompt="[cat:dog:10]", seed=1, steps=20,
                                      sampler_name="Euler", init_image=Image.new("RGB", (64, 64)),
                                      denoising_strength=0.5))
    assert which(engine, recorder.contexts, ["cat", "dog"]) == ["cat"] * 11


def test_prompt_editing_in_the_hires_pass_counts_on_from_the_first_pass(engine, recorder):
    # [cat:dog:25] with 20 + 10 hires steps: the first pass is all "cat"; the hires schedule
    # counts integers on from 20 (prompt_parser with hires_steps), so it switches after hires
    # step 25 − 20 = 5
    generate(engine, GenerationParams(prompt="[cat:dog:25]", seed=1, steps=20,
                                      sampler_name="Euler", width=64, height=64, enable_hr=True,
                                      hr_scale=1.5, hr_second_pass_steps=10,
                                      denoising_strength=0.5))
    got = which(engine, recorder.contexts, ["cat", "dog"])
    assert got[:20] == ["cat"] * 20
    assert got[20:] == ["cat" if s <= 25 - 20 else "dog" for s in range(10)]


def test_cond_and_uncond_of_different_lengths_run_unpadded(engine, recorder):
    # A1111's default (pad_cond_uncond off): a 2-chunk prompt and a 1-chunk negative run as two
    # U-Net calls, each with its own length
    long = " ".join(["cat"] * 100)
    generate(engine, GenerationParams(prompt=long, negative_prompt="dog", seed=1, steps=2,
                                      sampler_name="Euler"))
    assert [c.shape[0] for c in recorder.contexts] == [154, 77, 154, 77]


# ------------------------------------------------------------------ sizes, masks, seeds

@pytest.mark.parametrize("w,h", [(136, 128), (200, 152), (88, 88)])
def test_any_multiple_of_8_works_in_every_mode(engine, w, h):
    t2i = run(engine, prompt="x", seed=1, width=w, height=h, steps=2)
    assert t2i.images[0].size == (w, h)
    init = t2i.images[0]
    i2i = run(engine, prompt="x", seed=1, init_image=init, denoising_strength=0.5, steps=2,
              width=w, height=h)
    assert i2i.images[0].size == (w, h)
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (8, 8, w // 2, h // 2))
    inp = run(engine, prompt="x", seed=1, init_image=init, mask=mask, steps=2, width=w, height=h)
    only = run(engine, prompt="x", seed=1, init_image=init, mask=mask, steps=2, width=w,
               height=h, inpaint_full_res=True)
    assert inp.images[0].size == only.images[0].size == (w, h)
    canvas, m = outpaint_canvas(init, left=8, bottom=16)
    out = run(engine, prompt="x", seed=1, init_image=canvas, mask=m, steps=2,
              width=canvas.width, height=canvas.height, inpainting_fill=0)
    assert out.images[0].size == (w + 8, h + 16)
    hr = run(engine, prompt="x", seed=1, width=w, height=h, steps=2, enable_hr=True,
             hr_scale=1.5, denoising_strength=0.5)
    assert hr.images[0].size == (int(w * 1.5) // 8 * 8, int(h * 1.5) // 8 * 8)


def test_sizes_not_multiple_of_8_are_rounded_down_and_recorded(engine):
    out = run(engine, prompt="x", seed=1, width=70, height=101, steps=2)
    assert out.images[0].size == (64, 96)
    assert parse_infotext(out.infotexts[0])["Size"] == "64x96"


def test_inpaint_keeps_unmasked_pixels_and_reads_alpha_masks(engine):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    res = run(engine, prompt="x", seed=1, init_image=init, mask=mask, mask_blur=0)
    px = res.images[0].load()
    assert px[2, 2] == (200, 30, 30)  # outside the mask: the original, exactly
    assert px[32, 32] != (200, 30, 30)
    # the same mask as transparency: A1111 takes the alpha channel (opaque = repaint) when it
    # is not all opaque, whatever the colours say
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    rgba.paste((0, 0, 0, 255), (16, 16, 48, 48))
    alpha = run(engine, prompt="x", seed=1, init_image=init, mask=rgba, mask_blur=0)
    assert alpha.images[0].tobytes() == res.images[0].tobytes()
    only = run(engine, prompt="x", seed=1, init_image=init, mask=mask, inpaint_full_res=True,
               inpaint_full_res_padding=4, mask_blur=0)
    assert only.images[0].size == (64, 64) and only.images[0].load()[2, 2] == (200, 30, 30)
    info = parse_infotext(only.infotexts[0])
    assert info["Inpaint area"] == "Only masked" and info["Masked area padding"] == "4"
    canvas, m = outpaint_canvas(init, left=16, right=0, top=0, bottom=8)
    assert canvas.size == (80, 72) and m.getpixel((0, 0)) == 255 and m.getpixel((40, 30)) == 0


def test_only_masked_crops_to_the_a1111_region(engine, recorder):
    # a 16×8 mask in a 128×64 image, padding 4, processing 64×64: A1111's box is the bbox
    # grown by the padding, (44, 12, 68, 28), then grown to the 1:1 ratio around its centre:
    # height 16 → 24, y from 8 to 32; the crop is processed at 64×64 and pasted back
    init = Image.new("RGB", (128, 64), (10, 200, 10))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (48, 16, 64, 24))
    from sdloom.images import crop_region
    assert crop_region(mask, 4, 64, 64) == (44, 8, 68, 32)
    out = run(engine, prompt="x", seed=1, init_image=init, mask=mask, mask_blur=0,
              inpaint_full_res=True, inpaint_full_res_padding=4, width=64, height=64)
    assert out.images[0].size == (128, 64)
    assert out.images[0].getpixel((20, 50)) == (10, 200, 10)


def test_ensd_and_seed_resize_reach_the_sampler(engine):
    base = dict(prompt="x", seed=5, steps=3)
    plain = run(engine, **base, sampler_name="Euler a")
    ensd = run(engine, **base, sampler_name="Euler a", eta_noise_seed_delta=31337)
    assert ensd.images[0].tobytes() != plain.images[0].tobytes()
    assert parse_infotext(ensd.infotexts[0])["ENSD"] == "31337"
    # a deterministic sampler draws no noise while sampling: ENSD changes nothing
    e1 = run(engine, **base, sampler_name="Euler")
    e2 = run(engine, **base, sampler_name="Euler", eta_noise_seed_delta=31337)
    assert e1.images[0].tobytes() == e2.images[0].tobytes()
    same = run(engine, **base, sampler_name="Euler", seed_resize_from_w=64, seed_resize_from_h=64)
    assert same.images[0].tobytes() == e1.images[0].tobytes()
    other = run(engine, **base, sampler_name="Euler", seed_resize_from_w=32, seed_resize_from_h=48)
    assert other.images[0].tobytes() != e1.images[0].tobytes()
    assert parse_infotext(other.infotexts[0])["Seed resize from"] == "32x48"


def test_bad_input(engine):
    with pytest.raises(SdloomError, match="unknown sampler"):
        run(engine, prompt="x", sampler_name="Nope")
    with pytest.raises(SdloomError, match="resize mode 3"):
        run(engine, prompt="x", init_image=Image.new("RGB", (64, 64)),
            mask=Image.new("L", (32, 32)), resize_mode=3)
    with pytest.raises(SdloomError, match="at least 64"):
        run(engine, prompt="x", width=0)
    with pytest.raises(SdloomError, match="finite"):
        run(engine, prompt="x", cfg_scale=float("nan"))
    with pytest.raises(SdloomError, match="lone surrogate"):
        run(engine, prompt="x\ud800")
    with pytest.raises(SdloomError, match="max_prompt_chunks"):
        run(engine, prompt="cat " * 75 * 33)


def test_hires_pass_sampler_and_prompt(engine):
    base = dict(prompt="cat", seed=2, width=64, height=64, enable_hr=True, hr_scale=1.5,
                denoising_strength=0.6, sampler_name="DPM++ 2M")
    plain = run(engine, **base)
    same = run(engine, **base, hr_sampler_name="DPM++ 2M", hr_prompt="cat")
    assert same.images[0].tobytes() == plain.images[0].tobytes()  # "the same" changes nothing
    info = parse_infotext(same.infotexts[0])
    assert "Hires sampler" not in info and "Hires prompt" not in info
    other = run(engine, **base, hr_sampler_name="Euler", hr_scheduler="karras",
                hr_prompt="red dog", hr_negative_prompt="blue")
    assert other.images[0].size == (96, 96)
    assert other.images[0].tobytes() != plain.images[0].tobytes()
    info = parse_infotext(other.infotexts[0])
    assert info["Hires sampler"] == "Euler" and info["Hires schedule type"] == "Karras"
    assert info["Hires prompt"] == "red dog" and info["Hires negative prompt"] == "blue"
    with pytest.raises(SdloomError, match="unknown sampler"):
        run(engine, **base, hr_sampler_name="Nope")


def test_broken_and_empty_embeddings_are_reported(engine, tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    Engine(engine.model, path=engine.path, embeddings_dir=tmp_path)
    err = capsys.readouterr().err
    assert "embedding not loaded: " in err and "broken.pt" in err and "empty.safetensors" in err


def test_seeds_up_to_2_64_work_and_beyond_are_refused(engine):
    out = run(engine, prompt="x", seed=2 ** 64 - 2, batch_size=2, steps=1)
    assert out.seeds == [2 ** 64 - 2, 2 ** 64 - 1]
    with pytest.raises(SdloomError, match="seed must be"):
        run(engine, prompt="x", seed=2 ** 64 - 1, batch_size=2, steps=1)
    with pytest.raises(SdloomError, match="mask blur"):
        run(engine, prompt="x", init_image=Image.new("RGB", (64, 64)),
            mask=Image.new("L", (64, 64)), mask_blur=10 ** 9)


def test_used_embeddings_are_recorded_with_their_hash(engine, tmp_path):
    import hashlib

    from safetensors.torch import save_file
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "shinystyle.safetensors"))
    e = Engine(engine.model, path=engine.path, embeddings_dir=tmp_path)
    want = hashlib.sha256((tmp_path / "shinystyle.safetensors").read_bytes()).hexdigest()[:12]
    with_emb = generate(e, GenerationParams(prompt="a shinystyle cat", seed=1, steps=1))
    assert parse_infotext(with_emb.infotexts[0])["TI hashes"] == f"shinystyle: {want}"
    without = generate(e, GenerationParams(prompt="a cat", seed=1, steps=1))
    assert "TI hashes" not in parse_infotext(without.infotexts[0])


def test_non_finite_values_are_caught_not_saved_as_black_images(monkeypatch, capsys):
    # an fp16 VAE that overflows: the image is decoded again in fp32 (A1111's automatic VAE
    # precision) and the log says so; a VAE that gives NaN in fp32 too is an error, and so are
    # NaN latents
    half = Engine(tiny_model().half())
    vae_cls = type(half.model.vae)
    real = vae_cls.decode
    seen = []

    def overflow_in_half(self, z):
        seen.append(z.dtype)
        out = real(self, z)
        return out * float("inf") if z.dtype == torch.float16 else out

    monkeypatch.setattr(vae_cls, "decode", overflow_in_half)
    img = half.decode(torch.randn(1, 4, 8, 8))
    assert torch.isfinite(img).all() and seen == [torch.float16, torch.float32]
    assert "decoding this image in fp32" in capsys.readouterr().err
    assert next(half.model.vae.parameters()).dtype == torch.float16  # left as it was
    monkeypatch.setattr(vae_cls, "decode", lambda self, z: real(self, z) * float("nan"))
    with pytest.raises(SdloomError, match="VAE produced NaN"):
        half.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(SdloomError, match="denoiser produced NaN"):
        half.decode(torch.full((1, 4, 8, 8), float("nan")))
