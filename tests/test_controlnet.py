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
