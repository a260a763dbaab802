"""The A1111 HTTP API on a tiny random model: fields, images with infotext, errors, auth,
progress, interrupt, model switching."""
import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

from fastapi.testclient import TestClient

from sdloom.checkpoints.save import save_model
from sdloom.infotext import encode_image, parse_infotext
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams
from sdloom.server.app import Server, create_app

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_model(tiny_model(), TINY_SD1, d / "tiny.safetensors")
    save_model(tiny_model(seed=1), TINY_SD1, d / "other.safetensors")
    return d


@pytest.fixture(scope="module")
def server(models):
    return Server(str(models / "tiny.safetensors"), models_dir=str(models), device="cpu",
                  precision="fp32", outdir=str(models.parent / "out"))


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server))


def b64(img: Image.Image) -> str:
    return base64.b64encode(encode_image(img, "png")).decode()


def unb64(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def first_rgb(r) -> bytes:
    """The RGB bytes of a 200 response's first image."""
    assert r.status_code == 200, r.text
    return unb64(r.json()["images"][0]).convert("RGB").tobytes()


def test_txt2img_returns_the_pipelines_images_with_infotext(client, server):
    body = {"prompt": "a red apple", "seed": 5, "steps": 3, "width": 64, "height": 64,
            "sampler_name": "Euler", "batch_size": 2, "unknown_client_field": 1}
    r = client.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    imgs = [unb64(s) for s in out["images"]]
    assert [im.size for im in imgs] == [(64, 64), (64, 64)]
    info = json.loads(out["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["steps"] == 3
    assert info["sd_model_name"] == "tiny" and len(info["infotexts"]) == 2
    assert parse_infotext(imgs[1].info["parameters"])["Seed"] == "6"
    assert out["parameters"]["prompt"] == "a red apple"
    # the same pixels as the library call
    ref = generate(server.engine, GenerationParams(prompt="a red apple", seed=5, steps=3,
                                                   width=64, height=64, sampler_name="Euler"))
    assert imgs[0].convert("RGB").tobytes() == ref.images[0].tobytes()


def test_save_images_writes_atomic_pngs_with_infotext(client, server):
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "seed": 11, "steps": 2,
                                            "save_images": True, "send_images": False})
    assert r.json()["images"] == []
    files = sorted((server.outdir / "txt2img-images").iterdir())
    assert [f.name for f in files] == ["00000-11.png"]
    assert parse_infotext(Image.open(files[0]).info["parameters"])["Seed"] == "11"


def test_defaults_n_iter_and_jpeg(client):
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "seed": 1, "steps": 2, "n_iter": 2,
                                            "override_settings": {"samples_format": "jpg"}})
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [1, 2] and info["width"] == TINY_SD1.default_size
    assert info["sampler_name"] == "Euler"  # A1111's API default sampler
    assert base64.b64decode(out["images"][0])[:3] == b"\xff\xd8\xff"  # JPEG


def test_hires_fields(client):
    r = client.post(f"{API}/txt2img", json={
        "prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64, "enable_hr": True,
        "hr_scale": 1.5, "hr_sampler_name": "Euler", "hr_prompt": "y", "sampler_name": "Heun"})
    assert r.status_code == 200, r.text
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert info["Hires sampler"] == "Euler" and info["Hires prompt"] == "y"
    assert unb64(r.json()["images"][0]).size == (96, 96)


def test_img2img_and_inpaint(client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = client.post(f"{API}/img2img", json={
        "init_images": ["data:image/png;base64," + b64(init)], "mask": b64(mask), "seed": 2,
        "steps": 4, "denoising_strength": 0.6, "mask_blur": 0, "inpainting_fill": 1,
        "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    out = unb64(r.json()["images"][0]).convert("RGB")
    assert out.size == (64, 64) and out.getpixel((2, 2)) == (200, 30, 30)
    assert r.json()["parameters"]["init_images"] is None  # not echoed back by default
    assert client.post(f"{API}/img2img", json={"prompt": "x"}).status_code == 404


def test_bad_input_is_a_clear_422(client):
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "width": 32, "steps": 2})
    assert r.status_code == 422 and "at least 64" in r.json()["detail"]
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "width": 8192, "steps": 2})
    assert r.status_code == 413 and "max_side" in r.json()["detail"]
    r = client.post(f"{API}/txt2img", json={"sampler_name": "Nope", "steps": 2})
    assert r.status_code == 404 and "Sampler not found" in r.json()["detail"]  # as A1111
    r = client.post(f"{API}/txt2img", json={"restore_faces": True})
    assert r.status_code == 422 and "restore_faces" in r.json()["detail"]
    r = client.post(f"{API}/img2img", json={"init_images": ["not base64!"]})
    assert r.status_code == 422 and "init_images[0]" in r.json()["detail"]
    r = client.post(f"{API}/img2img", json={"init_images": ["https://example.com/a.png"]})
    assert r.status_code == 422 and "URL" in r.json()["detail"]


def test_lists_options_and_png_info(client, models):
    names = [s["name"] for s in client.get(f"{API}/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M" in names
    assert "karras" in [s["name"] for s in client.get(f"{API}/schedulers").json()]
    titles = [m["title"] for m in client.get(f"{API}/sd-models").json()]
    assert any(t.startswith("tiny.safetensors [") for t in titles)
    assert "other.safetensors" in titles and "sdloom-emoji.safetensors" in titles
    opts = client.get(f"{API}/options").json()
    assert opts["sd_model_checkpoint"].startswith("tiny.safetensors [")
    assert client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert client.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 2
    client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 1})
    assert client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": "x"}).status_code \
        == 422
    assert client.post(f"{API}/options", json={"samples_format": "bmp"}).status_code == 422
    text = 'a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler, Seed: 9, Size: 64x64'
    img = Image.new("RGB", (8, 8))
    r = client.post(f"{API}/png-info",
                    json={"image": base64.b64encode(encode_image(img, "png", text)).decode()})
    assert r.json()["info"] == text and r.json()["parameters"]["Seed"] == "9"


def test_switching_models(client, server, models):
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": "other"})
    assert r.status_code == 200
    assert server.engine.path.name == "other.safetensors"
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
    client.post(f"{API}/options", json={"sd_model_checkpoint": "tiny.safetensors"})
    assert server.engine.path.name == "tiny.safetensors"


def start_job(client, server, **body):
    """A txt2img request in a thread, returned once it is two sampling steps in."""
    seen = {}

    def job():
        seen["r"] = client.post(f"{API}/txt2img", json={"prompt": "x", "seed": 3, "width": 64,
                                                        "height": 64, **body})

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and server.progress()["state"]["sampling_step"] < 2:
        time.sleep(0.01)
    return t, seen


def test_progress_and_interrupt(client, server):
    assert client.get(f"{API}/progress").json()["progress"] == 0
    t, seen = start_job(client, server, steps=400, n_iter=3)
    p = client.get(f"{API}/progress").json()
    assert p["state"]["job"] == "txt2img" and p["state"]["job_count"] == 3
    assert 0 < p["progress"] < 1
    client.post(f"{API}/interrupt")
    t.join(60)
    assert not t.is_alive()
    # A1111: the batch in progress comes back partly denoised; the batches after it never run
    assert seen["r"].status_code == 200 and len(seen["r"].json()["images"]) == 1
    assert json.loads(seen["r"].json()["info"])["all_seeds"] == [3]
    assert client.get(f"{API}/progress").json()["state"]["job_count"] == 0


def test_skip_drops_the_batch_in_progress(client, server):
    t, seen = start_job(client, server, steps=60, n_iter=2)
    assert server.progress()["state"]["job_no"] == 0
    client.post(f"{API}/skip")
    t.join(120)
    info = json.loads(seen["r"].json()["info"])
    assert info["all_seeds"] == [4]  # the first batch (seed 3) was skipped, the second ran


def test_basic_auth(server):
    c = TestClient(create_app(server, api_auth="me:secret"))
    assert c.get(f"{API}/samplers").status_code == 401
    assert c.get(f"{API}/samplers", auth=("me", "wrong")).status_code == 401
    assert c.get(f"{API}/samplers", auth=("me", "secret")).status_code == 200
    assert c.get("/").status_code == 401 and c.get("/web/app.js").status_code == 401
    page = c.get("/", auth=("me", "secret"))
    assert page.status_code == 200 and "<title>sdloom</title>" in page.text
    assert c.get("/web/nope.js", auth=("me", "secret")).status_code == 404


def test_serve_command_line_defaults_to_localhost():
    from sdloom.cli import build_parser
    a = build_parser().parse_args(["serve"])
    assert a.host == "127.0.0.1" and a.port == 7860


@pytest.mark.parametrize("w,h", [(136, 128), (200, 152), (88, 88)])
def test_any_multiple_of_8_over_http_with_a1111_seed_fields(client, w, h):
    # sizes that are multiples of 8 but not of 64 (as 600×600, 1280×720 on SD), in txt2img with
    # hires fix, img2img and inpaint; ENSD and seed resize reach the pipeline
    body = {"prompt": "x", "seed": 3, "steps": 2, "width": w, "height": h,
            "sampler_name": "Euler a", "enable_hr": True, "hr_scale": 1.5,
            "denoising_strength": 0.5, "seed_resize_from_w": 64, "seed_resize_from_h": 64,
            "override_settings": {"eta_noise_seed_delta": 31337}}
    r = client.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = unb64(r.json()["images"][0])
    assert img.size == (int(w * 1.5) // 8 * 8, int(h * 1.5) // 8 * 8)
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert info["Size"] == f"{w}x{h}" and info["ENSD"] == "31337"
    assert info["Seed resize from"] == "64x64"
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (8, 8, w // 2, h // 2))
    init = Image.new("RGB", (w, h), (10, 120, 30))
    for extra in ({}, {"mask": b64(mask), "inpainting_fill": 1}):
        r = client.post(f"{API}/img2img", json={"prompt": "x", "seed": 3, "steps": 2,
                                                "width": w, "height": h,
                                                "init_images": [b64(init)], **extra})
        assert r.status_code == 200, r.text
        assert unb64(r.json()["images"][0]).size == (w, h)


def test_a1111_leniency(client, server):
    """What A1111's pydantic-1 models accept: null for any field (its default), a float in an
    integer field (its integer part), a legacy combined sampler name (split as 1.9+ does), a
    mask of another size, resize mode 3 (the latent of the image as it is, scaled)."""
    base = {"prompt": "a red apple", "seed": 5, "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler"}

    plain = first_rgb(client.post(f"{API}/txt2img", json=base))
    nulls = {**base, "negative_prompt": None, "styles": None, "n_iter": None,
             "override_settings": None, "subseed": None, "eta": None}
    assert first_rgb(client.post(f"{API}/txt2img", json=nulls)) == plain
    r = client.post(f"{API}/txt2img", json={**base, "steps": 2.7, "seed": 5.0})
    assert first_rgb(r) == plain and json.loads(r.json()["info"])["steps"] == 2
    r = client.post(f"{API}/txt2img", json={**base, "sampler_name": "DPM++ 2M Karras"})
    assert json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M"
    assert first_rgb(r) == first_rgb(client.post(f"{API}/txt2img", json={
        **base, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    small = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # RGBA: the alpha is the mask
    small.paste((0, 0, 0, 255), (8, 8, 24, 24))
    body = {**base, "init_images": [b64(init)], "denoising_strength": 0.6, "mask_blur": 0,
            "inpaint_full_res": False}
    # A1111: the binary mask (alpha > 128) resized by the resize mode (0: Lanczos) to w×h
    big = small.getchannel("A").point(lambda v: 255 if v > 128 else 0).resize(
        (64, 64), Image.LANCZOS)
    assert (first_rgb(client.post(f"{API}/img2img", json={**body, "mask": b64(small)}))
            == first_rgb(client.post(f"{API}/img2img", json={**body, "mask": b64(big)})))
    # resize mode 3: an image of the target size gives what mode 0 gives; another size is
    # encoded as it is and its latent scaled, which differs from resizing the pixels
    i2i = {**base, "denoising_strength": 0.6}
    same = [first_rgb(client.post(f"{API}/img2img", json={**i2i, "init_images": [b64(init)],
                                                           "resize_mode": m})) for m in (0, 3)]
    assert same[0] == same[1]
    odd = Image.new("RGB", (48, 40), (30, 200, 30))
    odd.paste((0, 0, 255), (0, 0, 24, 20))
    m0, m3 = [first_rgb(client.post(f"{API}/img2img", json={**i2i, "init_images": [b64(odd)],
                                                             "resize_mode": m}))
              for m in (0, 3)]
    assert m0 != m3 and unb64(client.post(f"{API}/img2img", json={
        **i2i, "init_images": [b64(odd)], "resize_mode": 3}).json()["images"][0]).size == (64, 64)


def test_a_ray_replica_is_the_same_app_naming_itself(models, tmp_path):
    """`serve --ray`'s replica app (built without Ray here): the routes of create_app over its
    own Server, each response naming the replica's process."""
    import os

    from sdloom.server.ray_serve import build_app
    app = build_app(dict(model=str(models / "tiny.safetensors"), device="cpu",
                         precision="fp32", outdir=str(tmp_path)), {})
    r = TestClient(app).post(f"{API}/txt2img", json={"prompt": "x", "steps": 2, "seed": 1})
    assert r.status_code == 200 and r.headers["X-Sdloom-Replica"] == str(os.getpid())
    assert TestClient(app).get("/internal/ping").headers["X-Sdloom-Replica"] == str(os.getpid())


def test_vae_dir_and_sd_vae(models, tmp_path):
    """--vae-dir: /sd-vae lists its files; sd_vae (per request or in options) decodes with that
    VAE — as loading the model with --vae does — and the infotext/info name it; Automatic gives
    the model's own VAE back; an unknown name is a 422 naming the option and the value."""
    from safetensors.torch import save_file

    from sdloom.infotext import model_hash
    from sdloom.pipelines.engine import Engine
    vdir = tmp_path / "vae"
    vdir.mkdir()
    vae = tiny_model(seed=5).first_stage_model.state_dict()  # another VAE of the same shape
    save_file({k: v.contiguous() for k, v in vae.items()}, vdir / "other.safetensors")
    server = Server(str(models / "tiny.safetensors"), device="cpu", precision="fp32",
                    outdir=str(tmp_path / "out"), vae_dir=str(vdir))
    client = TestClient(create_app(server))
    listed = client.get(f"{API}/sd-vae").json()
    assert [v["model_name"] for v in listed] == ["other.safetensors"]
    body = {"prompt": "a cat", "seed": 3, "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler"}

    own = first_rgb(client.post(f"{API}/txt2img", json=body))
    r = client.post(f"{API}/txt2img", json={**body, "override_settings": {
        "sd_vae": "other.safetensors"}})
    want = generate(Engine.load(models / "tiny.safetensors", device="cpu", precision="fp32",
                                vae=str(vdir / "other.safetensors")),
                    GenerationParams(**{k: v for k, v in body.items()})).images[0].tobytes()
    assert first_rgb(r) == want != own
    info = json.loads(r.json()["info"])
    assert info["sd_vae_name"] == "other.safetensors"
    assert parse_infotext(info["infotexts"][0])["VAE hash"] == model_hash(
        vdir / "other.safetensors")
    assert first_rgb(client.post(f"{API}/txt2img", json=body)) == own  # restored
    assert client.post(f"{API}/options", json={"sd_vae": "other.safetensors"}).status_code == 200
    assert first_rgb(client.post(f"{API}/txt2img", json=body)) == want
    r = client.post(f"{API}/txt2img", json={**body, "override_settings": {"sd_vae": "nope"}})
    assert r.status_code == 422 and "sd_vae" in r.json()["detail"] and "nope" in r.json()[
        "detail"]


def test_sd_models_sha256_and_unknown_options_logged_once(client, server, models, caplog):
    """sd-models gives a checkpoint's sha256 once it has been hashed (the loaded one), as
    A1111; an option sdloom does not have is accepted and named once in the log."""
    import hashlib
    import logging
    assert server.engine.hash  # the loaded model's hash (cached on disk)
    listed = {m["model_name"]: m for m in client.get(f"{API}/sd-models").json()}
    want = hashlib.sha256((models / "tiny.safetensors").read_bytes()).hexdigest()
    assert listed["tiny"]["sha256"] == want and listed["tiny"]["hash"] == want[:10]
    with caplog.at_level(logging.WARNING, logger="sdloom.server"):
        for _ in range(2):
            assert client.post(f"{API}/options", json={"some_ui_option_xyz": 1}).status_code \
                == 200
    assert sum("some_ui_option_xyz" in r.getMessage() for r in caplog.records) == 1
