"""ESRGAN-family upscalers (models/esrgan.py), the upscaler registry (upscalers.py), `sdloom
upscale` and the A1111 extras routes.

Reference: spandrel/basicsr cannot be imported here and tests may not fetch code, so the
reference is written in this file from the papers' equations, independently of the module:
* RDB / RRDB / whole-net forward passes are re-computed with F.conv2d on the module's own
  tensors (ESRGAN eq.: x_i = lrelu(W_i * [x, x_1, …, x_{i-1}]), RDB = x + 0.2·x_5,
  RRDB = x + 0.2·RDB3(RDB2(RDB1(x))), net = conv_last(lrelu(conv_hr(up(up(f + body(f)))))));
* one RDB is checked analytically with hand-built weights (1×1-centred kernels) whose output
  is known in closed form;
* pixel-unshuffle is checked against its definition (index arithmetic), and SRVGGNetCompact's
  output with a zero last conv equals the nearest-upsampled input exactly;
* the same random weights saved in the old ESRGAN, ESRGAN and BasicSR layouts give identical
  outputs.
"""
import base64
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sdloom import upscalers
from sdloom.cli import main
from sdloom.errors import ModelFileError, NotFoundError
from sdloom.models import esrgan as E

from conftest import randomize_

TINY = E.RRDBConfig(nf=8, gc=4, nb=2)


def tiny_net(cfg, seed=0, gain=0.5):
    m = randomize_(E.build(cfg), seed).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(gain)
    return m


# ---------------------------------------------------------------------- layouts
def old_layout(sd: dict, cfg: E.RRDBConfig) -> dict:
    """BasicSR names → the old ESRGAN `model.N` layout (written from the old arch's
    Sequential: 0 conv, 1 shortcut(sub: RRDBs + conv), (upsample, conv, act)×n, hr, act, last)."""
    n = cfg.n_up
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "body":
            out[f"model.1.sub.{p[1]}.RDB{p[2][3]}.{p[3]}.0.{p[4]}"] = v
        elif p[0] == "conv_body":
            out[f"model.1.sub.{cfg.nb}.{p[1]}"] = v
        elif p[0].startswith("conv_up"):
            out[f"model.{3 + 3 * (int(p[0][7:]) - 1)}.{p[1]}"] = v
        else:
            idx = {"conv_first": 0, "conv_hr": 2 + 3 * n, "conv_last": 4 + 3 * n}[p[0]]
            out[f"model.{idx}.{p[1]}"] = v
    return out


def esrgan_layout(sd: dict) -> dict:
    """BasicSR names → the ESRGAN repository's RRDBNet_arch.py names."""
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        k = k.replace("conv_up", "upconv")
        if k.startswith("body."):
            k = "RRDB_trunk." + k[5:].replace(".rdb", ".RDB")
        out[k] = v
    return out


def test_old_esrgan_key_names_match_the_old_arch():
    sd = E.build(TINY).state_dict()
    old = old_layout(sd, TINY)
    for k in ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight",
              "model.1.sub.1.RDB3.conv5.0.bias", "model.1.sub.2.weight", "model.3.weight",
              "model.6.weight", "model.8.weight", "model.10.bias"):
        assert k in old


@pytest.mark.parametrize("cfg", [
    E.RRDBConfig(),  # ESRGAN / RealESRGAN_x4plus: 64, 32, 23 blocks, ×4
    E.RRDBConfig(nb=6),  # RealESRGAN_x4plus_anime_6B
    E.RRDBConfig(unshuffle=2),  # RealESRGAN_x2plus (12 input channels)
    E.RRDBConfig(unshuffle=4),  # ×1 BasicSR
    E.RRDBConfig(nf=32, gc=16, nb=3, n_up=1),  # old-arch ×2
    E.RRDBConfig(nf=16, gc=8, nb=1, n_up=3),  # old-arch ×8
])
def test_rrdb_detection_in_every_layout(cfg):
    with torch.device("meta"):
        sd = E.RRDBNet(cfg).state_dict()
    layouts = [sd, esrgan_layout(sd)] + ([old_layout(sd, cfg)] if cfg.unshuffle == 1 else [])
    for layout in layouts:
        got, rename = E.detect({k: tuple(v.shape) for k, v in layout.items()})
        assert got == cfg
        assert sorted(rename.values()) == sorted(sd)
    assert cfg.scale == {1: 2 ** cfg.n_up, 2: 2, 4: 1}[cfg.unshuffle]


@pytest.mark.parametrize("cfg", [E.CompactConfig(),  # realesr-general-x4v3: 64, 32 convs
                                 E.CompactConfig(nf=64, num_conv=16, scale=4),  # animevideov3
                                 E.CompactConfig(nf=16, num_conv=2, scale=2)])
def test_compact_detection(cfg):
    if cfg == E.CompactConfig():
        cfg = E.CompactConfig(num_conv=32)
    with torch.device("meta"):
        sd = E.SRVGGNetCompact(cfg).state_dict()
    got, _ = E.detect({k: tuple(v.shape) for k, v in sd.items()})
    assert got == cfg


def test_detection_refuses_other_files_naming_the_keys():
    with pytest.raises(ModelFileError, match="model.0.weight.*conv_first.weight"):
        E.detect({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)})
    with pytest.raises(ModelFileError, match="input and 3 output channels"):
        E.detect({"conv_first.weight": (64, 5, 3, 3), "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
                  "conv_last.weight": (3, 64, 3, 3)})


def test_old_new_and_basicsr_layouts_give_identical_outputs(tmp_path):
    net = tiny_net(TINY, seed=3)
    sd = net.state_dict()
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    ref = net(x)
    save_file(old_layout(sd, TINY), tmp_path / "old.safetensors")
    torch.save({"params_ema": esrgan_layout(sd)}, tmp_path / "new.pth")
    torch.save({"params": dict(sd)}, tmp_path / "basicsr.pth")
    for f in ("old.safetensors", "new.pth", "basicsr.pth"):
        m = E.load_upscaler(tmp_path / f)
        assert m.config == TINY
        assert torch.equal(m(x), ref), f


def test_strict_loading_lists_missing_keys(tmp_path):
    sd = dict(E.build(TINY).state_dict())
    del sd["body.1.rdb2.conv3.bias"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match=r"missing: body\.1\.rdb2\.conv3\.bias"):
        E.load_upscaler(tmp_path / "broken.safetensors")


# ---------------------------------------------------------------------- blocks
def ref_rdb(m, x):
    """ESRGAN's RDB from its equations, on the module's tensors."""
    feats = [x]
    for i in range(1, 5):
        c = getattr(m, f"conv{i}")
        feats.append(F.leaky_relu(F.conv2d(torch.cat(feats, 1), c.weight, c.bias, padding=1),
                                  0.2))
    return x + 0.2 * F.conv2d(torch.cat(feats, 1), m.conv5.weight, m.conv5.bias, padding=1)


def ref_rrdbnet(m, x):
    c = m.config

    def conv(name, h):
        layer = getattr(m, name) if isinstance(name, str) else name
        return F.conv2d(h, layer.weight, layer.bias, padding=1)

    if c.unshuffle > 1:  # definition: out[c·u² + i·u + j, y, x] = in[c, y·u + i, x·u + j]
        u = c.unshuffle
        b, ch, hh, ww = x.shape
        x = x.reshape(b, ch, hh // u, u, ww // u, u).permute(0, 1, 3, 5, 2, 4) \
            .reshape(b, ch * u * u, hh // u, ww // u)
    f = conv("conv_first", x)
    h = f
    for block in m.body:
        r = h
        for rdb in (block.rdb1, block.rdb2, block.rdb3):
            r = ref_rdb(rdb, r)
        h = h + 0.2 * r
    f = f + conv("conv_body", h)
    for i in range(c.n_up):
        f = f.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest ×2
        f = F.leaky_relu(conv(f"conv_up{i + 1}", f), 0.2)
    return conv("conv_last", F.leaky_relu(conv("conv_hr", f), 0.2))


def test_rdb_analytically_with_hand_built_weights():
    """Centre-tap kernels: conv_i copies channel sums; with nf=1, gc=1 and all taps 1, on a
    constant input v > 0 in the interior: x1 = v, x2 = 2v, x3 = 4v, x4 = 8v,
    conv5 = v + v + 2v + 4v + 8v = 16v, so RDB = v + 0.2·16v = 4.2v."""
    rdb = E.ResidualDenseBlock(1, 1)
    with torch.no_grad():
        for i in range(1, 6):
            c = getattr(rdb, f"conv{i}")
            c.weight.zero_()
            c.weight[:, :, 1, 1] = 1.0
            c.bias.zero_()
    x = torch.full((1, 1, 5, 5), 0.5)
    assert torch.allclose(rdb(x), torch.full_like(x, 4.2 * 0.5))
    # the negative branch uses LeakyReLU 0.2: x1 = 0.2·(−v), x2 = 0.2·(−v + x1) …
    v = -0.5
    x1 = 0.2 * v
    x2 = 0.2 * (v + x1)
    x3 = 0.2 * (v + x1 + x2)
    x4 = 0.2 * (v + x1 + x2 + x3)
    want = v + 0.2 * (v + x1 + x2 + x3 + x4)
    assert torch.allclose(rdb(torch.full((1, 1, 3, 3), v)), torch.full((1, 1, 3, 3), want))


@pytest.mark.parametrize("cfg", [TINY, E.RRDBConfig(nf=8, gc=4, nb=1, unshuffle=2),
                                 E.RRDBConfig(nf=8, gc=4, nb=1, n_up=1)])
def test_rrdbnet_matches_the_equations(cfg):
    net = tiny_net(cfg, seed=1)
    x = torch.rand(1, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = net(x), ref_rrdbnet(net, x)
    assert got.shape == (1, 3, 8 * cfg.scale, 10 * cfg.scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(net.body[0].rdb2(x.new_ones(1, 8, 4, 4) * 0.3),
                                   ref_rdb(net.body[0].rdb2, x.new_ones(1, 8, 4, 4) * 0.3))


def test_unshuffle_model_pads_odd_sizes_and_crops():
    net = tiny_net(E.RRDBConfig(nf=8, gc=4, nb=1, unshuffle=2))
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        y = net(x)
        padded = F.pad(x, (0, 1, 0, 1), mode="reflect")
        assert y.shape == (1, 3, 14, 18)
        torch.testing.assert_close(y, ref_rrdbnet(net, padded)[..., :14, :18], rtol=0,
                                   atol=1e-5)


def test_compact_residual_is_the_nearest_upsampled_input():
    cfg = E.CompactConfig(nf=8, num_conv=2, scale=4)
    net = tiny_net(cfg, seed=2)
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        body = x
        for layer in net.body:  # reference: conv / PReLU(a) = max(0,h) + a·min(0,h)
            if isinstance(layer, torch.nn.PReLU):
                a = layer.weight[None, :, None, None]
                body = body.clamp_min(0) + a * body.clamp_max(0)
            else:
                body = F.conv2d(body, layer.weight, layer.bias, padding=1)
        b, c, h, w = x.shape  # pixel shuffle: out[c, y·s+i, x·s+j] = in[c·s² + i·s + j, y, x]
        shuffled = body.reshape(b, 3, 4, 4, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, 3, h * 4,
                                                                                   w * 4)
        near = x.repeat_interleave(4, 2).repeat_interleave(4, 3)
        torch.testing.assert_close(net(x), shuffled + near, rtol=0, atol=1e-5)
        net.body[-1].weight.zero_()
        net.body[-1].bias.zero_()
        assert torch.equal(net(x), near)


# ---------------------------------------------------------------------- tiling
@pytest.mark.parametrize("cfg,tile,overlap", [
    (E.CompactConfig(nf=8, num_conv=1, scale=4), 26, 12),  # receptive radius 3 ≤ 12/4
    (E.RRDBConfig(nf=4, gc=2, nb=1), 160, 76),  # radius ≈ 18.3 ≤ 76/4
    (E.RRDBConfig(nf=4, gc=2, nb=1, n_up=2, unshuffle=2), 150, 62)])  # aligned starts
def test_tiled_equals_untiled_when_the_overlap_covers_the_receptive_field(cfg, tile, overlap):
    """Tolerance 1e-5 (fp32 summation order): a quarter of the overlap is weighted zero, so
    no pixel that saw a tile's zero padding counts when the radius fits in it (the ×2
    unshuffle net's radius, ≈36 input pixels, exceeds its 98/4; what reaches further is
    damped by the 0.2 residual scalings below the tolerance)."""
    net = tiny_net(cfg, seed=4)
    h, w = (61, 75) if isinstance(cfg, E.CompactConfig) else (151, 203)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = net(x)
    tiled = E.upscale_tensor(net, x, tile=tile, overlap=overlap)
    assert len(E._starts(w, tile, overlap, getattr(cfg, "unshuffle", 1))) > 1
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


def test_narrow_overlap_still_blends_close_to_untiled():
    """A1111-like overlap 8 on a net whose radius exceeds it: seams are feathered, not exact;
    the result stays within 0.05 of the untiled one on average (it is 0 away from seams)."""
    net = tiny_net(E.CompactConfig(nf=8, num_conv=6, scale=2), seed=5)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = net(x)
    tiled = E.upscale_tensor(net, x, tile=32, overlap=8)
    d = (tiled - full).abs()
    assert d.mean() < 0.05 and d[..., :40, :40].max() < 1e-5


def test_tile_options_are_checked():
    net = tiny_net(E.CompactConfig(nf=4, num_conv=1, scale=2))
    with pytest.raises(Exception, match="less than half"):
        E.upscale_tensor(net, torch.rand(1, 3, 40, 40), tile=16, overlap=8)


# ---------------------------------------------------------------------- registry
@pytest.fixture
def updir(tmp_path):
    d = tmp_path / "ESRGAN"
    d.mkdir()
    save_file(tiny_net(E.RRDBConfig(nf=8, gc=4, nb=1), seed=6).state_dict(),
              d / "4x-tiny.safetensors")
    sd = tiny_net(E.CompactConfig(nf=8, num_conv=1, scale=2), seed=7).state_dict()
    torch.save({"params": dict(sd)}, d / "2x-compact.pth")
    (d / "notes.txt").write_text("not a model")
    return d


def test_registry_names_and_scales(updir):
    entries = upscalers.available(updir)
    entries = [e for e in entries if e.path is None or e.path.parent == updir]
    assert [e.name for e in entries] == ["None", "Lanczos", "Nearest", "2x-compact", "4x-tiny"]
    assert [e.scale for e in entries[3:]] == [2, 4]
    shipped = [name for name, path in upscalers.EMBEDDED if path.is_file()]
    assert [e.name for e in upscalers.available(None)] == ["None", "Lanczos", "Nearest", *shipped]
    assert upscalers.find("lanczos", updir).name == "Lanczos"
    with pytest.raises(NotFoundError, match="'nope'.*4x-tiny"):
        upscalers.find("nope", updir)


def test_upscale_reaches_exact_sizes_with_passes_as_a1111(updir, monkeypatch):
    img = Image.new("RGB", (10, 7), (200, 30, 90))
    calls = []
    real = upscalers.run_model
    monkeypatch.setattr(upscalers, "run_model",
                        lambda m, im, **kw: calls.append(im.size) or real(m, im, **kw))
    for name in ("None", "Lanczos", "Nearest", "4x-tiny", "2x-compact"):
        for size in [(40, 28), (33, 21), (10, 7), (5, 3)]:
            out = upscalers.upscale(img, name, *size, upscaler_dir=updir, device="cpu")
            assert out.size == size and out.mode == "RGB"
    calls.clear()
    upscalers.upscale(img, "2x-compact", 70, 49, upscaler_dir=updir, device="cpu")
    assert calls == [(10, 7), (20, 14), (40, 28)]  # 3 passes (×8 = 80 ≥ 70), then Lanczos
    calls.clear()
    upscalers.upscale(img, "2x-compact", 200, 140, upscaler_dir=updir, device="cpu")
    assert len(calls) == 3  # never more than A1111's 3 passes
    calls.clear()
    upscalers.upscale(img, "4x-tiny", 10, 7, upscaler_dir=updir, device="cpu")
    assert calls == [(10, 7)]  # same size: one pass (A1111 scale == 1)
    # a model's pass is the model's output
    out = upscalers.upscale(img, "4x-tiny", 40, 28, upscaler_dir=updir, device="cpu")
    net = upscalers.load(updir / "4x-tiny.safetensors", "cpu")
    with torch.no_grad():
        y = net(upscalers.to_tensor(img))
    assert out.tobytes() == upscalers.to_image(y).tobytes()
    # transparency is kept
    rgba = Image.new("RGBA", (10, 7), (1, 2, 3, 128))
    assert upscalers.upscale(rgba, "4x-tiny", 40, 28, upscaler_dir=updir,
                             device="cpu").getpixel((5, 5))[3] == 128
    assert upscalers.load(updir / "4x-tiny.safetensors", "cpu") is net  # cached


def test_intermediate_limit(updir):
    with pytest.raises(Exception, match="over the limit"):
        upscalers.upscale(Image.new("RGB", (10, 10)), "4x-tiny", 40, 40, upscaler_dir=updir,
                          device="cpu", max_pixels=1000)


# ---------------------------------------------------------------------- CLI
def test_cli_upscale(updir, tmp_path, capsys):
    src = tmp_path / "in.png"
    from sdloom.infotext import save_png
    save_png(Image.new("RGB", (12, 9), (10, 200, 40)), src, "a cat\nSteps: 3, Seed: 1, Size: 12x9")
    out = tmp_path / "big.png"
    assert main(["upscale", str(src), "--upscaler", "4x-tiny", "--upscaler-dir", str(updir),
                 "--output", str(out), "--device", "cpu"]) == 0
    im = Image.open(out)
    assert im.size == (48, 32)  # 12·4, int(9·4)=36 → 32: A1111 rounds down to 8
    assert im.info["parameters"].startswith("a cat")
    assert main(["upscale", str(src), "--upscaler", str(updir / "2x-compact.pth"),
                 "--width", "30", "--height", "20", "-o", str(tmp_path / "folder"),
                 "--device", "cpu"]) == 0
    made = list((tmp_path / "folder" / "extras-images").iterdir())
    assert [Image.open(p).size for p in made] == [(30, 20)]
    assert main(["upscale", str(src), "--upscaler", "missing", "--upscaler-dir",
                 str(updir)]) == 1
    assert "upscaler not found: 'missing'" in capsys.readouterr().err
    assert main(["upscale", str(src), "--width", "30"]) == 1


# ---------------------------------------------------------------------- HTTP
@pytest.fixture
def client(updir, tmp_path):
    from fastapi.testclient import TestClient

    from sdloom.server.app import Server, create_app
    fake = SimpleNamespace(path=None, hash=None, device=torch.device("cpu"))
    server = Server(None, device="cpu", outdir=str(tmp_path / "out"), upscaler_dir=str(updir),
                    loader=lambda *a, **k: fake)
    return TestClient(create_app(server))


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


API = "/sdapi/v1"


def test_upscalers_route_lists_models(client):
    r = client.get(f"{API}/upscalers")
    assert r.status_code == 200
    rows = r.json()
    assert [x["name"] for x in rows] == ["None", "Lanczos", "Nearest", "sdloom-emoji-esrgan-x4",
                                         "2x-compact", "4x-tiny"]
    assert rows[5] == {"name": "4x-tiny", "model_name": "ESRGAN",
                       "model_path": "4x-tiny.safetensors", "model_url": None, "scale": 4}
    assert rows[3] == {"name": "sdloom-emoji-esrgan-x4", "model_name": "ESRGAN",
                       "model_path": "sdloom-emoji-esrgan-x4.safetensors", "model_url": None,
                       "scale": 4}


def test_extra_single_image(client, updir):
    img = Image.new("RGB", (16, 12), (50, 100, 150))
    r = client.post(f"{API}/extra-single-image",
                    json={"image": b64(img), "upscaler_1": "4x-tiny", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    out = unb64(r.json()["image"])
    assert out.size == (32, 24)
    want = upscalers.upscale(img, "4x-tiny", 32, 24, upscaler_dir=updir, device="cpu")
    assert out.convert("RGB").tobytes() == want.tobytes()
    assert "Postprocess upscaler: 4x-tiny" in r.json()["html_info"]
    assert out.info["postprocessing"].startswith("Postprocess upscale by: 2")
    # mode 1 to w×h with crop; second upscaler blended
    r = client.post(f"{API}/extra-single-image", json={
        "image": "data:image/png;base64," + b64(img), "resize_mode": 1,
        "upscaling_resize_w": 40, "upscaling_resize_h": 20, "upscaler_1": "Lanczos",
        "upscaler_2": "2x-compact", "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    assert unb64(r.json()["image"]).size == (40, 20)
    # upscaler None: the image unchanged
    r = client.post(f"{API}/extra-single-image", json={"image": b64(img)})
    assert unb64(r.json()["image"]).size == (16, 12)


def test_extra_batch_images(client):
    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    r = client.post(f"{API}/extra-batch-images", json={
        "imageList": [{"data": b64(im), "name": f"{i}.png"} for i, im in enumerate(imgs)],
        "upscaler_1": "2x-compact", "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    out = [unb64(s) for s in r.json()["images"]]
    assert [o.size for o in out] == [(24, 24)] * 3
    assert out[0].getpixel((12, 12)) != out[2].getpixel((12, 12))


@pytest.mark.parametrize("body,status,text", [
    ({"upscaler_1": "nope"}, 404, "upscaler not found: 'nope'"),
    ({"upscaler_2": "../etc/passwd"}, 404, "upscaler not found"),
    ({"upscaling_resize": 9}, 422, "upscaling_resize"),
    ({"upscaling_resize": "nan"}, 422, ""),
    ({"resize_mode": 2}, 422, "resize_mode"),
    ({"gfpgan_visibility": 1}, 422, "face restoration"),
    ({"image": "not base64!!"}, 422, "image"),
    ({"image": ""}, 404, "Image not found"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 100000}, 413, "max_side"),
    ({"upscaler_1": 5}, 422, "upscaler_1"),
])
def test_extras_errors_are_never_500(client, body, status, text):
    req = {"image": b64(Image.new("RGB", (8, 8))), **body}
    r = client.post(f"{API}/extra-single-image", json=req)
    assert r.status_code == status, r.text
    assert text in r.text
    r = client.post(f"{API}/extra-batch-images", json={"imageList": [{"nodata": 1}]})
    assert r.status_code == 422


def test_hires_fix_with_an_esrgan_model(updir, tmp_path, monkeypatch):
    # the hires pass decodes, runs the registry's upscaler (here the tiny ×4 RRDBNet), resizes
    # to the hires size and encodes again, as A1111 does for its non-latent upscalers
    from sdloom.checkpoints.save import save_model
    from sdloom.infotext import parse_infotext
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams

    from tiny import TINY_SD1, tiny_model
    save_model(tiny_model(), TINY_SD1, tmp_path / "m.safetensors")
    eng = Engine.load(tmp_path / "m.safetensors", device="cpu", precision="fp32",
                      upscaler_dir=updir)
    seen = []
    real = upscalers.run_model
    monkeypatch.setattr(upscalers, "run_model", lambda m, im, **k: seen.append(im.size)
                        or real(m, im, **k))
    base = dict(prompt="x", seed=1, steps=2, width=64, height=64, enable_hr=True,
                hr_scale=1.5, denoising_strength=0.5)
    res = generate(eng, GenerationParams(**base, hr_upscaler="4x-tiny"))
    assert res.images[0].size == (96, 96) and seen == [(64, 64)]
    assert parse_infotext(res.infotexts[0])["Hires upscaler"] == "4x-tiny"
    lanczos = generate(eng, GenerationParams(**base, hr_upscaler="Lanczos"))
    assert lanczos.images[0].tobytes() != res.images[0].tobytes()
    with pytest.raises(NotFoundError, match="nope"):
        generate(eng, GenerationParams(**base, hr_upscaler="nope"))
