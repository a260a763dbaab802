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


def test_img2img_and_inpaint_keep_size_and_unmasked_pixels(engine):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    out = run(engine, prompt="x", seed=1, init_image=init, denoising_strength=0.5)
    assert out.images[0].size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    res = run(engine, prompt="x", seed=1, init_image=init, mask=mask, mask_blur=0)
    px = res.images[0].load()
    assert px[2, 2] == (200, 30, 30)  # outside the mask: the original, exactly
    assert px[32, 32] != (200, 30, 30)
    only = run(engine, prompt="x", seed=1, init_image=init, mask=mask, inpaint_full_res=True,
               inpaint_full_res_padding=4, mask_blur=0)
    assert only.images[0].size == (64, 64) and only.images[0].load()[2, 2] == (200, 30, 30)
    canvas, m = outpaint_canvas(init, left=16, right=0, top=0, bottom=8)
    assert canvas.size == (80, 72) and m.getpixel((0, 0)) == 255 and m.getpixel((40, 30)) == 0


def test_hires_fix_and_bad_input(engine):
    out = run(engine, prompt="x", seed=3, width=64, height=64, enable_hr=True, hr_scale=1.5,
              denoising_strength=0.5)
    assert out.images[0].size == (96, 96)
    with pytest.raises(SdloomError, match="multiple of 8"):
        run(engine, prompt="x", width=65)
    with pytest.raises(SdloomError, match="unknown sampler"):
        run(engine, prompt="x", sampler_name="Nope")
    with pytest.raises(SdloomError, match="mask size"):
        run(engine, prompt="x", init_image=Image.new("RGB", (64, 64)),
            mask=Image.new("L", (32, 32)))


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


def test_prompt_editing_changes_conditioning_midway(engine):
    a = run(engine, prompt="[cat:dog:2]", seed=5, steps=4)
    cat = run(engine, prompt="cat", seed=5, steps=4)
    dog = run(engine, prompt="dog", seed=5, steps=4)
    assert a.images[0].tobytes() not in (cat.images[0].tobytes(), dog.images[0].tobytes())
