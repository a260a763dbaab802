"""sd-webui-controlnet's API over sdloom: `alwayson_scripts.controlnet` units as clients send them
(field names, enum names and numbers, legacy aliases, "name [hash]") against the library call
with the same ControlUnit, the `/controlnet/*` routes' shapes, detect, and bad input as a 4xx
naming its field."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastapi.testclient import TestClient

from sdloom.checkpoints.save import save_model
from sdloom.controlnet import ControlUnit, legacy_hash, preprocess
from sdloom.infotext import encode_image, parse_infotext
from sdloom.models.controlnet import ControlNet, ControlNetConfig
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams
from sdloom.server.app import Server, create_app

from conftest import randomize_
from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"
BASE = {"prompt": "a cat", "seed": 7, "steps": 2, "width": 64, "height": 64,
        "sampler_name": "Euler", "cfg_scale": 5.0}


def _tiny_controlnet(seed: int) -> dict[str, torch.Tensor]:
    net = randomize_(ControlNet(ControlNetConfig(TINY_SD1.unet)), seed=seed)
    with torch.no_grad():  # residuals of order 1: the control changes the image, no overflow
        for p in net.parameters():
            if p.ndim > 1:
                p.mul_(0.3)
    return {"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnapi")
    save_model(tiny_model(), TINY_SD1, root / "m.safetensors")
    cdir = root / "controlnet"
    (cdir / "sub").mkdir(parents=True)
    save_file(_tiny_controlnet(1), cdir / "cn.safetensors")
    save_file(_tiny_controlnet(2), cdir / "sub" / "other.safetensors")
    save_file(_tiny_controlnet(3), root / "outside.safetensors")  # not in the folder
    server = Server(str(root / "m.safetensors"), device="cpu", precision="fp32",
                    outdir=str(root / "out"), controlnet_dir=str(cdir))
    return root, cdir, server, TestClient(create_app(server))


def b64(img: Image.Image) -> str:
    return base64.b64encode(encode_image(img, "png")).decode()


def unb64(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def square(w: int = 80, h: int = 72) -> Image.Image:
    """A white square on black, of another size than the 64×64 job."""
    a = np.zeros((h, w, 3), np.uint8)
    a[16:52, 20:60] = 255
    a[30:40, 30:40] = (30, 200, 90)
    return Image.fromarray(a)


def stripes(w: int = 64, h: int = 64) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, ::8] = 255
    return Image.fromarray(a)


def txt2img(client, *units, **extra):
    body = {**BASE, **extra, "alwayson_scripts": {"controlnet": {"args": list(units)}}}
    return client.post(f"{API}/txt2img", json=body)


def library(server, *units: ControlUnit) -> bytes:
    p = GenerationParams(**BASE, controlnets=list(units))
    return generate(server.engine, p).images[0].tobytes()


def pixels(r) -> bytes:
    assert r.status_code == 200, r.text
    return unb64(r.json()["images"][0]).convert("RGB").tobytes()


CLIENT_UNIT = {"enabled": True, "module": "canny", "weight": 0.8, "resize_mode": "Just Resize",
               "low_vram": False, "processor_res": 64, "threshold_a": 50, "threshold_b": 150,
               "guidance_start": 0.0, "guidance_end": 0.9, "pixel_perfect": False,
               "control_mode": "My prompt is more important", "hr_option": "Both"}


def test_a_client_unit_gives_the_library_image(setup):
    root, cdir, server, client = setup
    title = f"cn [{legacy_hash(cdir / 'cn.safetensors')}]"
    img = square()
    r = txt2img(client, {**CLIENT_UNIT, "model": title, "image": b64(img)})
    got = pixels(r)
    want = library(server, ControlUnit(str(cdir / "cn.safetensors"), img, module="canny",
                                       weight=0.8, resize_mode=0, processor_res=64,
                                       threshold_a=50, threshold_b=150, guidance_end=0.9,
                                       control_mode=1))
    assert got == want
    assert got != library(server)  # the unit changes the image
    info = json.loads(r.json()["info"])
    cn0 = parse_infotext(info["infotexts"][0])["ControlNet 0"]
    assert cn0.startswith(f"Module: canny, Model: {title}, Weight: 0.8, Resize Mode: Just "
                          "Resize") and "Control Mode: My prompt is more important" in cn0
    assert info["extra_generation_params"]["ControlNet 0"] == cn0
    echoed = r.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]
    assert echoed["model"] == title and echoed["weight"] == 0.8
    # {"image", "mask"}, the name without its hash, legacy aliases and integer enums: the same
    legacy = {"module": "canny", "model": "cn", "weight": 0.8, "resize_mode": 0,
              "lowvram": True, "processor_res": 64, "threshold_a": 50, "threshold_b": 150,
              "guidance": 0.9, "control_mode": 1, "hr_option": 0,
              "input_image": {"image": b64(img), "mask": b64(Image.new("L", img.size))}}
    assert pixels(txt2img(client, legacy)) == got
    # the extension's old resize-mode names mean what its new ones mean
    crop = pixels(txt2img(client, {**CLIENT_UNIT, "model": "cn", "image": b64(img),
                                   "resize_mode": "Crop and Resize"}))
    assert crop != got
    assert pixels(txt2img(client, {**CLIENT_UNIT, "model": "cn", "image": b64(img),
                                   "resize_mode": "Inner Fit (Scale to Fit)"})) == crop
    assert pixels(txt2img(client, {**CLIENT_UNIT, "model": "cn", "image": b64(img),
                                   "resize_mode": 1})) == crop


def test_a_reference_unit_takes_no_model(setup):
    """The extension sends reference units with model "None"; threshold_a is the fidelity."""
    root, cdir, server, client = setup
    img = square()
    assert "reference_only" in client.get("/controlnet/module_list").json()["module_list"]
    r = txt2img(client, {"enabled": True, "module": "reference_only", "model": "None",
                         "image": b64(img), "threshold_a": 0.7, "weight": 0.9})
    assert pixels(r) == library(server, ControlUnit("None", img, module="reference_only",
                                                    threshold_a=0.7, weight=0.9))
    cn0 = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["ControlNet 0"]
    assert cn0.startswith("Module: reference_only, Model: None, Weight: 0.9")


def test_two_units_and_disabled_or_empty_units(setup):
    root, cdir, server, client = setup
    a = {**CLIENT_UNIT, "model": "cn", "image": b64(square())}
    b = {"module": "none", "model": "other", "image": b64(stripes()), "weight": 0.5}
    two = pixels(txt2img(client, a, b))
    want = library(server,
                   ControlUnit(str(cdir / "cn.safetensors"), square(), module="canny",
                               weight=0.8, resize_mode=0, processor_res=64, threshold_a=50,
                               threshold_b=150, guidance_end=0.9, control_mode=1),
                   ControlUnit(str(cdir / "sub" / "other.safetensors"), stripes(), weight=0.5))
    assert two == want and two != pixels(txt2img(client, a))
    r = txt2img(client, a, b)
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert info["ControlNet 1"].startswith("Module: none, Model: other [")
    # a disabled unit (even with a model that does not exist) and empty slots are ignored
    plain = library(server)
    assert pixels(txt2img(client, {**a, "enabled": False, "model": "nope"},
                          {"enabled": False}, {"model": "None", "image": ""})) == plain
    assert pixels(txt2img(client, {**a, "enabled": False}, b)) != plain


def test_img2img_unit_uses_the_init_image(setup):
    root, cdir, server, client = setup
    init = square(64, 64)
    r = client.post(f"{API}/img2img", json={
        **BASE, "init_images": [b64(init)], "denoising_strength": 0.6,
        "alwayson_scripts": {"ControlNet": {"args": [{"model": "cn", "module": "canny"}]}}})
    assert r.status_code == 200, r.text
    p = GenerationParams(**BASE, init_image=init, denoising_strength=0.6,
                         controlnets=[ControlUnit(str(cdir / "cn.safetensors"), None,
                                                  module="canny")])
    assert unb64(r.json()["images"][0]).convert("RGB").tobytes() == \
        generate(server.engine, p).images[0].tobytes()


def test_routes_have_the_extensions_shapes(setup):
    root, cdir, server, client = setup
    assert client.get("/controlnet/version").json() == {"version": 2}
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert sorted(models) == sorted([f"cn [{legacy_hash(cdir / 'cn.safetensors')}]",
                                     f"other [{legacy_hash(cdir / 'sub/other.safetensors')}]"])
    mods = client.get("/controlnet/module_list").json()
    assert mods["module_list"][0] == "none" and "canny" in mods["module_list"]
    assert "depth_midas" not in mods["module_list"]  # needs weights sdloom does not run
    canny = mods["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Preprocessor Resolution",
                                                     "Canny Low Threshold",
                                                     "Canny High Threshold"]
    assert canny["sliders"][1]["value"] == 100 and canny["sliders"][2]["max"] == 255
    assert set(mods["module_detail"]) == set(mods["module_list"])
    alias = client.get("/controlnet/module_list?alias_names=true").json()["module_list"]
    assert "invert (from white bg & black line)" in alias
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_option"] == "canny"
    assert types["All"]["model_list"] == ["None", *models]
    # models of a type are those whose name says it (no "canny" in "cn" or "other")
    assert types["Canny"]["model_list"] == ["None"] and types["Canny"]["default_model"] == "None"
    assert set(types["All"]) == {"module_list", "model_list", "default_option", "default_model"}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 4}


def test_detect_runs_the_preprocessor(setup):
    root, cdir, server, client = setup
    img = square(64, 64)
    r = client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(img), b64(img)],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 100,
        "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["info"] == "Success" and len(out["images"]) == 2
    edges = np.asarray(unb64(out["images"][0]).convert("L"))
    assert edges.shape == (64, 64) and set(np.unique(edges)) == {0, 255}
    assert edges[16:52, 20].max() == 255 or edges[16:52, 19].max() == 255  # the left side
    assert edges[0:10, 0:10].max() == 0 and edges[44:50, 26:54].max() == 0  # flat areas
    want = preprocess(ControlUnit("", module="canny", processor_res=64).resolved(), img)
    assert edges.tobytes() == np.asarray(want.convert("L")).tobytes()
    # out-of-range sliders fall back to the defaults, as the extension's bound check
    r2 = client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(img)],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 999,
        "controlnet_threshold_b": -5})
    assert r2.json()["images"][0] == out["images"][0]


@pytest.mark.parametrize("unit,field,status", [
    ({"model": "nope"}, "args[0].model", 422),
    ({"model": "nope [12345678]"}, "args[0].model", 422),
    ({"model": "../outside"}, "args[0].model", 422),
    ({"model": "../outside.safetensors"}, "args[0].model", 422),
    ({"model": "/etc/passwd"}, "args[0].model", 422),
    ({"model": "None"}, "args[0].model", 422),
    ({"module": "sobel"}, "args[0].module", 422),
    ({"module": "depth_midas"}, "args[0].module", 422),
    ({"resize_mode": "Stretch"}, "args[0].resize_mode", 422),
    ({"resize_mode": 9}, "args[0].resize_mode", 422),
    ({"control_mode": "Loud"}, "args[0].control_mode", 422),
    ({"control_mode": True}, "args[0].control_mode", 422),
    ({"hr_option": "Sometimes"}, "args[0].hr_option", 422),
    ({"weight": "heavy"}, "args[0].weight", 422),
    ({"weight": 5}, "args[0]: ControlNet weight", 422),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "args[0]: ControlNet guidance", 422),
    ({"enabled": "yes"}, "args[0].enabled", 422),
    ({"image": "not base64!"}, "args[0].image", 422),
    ({"image": ""}, "args[0].image", 422),
    ({"image": {"mask": "x"}}, "args[0].image", 422),
    ({"input_image": "x"}, "both 'input_image' and 'image'", 422),
])
def test_bad_units_are_a_4xx_naming_the_field(setup, unit, field, status):
    root, cdir, server, client = setup
    r = txt2img(client, {"enabled": True, "model": "cn", "module": "none",
                         "image": b64(square()), **unit})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert field in detail, detail
    assert str(root) not in detail and "Traceback" not in detail


def test_other_scripts_and_odd_shapes_are_refused(setup):
    root, cdir, server, client = setup
    unit = {"model": "cn", "image": b64(square())}
    for scripts, want in (
            ({"controlnet": {"args": [unit]}, "adetailer": {"args": []}}, "'adetailer'"),
            ({"controlnet": {"args": [True, "canny", "cn"]}}, "args[0]: a ControlNet unit"),
            ({"controlnet": [unit]}, "alwayson_scripts.controlnet: expected"),
            ({"controlnet": {"args": [unit] * 5}}, "at most 4 enabled units")):
        r = client.post(f"{API}/txt2img", json={**BASE, "alwayson_scripts": scripts})
        assert r.status_code == 422 and want in r.json()["detail"], r.text
    r = client.post("/controlnet/detect", json={"controlnet_module": "sobel",
                                                "controlnet_input_images": [b64(square())]})
    assert r.status_code == 422 and "controlnet_module" in r.json()["detail"]
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny"})
    assert r.status_code == 422 and "controlnet_input_images" in r.json()["detail"]
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                "controlnet_input_images": ["nope!"]})
    assert r.status_code == 422 and "controlnet_input_images[0]" in r.json()["detail"]


def test_symlink_out_of_the_folder_is_not_listed(setup, tmp_path):
    from sdloom.controlnet import find_controlnet, list_controlnets
    from sdloom.errors import NotFoundError
    root, cdir, server, client = setup
    d = tmp_path / "cns"
    d.mkdir()
    (d / "link.safetensors").symlink_to(root / "outside.safetensors")
    assert list_controlnets(d) == {}
    with pytest.raises(NotFoundError):
        find_controlnet("link", d)
    assert find_controlnet("cn", cdir) == (cdir / "cn.safetensors").resolve()


def test_serve_takes_a_controlnet_dir():
    from sdloom.cli import build_parser
    assert build_parser().parse_args(["serve", "--controlnet-dir", "cn"]).controlnet_dir == "cn"
    assert build_parser().parse_args(["serve"]).controlnet_dir is None


def test_ip_adapter_units_as_the_extension_sends_them(tmp_path):
    """module ip-adapter_clip_sd15 + model "<adapter> [hash]" from the ControlNet folder, the
    encoder clip_h from --clip-vision-dir: the image the library gives with that IPAdapterUnit;
    infotext as the extension's unit; a missing encoder names the file it needs."""
    from test_ip_adapter import _adapter_sd, _hf_vision
    from test_offload import live_model  # no zero-initialised layers: the adapter shows

    from sdloom.models.ip_adapter import IPAdapterUnit
    model = live_model()
    save_model(model, TINY_SD1, tmp_path / "m.safetensors")
    cdir, vdir = tmp_path / "cn", tmp_path / "clip_vision"
    cdir.mkdir()
    sd = _adapter_sd(model.unet, 16, TINY_SD1.unet.context_dim, seed=6)
    save_file(sd, cdir / "ip-adapter_tiny.safetensors")
    _hf_vision(seed=4).save_pretrained(vdir / "clip_h")
    server = Server(str(tmp_path / "m.safetensors"), device="cpu", precision="fp32",
                    outdir=str(tmp_path / "out"), controlnet_dir=str(cdir),
                    clip_vision_dir=str(vdir))
    client = TestClient(create_app(server))
    assert "ip-adapter_clip_sd15" in client.get("/controlnet/module_list").json()["module_list"]
    img = square()
    title = f"ip-adapter_tiny [{legacy_hash(cdir / 'ip-adapter_tiny.safetensors')}]"
    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": title,
            "image": b64(img), "weight": 0.8, "guidance_end": 0.9}
    r = txt2img(client, unit)
    want = generate(server.engine, GenerationParams(**BASE, ip_adapters=[IPAdapterUnit(
        str(cdir / "ip-adapter_tiny.safetensors"), str(vdir / "clip_h"), [img], weight=0.8,
        guidance_end=0.9)])).images[0].tobytes()
    assert pixels(r) == want != pixels(txt2img(client))
    cn0 = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["ControlNet 0"]
    assert cn0 == (f"Module: ip-adapter_clip_sd15, Model: {title}, Weight: 0.8, "
                   "Guidance Start: 0.0, Guidance End: 0.9")
    r = txt2img(client, {**unit, "module": "ip-adapter_clip_sdxl"})
    assert r.status_code == 422 and "clip_g.pth" in r.json()["detail"]
