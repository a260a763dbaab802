"""ControlNet: parity of our ControlNet and of the controlled U-Net with diffusers' ControlNetModel
+ UNet2DConditionModel (SD1- and SDXL-shaped, random weights), both file layouts, the
extension's control modes and guidance window, the weight-free preprocessors, a whole image
against StableDiffusionControlNetPipeline, and the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers

from sdloom.controlnet import (ControlUnit, canny, legacy_hash, load_controlnet,
                               pixel_perfect_res, preprocess)
from sdloom.errors import SdloomError
from sdloom.families.sd_controlnet import (ActiveControl, ControlClock, ControlSet,
                                           ControlledUNet, build_controlnet, controlnet_keys,
                                           detect_controlnet, fit_to_unet, soft_scales)
from sdloom.models.unet import sdxl_adm

from conftest import randomize_
from test_unet import inputs, make_pair


def _diffusers_pair(name: str):
    """(diffusers U-Net, diffusers ControlNetModel.from_unet randomized, our U-Net, cfg)."""
    ref, ours, cfg = make_pair(name)
    cn = diffusers.ControlNetModel.from_unet(ref)
    randomize_(cn, seed=5).eval()
    with torch.no_grad():  # residuals of order 1, so that atol 1e-4 is a real bound
        for p in cn.parameters():
            if p.ndim > 1:
                p.mul_(0.15)
    return ref, cn, ours, cfg


def _ours_from(sd: dict, cfg):
    names = controlnet_keys({k: tuple(v.shape) for k, v in sd.items()})
    shapes = {new: tuple(sd[old].shape) for old, new in names.items()}
    ccfg = fit_to_unet(detect_controlnet(shapes), cfg, cfg.in_channels, "test")
    return build_controlnet(ccfg, {new: sd[old] for old, new in names.items()}, torch.float32,
                            torch.device("cpu"))


def _sdxl_kw(batch=2):
    pooled = torch.randn(batch, 16, generator=torch.Generator().manual_seed(3))
    tids = torch.tensor([[128.0, 128.0, 0, 0, 128, 128]] * batch)
    return ({"added_cond_kwargs": {"text_embeds": pooled, "time_ids": tids}},
            sdxl_adm(pooled, (128, 128), (0, 0), (128, 128)))


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_residuals_and_controlled_unet_match_diffusers(name):
    ref, cn, ours_unet, cfg = _diffusers_pair(name)
    net = _ours_from(cn.state_dict(), cfg)
    x, t, ctx = inputs(cfg)
    hint = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    kw, y = _sdxl_kw() if name == "sdxl" else ({}, None)
    with torch.no_grad():
        down, mid = cn(x, t, ctx, controlnet_cond=hint, return_dict=False, **kw)
        res = net(x, hint, t, ctx, y)
        assert len(res) == len(down) + 1 == net.config.residuals
        for a, b in zip(res, [*down, mid]):
            assert 1e-2 < b.abs().mean() and b.abs().max() < 50
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        want = ref(x, t, ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, **kw).sample
        plain = ref(x, t, ctx, **kw).sample
        got = ours_unet(x, t, ctx, y=y, control=res)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (want - plain).abs().max() > 1e-2  # the control changes the output
        # negative control: the middle residual and the last skip's swapped (same shapes)
        wrong = [*res[:-2], res[-1], res[-2]]
        assert (ours_unet(x, t, ctx, y=y, control=wrong) - want).abs().max() > 1e-2


def _original_layout(net, prefix="control_model."):
    return {prefix + k: v.clone() for k, v in net.state_dict().items()}


def test_original_and_diffusers_files_give_the_same_outputs(tmp_path):
    ref, cn, ours_unet, cfg = _diffusers_pair("sd1")
    cn.save_pretrained(tmp_path / "cn-diffusers")
    from_folder = load_controlnet(tmp_path / "cn-diffusers", cfg, 4, torch.device("cpu"),
                                  torch.float32)
    sd = _original_layout(from_folder)
    save_file(sd, tmp_path / "cn.safetensors")
    save_file({k[len("control_model."):]: v for k, v in sd.items()}, tmp_path / "bare.safetensors")
    torch.save(sd, tmp_path / "cn.pth")
    x, t, ctx = inputs(cfg)
    hint = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        want = from_folder(x, hint, t, ctx)
        for f in ("cn.safetensors", "bare.safetensors", "cn.pth"):
            got = load_controlnet(tmp_path / f, cfg, 4, torch.device("cpu"), torch.float32)
            for a, b in zip(got(x, hint, t, ctx), want):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    half = load_controlnet(tmp_path / "cn.safetensors", cfg, 4, torch.device("cpu"),
                           torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_controlnet_of_another_width_or_family_is_refused(tmp_path):
    _, cn, _, cfg = _diffusers_pair("sd1")
    _, _, _, xl = _diffusers_pair("sdxl")
    cn.save_pretrained(tmp_path / "cn")
    with pytest.raises(SdloomError, match="is for .* U-Nets .* the loaded model is SDXL"):
        load_controlnet(tmp_path / "cn", xl, 4, torch.device("cpu"), torch.float32)
    save_file({"lora_controlnet.x": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(SdloomError, match="control-LoRA"):
        load_controlnet(tmp_path / "lora.safetensors", cfg, 4, torch.device("cpu"),
                        torch.float32)


class _Fake(torch.nn.Module):
    """A ControlNet whose residual i is the constant i + 1, and a U-Net that records them."""

    def forward(self, x, hint, t, ctx, y=None):
        return [torch.full_like(x[:, :1], i + 1.0) for i in range(13)]


class _Recorder(torch.nn.Module):
    def forward(self, x, t, context, y=None, control=None):
        self.control = control
        return x


def _run(units, clock, cond_mark=None):
    rec = _Recorder()
    m = ControlledUNet(rec, ControlSet(units, clock))
    m(torch.zeros(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, 1, 1), cond_mark=cond_mark)
    return rec.control


def _unit(**kw):
    return ActiveControl(_Fake(), torch.zeros(1, 3, 16, 16), **kw)


def test_control_modes_follow_the_extension_formulas():
    clock = ControlClock(0, 10)
    mark = torch.tensor([1.0, 0.0])  # row 0 cond, row 1 uncond
    bal = _run([_unit(weight=0.5)], clock, mark)
    assert [float(r[0, 0, 0, 0]) for r in bal] == [0.5 * (i + 1) for i in range(13)]
    prompt = _run([_unit(weight=0.5, mode=1)], clock, mark)
    for i, r in enumerate(prompt):
        assert float(r[1, 0, 0, 0]) == pytest.approx(0.5 * (i + 1) * 0.825 ** (12 - i))
    assert float(prompt[12][0, 0, 0, 0]) == 0.5 * 13  # the middle block's keeps its weight
    cn = _run([_unit(weight=1.0, mode=2)], clock, mark)
    for i, r in enumerate(cn):  # soft weights, and nothing on the uncond row
        assert float(r[0, 0, 0, 0]) == pytest.approx((i + 1) * 0.825 ** (12 - i))
        assert float(r[1].abs().max()) == 0.0
    both = _run([_unit(weight=1.0), _unit(weight=0.25)], clock, mark)  # units add
    assert float(both[3][0, 0, 0, 0]) == pytest.approx(4 * 1.25)
    assert soft_scales(10) == [0.825 ** (12 - i) for i in range(10)]  # SDXL: the first 10
    # the hires pass forces soft weights for canny (the extension's high_res_fix rule)
    hr = _run([_unit(soft_in_hires=True)], ControlClock(0, 10, hires=True), mark)
    assert float(hr[0][0, 0, 0, 0]) == pytest.approx(0.825 ** 12)


def test_guidance_window_reads_the_a1111_step_counter():
    clock = ControlClock(0, 10)
    unit = _unit(guidance_start=0.2, guidance_end=0.5)
    seen = []
    for step in range(10):
        clock.step = step
        seen.append(_run([unit], clock) is not None)
    assert seen == [s / 10 >= 0.2 and s / 10 <= 0.5 for s in range(10)]
    assert seen.count(True) == 4


def test_canny_finds_the_edges_of_a_square():
    img = np.zeros((16, 16), np.uint8)
    img[4:12, 4:12] = 200
    e = canny(img, 100, 200)
    assert set(np.unique(e)) == {0, 255}
    got = e > 0
    # Sobel |dx| + |dy| is 800 on both sides of each step; OpenCV's NMS compares `>` with the
    # pixel before and `>=` with the one after, so the left/top edges land just outside the
    # square (column/row 3) and the right/bottom ones on its last pixels (column/row 11)
    for r in range(5, 11):
        assert np.flatnonzero(got[r]).tolist() == [3, 11], r
    for c in range(5, 11):
        assert np.flatnonzero(got[:, c]).tolist() == [3, 11], c
    assert not got[5:11, 5:11].any() and got.sum() <= 32
    # the thresholds matter: above every gradient, nothing is left
    assert canny(img, 1300, 1400).sum() == 0  # corners reach 1200
    # hysteresis: a weak edge survives only when joined to a strong one
    weak = np.zeros((16, 16), np.uint8)
    weak[:, 8:] = 40  # gradient 160: between 100 and 200, nowhere strong
    assert canny(weak, 100, 200).sum() == 0 and canny(weak, 100, 150).sum() > 0


@pytest.mark.parametrize("module", ["none", "invert", "canny", "threshold", "shuffle",
                                    "tile_resample"])
def test_preprocessors_shapes(module):
    img = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    u = ControlUnit("x", img, module=module, processor_res=96, threshold_a=-1).resolved()
    if module == "tile_resample":
        u.threshold_a = 2.0
    out = preprocess(u, img, seed=1)
    assert out.mode == "RGB"
    want = {"none": (64, 48), "invert": (64, 48), "tile_resample": (32, 24)}.get(module,
                                                                                (128, 96))
    assert out.size == want
    a = np.asarray(out)
    if module == "invert":
        assert (a == 255 - np.asarray(img)).all()
    if module in ("canny", "threshold"):
        assert set(np.unique(a)) <= {0, 255}
    if module == "shuffle":  # same seed, same shuffle; another seed, another
        assert (np.asarray(preprocess(u, img, seed=1)) == a).all()
        assert (np.asarray(preprocess(u, img, seed=2)) != a).any()


def test_unit_checks_and_pixel_perfect():
    with pytest.raises(SdloomError, match="annotator weights dpt_hybrid"):
        ControlUnit("x", module="depth_midas").resolved()
    with pytest.raises(SdloomError, match="unknown ControlNet preprocessor 'blah'"):
        ControlUnit("x", module="blah").resolved()
    with pytest.raises(SdloomError, match="guidance"):
        ControlUnit("x", guidance_start=0.6, guidance_end=0.5).resolved()
    with pytest.raises(SdloomError, match="control mode"):
        ControlUnit("x", control_mode="Loud").resolved()
    u = ControlUnit("x", module="canny", control_mode="My prompt is more important").resolved()
    assert (u.control_mode, u.resize_mode, u.threshold_a, u.threshold_b, u.processor_res) == \
        (1, 1, 100, 200, 512)
    img = Image.new("RGB", (300, 200))
    assert pixel_perfect_res(img, 512, 512, 1) == 512  # cover: the short side to 512
    assert pixel_perfect_res(img, 512, 512, 2) == 341  # fit: scaled by 512/300


# ---------------------------------------------------------------- whole images and the CLI

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(our single file, diffusers folder, diffusers ControlNet folder, pipeline parts)."""
    from sdloom.checkpoints.save import save_model
    from sdloom.cli import main
    from tiny import TINY_SD1, tiny_model
    root = tmp_path_factory.mktemp("cn")
    save_model(tiny_model(TINY_SD1, seed=3), TINY_SD1, root / "m.safetensors")
    assert main(["convert", str(root / "m.safetensors"), str(root / "folder")]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "folder")
    cn = diffusers.ControlNetModel.from_unet(pipe.unet)
    randomize_(cn, seed=9)
    with torch.no_grad():
        for p in cn.parameters():
            if p.ndim > 1:
                p.mul_(0.15)
    cn.save_pretrained(root / "cn")
    hint = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    hint.save(root / "hint.png")
    return root, pipe, cn, hint


def _generate(root, hint, **unit):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    eng = Engine.load(root / "m.safetensors", device="cpu", precision="fp32")
    final = []
    units = [ControlUnit(str(root / "cn"), hint, resize_mode=0, **unit)] if unit is not None \
        else []
    p = GenerationParams(prompt="a cat", seed=7, steps=4, cfg_scale=5.0, width=64, height=64,
                         sampler_name="Euler", controlnets=units)
    res = generate(eng, p, lambda i, n, x0: final.append(x0))
    return res, final[-1]


def test_whole_image_matches_stable_diffusion_controlnet_pipeline(sd1):
    from sdloom.infotext import parse_infotext
    from sdloom.seeds import ImageRNG
    root, pipe, cn, hint = sd1
    sched = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                         timestep_spacing="linspace")
    cpipe = diffusers.StableDiffusionControlNetPipeline(
        **{**pipe.components, "scheduler": sched}, controlnet=cn)
    cpipe.set_progress_bar_config(disable=True)
    noise = ImageRNG((4, 8, 8), [7]).first()

    def theirs(**kw):
        with torch.no_grad():
            return cpipe("a cat", negative_prompt="", image=hint, num_inference_steps=4,
                         guidance_scale=5.0, height=64, width=64, latents=noise,
                         output_type="latent", **kw).images

    res, lat = _generate(root, hint)
    want = theirs()
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(lat, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    # negative control: without the ControlNet's residuals (scale 0) the latents differ
    assert (theirs(controlnet_conditioning_scale=0.0) - lat).abs().max() > 1e-2
    info = parse_infotext(res.infotexts[0])
    h = legacy_hash(root / "cn" / "diffusion_pytorch_model.safetensors")
    assert info["ControlNet 0"] == (
        f"Module: none, Model: cn [{h}], Weight: 1.0, Resize Mode: Just Resize, Low Vram: "
        "False, Processor Res: 512, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: "
        "False, Control Mode: Balanced, Hr Option: Both")


def test_guidance_end_zero_and_modes_in_the_pipeline(sd1):
    root, _, _, hint = sd1
    _, plain = _generate(root, hint, weight=0.0)
    _, full = _generate(root, hint)
    _, early = _generate(root, hint, guidance_end=0.25)  # counter 0, 0, 1 of 4: steps 0-2
    _, prompt = _generate(root, hint, control_mode=1)
    _, cnet = _generate(root, hint, control_mode=2)
    for a in (early, prompt, cnet):
        assert (a - full).abs().max() > 1e-3 and (a - plain).abs().max() > 1e-3
    assert (cnet - prompt).abs().max() > 1e-3


def test_controlnet_in_img2img_inpaint_and_hires(sd1):
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    root, _, _, hint = sd1
    eng = Engine.load(root / "m.safetensors", device="cpu", precision="fp32")
    unit = ControlUnit(str(root / "cn"), None, module="canny")  # img2img: the init image
    base = dict(prompt="a cat", seed=3, steps=2, width=64, height=64, sampler_name="Euler")
    for kw in (dict(init_image=hint), dict(init_image=hint, mask=Image.new("L", (64, 64), 255))):
        with_cn = generate(eng, GenerationParams(**base, **kw, controlnets=[unit]))
        without = generate(eng, GenerationParams(**base, **kw))
        assert "ControlNet 0" in with_cn.infotexts[0]
        assert (np.asarray(with_cn.images[0], float) - np.asarray(without.images[0])).any()
    hr = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    imgs = {opt: generate(eng, GenerationParams(**base, **hr, controlnets=[ControlUnit(
        str(root / "cn"), hint, hr_option=opt)])).images[0] for opt in
        ("Both", "Low res only", "High res only")}
    assert imgs["Both"].size == (96, 96)
    a = {k: np.asarray(v, float) for k, v in imgs.items()}
    assert (a["Both"] != a["Low res only"]).any() and (a["Both"] != a["High res only"]).any()
    with pytest.raises(SdloomError, match="has no image"):
        generate(eng, GenerationParams(**base, controlnets=[unit]))


def test_cli_control(sd1, tmp_path, capsys):
    from sdloom.cli import main
    from sdloom.infotext import parse_infotext
    root, _, _, _ = sd1
    common = ["generate", "a cat", "--model", str(root / "m.safetensors"), "--steps", "1",
              "--width", "64", "--height", "64", "--sampler", "Euler"]
    out = tmp_path / "o.png"
    assert main([*common, "--control", f"{root / 'hint.png'}:{root / 'cn'}:0.8:0:0.5",
                 "--control-module", "canny", "--control-mode", "prompt",
                 "--output", str(out)]) == 0
    info = parse_infotext(Image.open(out).info["parameters"])["ControlNet 0"]
    assert info.startswith("Module: canny, Model: cn [") and "Weight: 0.8" in info
    assert "Guidance End: 0.5" in info and "My prompt is more important" in info
    assert "Threshold A: 100" in info
    capsys.readouterr()
    # bad input: one clear line each
    from test_controlnet import _diffusers_pair  # an SDXL-shaped ControlNet
    _, xl, _, _ = _diffusers_pair("sdxl")
    xl.save_pretrained(tmp_path / "xl")
    for control, module, want in (
            (f"{root / 'hint.png'}:{tmp_path / 'nope.safetensors'}", "none", "no such ControlNet"),
            (f"{root / 'hint.png'}:{root / 'cn'}", "depth_midas", "annotator weights"),
            (f"{root / 'hint.png'}:{root / 'cn'}", "sobel", "unknown ControlNet preprocessor"),
            (f"{root / 'hint.png'}:{tmp_path / 'xl'}", "none", "is for SDXL")):
        assert main([*common, "--control", control, "--control-module", module,
                     "--output", str(tmp_path / "x.png")]) != 0
        err = capsys.readouterr().err.strip()
        assert want in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_only_masked_inpainting_crops_the_control_image(sd1, monkeypatch):
    """The extension's rule for inpaint "Only masked": the control image is fitted to the
    mask's size by the unit's resize mode, cropped to the masked region (A1111's crop region),
    and fitted to the processing size with Resize and Fill — before its preprocessor runs."""
    import sdloom.controlnet as cn_mod
    from sdloom.images import crop_region, mask_from_image, resize_image
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    root, _, _, hint = sd1
    seen = []
    real = cn_mod.preprocess
    monkeypatch.setattr(cn_mod, "preprocess",
                        lambda u, image, seed=0: (seen.append(image), real(u, image, seed))[1])
    eng = Engine.load(root / "m.safetensors", device="cpu", precision="fp32")
    init = hint.resize((96, 80))
    control = Image.fromarray((np.random.default_rng(1).random((60, 72, 3)) * 255)
                              .astype(np.uint8))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (50, 30, 70, 52))
    p = GenerationParams(prompt="a cat", seed=3, steps=2, width=64, height=64,
                         sampler_name="Euler", init_image=init, mask=mask,
                         inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=0,
                         controlnets=[ControlUnit(str(root / "cn"), control, module="canny",
                                                  resize_mode=1)])
    generate(eng, p)
    box = crop_region(mask_from_image(mask), 4, 64, 64)
    want = resize_image(resize_image(control, 96, 80, 1).crop(box), 64, 64, 2)
    assert seen and seen[0].tobytes() == want.tobytes() and seen[0].size == (64, 64)
