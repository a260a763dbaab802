"""Reliability and security at the edges: one JSON error shape, limits, per-job isolation,
names-not-paths, control routes that never wait, odd input refused, auth on every route,
host checks, and a CLI that answers bad values with one line (SECURITY.md maps each promise
here)."""
import base64
import inspect
import io
import json
import re
import struct
import threading
import time
import zlib

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

import sdloom.server.jobs as jobs_mod
from sdloom.checkpoints.save import save_model
from sdloom.cli import main
from sdloom.infotext import encode_image
from sdloom.limits import DEFAULT_LIMITS
from sdloom.families.sd_lora import lora_targets
from sdloom.server.app import Server, create_app

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"
SHAPE = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("secmodels")
    m = tiny_model()
    save_model(m, TINY_SD1, d / "tiny.safetensors")
    loras = d / "loras"
    loras.mkdir()
    # a one-module LoRA on the text encoder's first q projection: changes every image
    name, t = next((k, t) for k, t in lora_targets(m).items()
                   if k.startswith("lora_te_") and "q_proj" in k)
    out_f, in_f = dict(m.named_parameters())[t.param].shape
    g = torch.Generator().manual_seed(0)
    save_file({f"{name}.lora_down.weight": torch.randn(4, in_f, generator=g),
               f"{name}.lora_up.weight": torch.randn(out_f, 4, generator=g),
               f"{name}.alpha": torch.tensor(4.0)}, str(loras / "good.safetensors"))
    return d


@pytest.fixture(scope="module")
def server(models):
    return Server(str(models / "tiny.safetensors"), models_dir=str(models), device="cpu",
                  precision="fp32", lora_dir=str(models / "loras"),
                  outdir=str(models.parent / "secout"))


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server), raise_server_exceptions=False)


def small(**kw):
    return {"prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64, **kw}


def png_header(w: int, h: int) -> bytes:
    """A valid PNG whose header claims w×h pixels with a tiny IDAT (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(img: Image.Image) -> str:
    return b64(encode_image(img, "png"))


def assert_shape(r, status: int | tuple[int, ...]):
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) >= SHAPE, body
    assert all(isinstance(body[k], str) for k in SHAPE), body
    assert "Traceback" not in r.text
    return body


# ------------------------------------------------------------------ 1. one error shape
def test_sdloom_errors_map_to_the_a1111_error_body_with_their_status(client):
    b = assert_shape(client.post(f"{API}/txt2img", json=small(width=32)), 422)
    assert "at least 64" in b["detail"] and b["error"].endswith("Error")
    b = assert_shape(client.post(f"{API}/txt2img", json=small(sampler_name="Nope")), 404)
    assert b["error"] == "NotFoundError" and "Sampler not found" in b["detail"]
    b = assert_shape(client.post(f"{API}/txt2img", json=small(prompt="<lora:nosuch:1> x")), 404)
    assert b["error"] == "NotFoundError" and "LoRA not found" in b["detail"]


def test_validation_errors_and_unknown_routes_have_the_same_shape(client):
    b = assert_shape(client.post(f"{API}/txt2img", json={"steps": "many"}), 422)
    assert "steps" in b["detail"]
    assert_shape(client.post(f"{API}/txt2img", content=b"{not json"), (400, 422))
    assert_shape(client.get(f"{API}/nope"), 404)
    assert_shape(client.get(f"{API}/txt2img"), 405)


def test_an_unexpected_failure_is_a_json_500_without_traceback_or_paths(client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("/very/secret/server/path exploded")
    monkeypatch.setattr(jobs_mod, "generate", boom)
    r = client.post(f"{API}/txt2img", json=small())
    b = assert_shape(r, 500)
    assert "/very/secret" not in r.text and "exploded" not in r.text
    assert b["error"] == "InternalError"


def test_error_messages_do_not_reveal_server_folders(client, models):
    r = client.post(f"{API}/txt2img", json=small(prompt="<lora:nosuch:1>"))
    assert str(models) not in r.text and str(models.parent) not in r.text


# ------------------------------------------------------------------ 2 and 6. limits, odd input
BAD_JSON = [
    ('{"prompt": "x", "steps": 2, "cfg_scale": NaN}', "NaN cfg"),
    ('{"prompt": "x", "steps": 2, "cfg_scale": Infinity}', "Infinity cfg"),
    ('{"prompt": "x", "steps": 2, "eta": -Infinity}', "-Infinity eta"),
    ('{"prompt": "x", "steps": 2, "cfg_scale": 1e999}', "overflowing float"),
    ('{"prompt": "x\\ud800", "steps": 2}', "lone surrogate in prompt"),
    ('{"prompt": "x", "negative_prompt": "\\udfff", "steps": 2}', "lone surrogate in negative"),
    ('{"prompt": "x", "steps": 2, "extra_field": NaN}', "NaN in an unknown field"),
    ('{"prompt": "x", "steps": 2, "override_settings": {"\\ud800": 1}}', "surrogate in a key"),
    ('{"prompt": "x", "steps": 2, "enable_hr": true, "hr_scale": NaN}', "NaN hr_scale"),
    ("[" * 100000 + "]" * 100000, "deeply nested JSON"),
    ("[1, 2]", "a list, not an object"),
    ('"text"', "a string, not an object"),
]


@pytest.mark.parametrize("raw,why", BAD_JSON, ids=[w for _, w in BAD_JSON])
def test_non_finite_and_odd_json_is_refused_at_the_edge(client, raw, why):
    r = client.post(f"{API}/txt2img", content=raw.encode(),
                    headers={"Content-Type": "application/json"})
    assert_shape(r, (400, 422))


BAD_FIELDS = [
    ({"seed": 2 ** 64}, "seed ≥ 2^64"),
    ({"seed": 2 ** 64 - 1, "batch_size": 2}, "seed + i ≥ 2^64"),
    ({"seed": -2}, "seed < -1"),
    ({"subseed": 2 ** 70, "subseed_strength": 0.5}, "subseed ≥ 2^64"),
    ({"width": 0}, "width 0"),
    ({"height": -64}, "negative height"),
    ({"batch_size": 0}, "batch 0"),
    ({"n_iter": -1}, "n_iter -1"),
    ({"steps": 0}, "steps 0"),
    ({"steps": 10 ** 30}, "huge steps"),
    ({"enable_hr": True, "hr_scale": -2}, "negative hr_scale"),
    ({"enable_hr": True, "hr_scale": 1e6}, "huge hr_scale"),
    ({"enable_hr": True, "hr_resize_x": -64}, "negative hr_resize"),
    ({"denoising_strength": 7}, "denoise > 1"),
    ({"subseed_strength": -1}, "subseed strength < 0"),
    ({"prompt": "<lora:good:->"}, "LoRA weight '-'"),
    ({"prompt": "<lora:good:1e999>"}, "LoRA weight inf"),
    ({"prompt": "<lora:good:1e5000>x<lora:good:.>"}, "LoRA weight '.'"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 1e308}}, "clip skip huge"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 100}}, "clip skip 100"),
    ({"override_settings": {"samples_format": "exe"}}, "unknown format"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "model path"),
    ({"override_settings": "x"}, "override_settings not a dict"),
    ({"sampler_name": "\x00"}, "NUL sampler"),
    ({"prompt": ["x"]}, "prompt a list"),
]


@pytest.mark.parametrize("fields,why", BAD_FIELDS, ids=[w for _, w in BAD_FIELDS])
def test_out_of_range_fields_are_a_4xx_never_a_500(client, fields, why):
    assert_shape(client.post(f"{API}/txt2img", json=small(**fields)), (404, 413, 422))


IMG = Image.new("RGB", (64, 64), (90, 20, 20))
BAD_IMG2IMG = [
    ({"init_images": ["not base64!"]}, "not base64"),
    ({"init_images": [b64(encode_image(IMG, "png")[:80])]}, "truncated PNG"),
    ({"init_images": [b64(png_header(100000, 100000))]}, "decompression bomb"),
    ({"init_images": [b64(png_header(7000, 7000))]}, "over max_image_pixels"),
    ({"init_images": [b64(b"GIF89a" + b"\xff" * 20)]}, "broken GIF"),
    ({"init_images": [png(IMG)], "mask": b64(png_header(100000, 100000))}, "bomb mask"),
    ({"init_images": [png(IMG)], "mask": png(Image.new("L", (32, 32))), "resize_mode": 3},
     "mask with latent resize"),
    ({"init_images": [png(IMG)], "mask": png(Image.new("L", (64, 64))), "mask_blur": 10 ** 9},
     "huge mask blur"),
    ({"init_images": [png(IMG)], "mask": png(Image.new("L", (64, 64))), "inpainting_fill": 9},
     "unknown fill"),
    ({"init_images": [png(IMG)], "resize_mode": 7}, "unknown resize mode"),
    ({"init_images": [png(Image.new("I;16", (64, 64)))], "mask": png(Image.new("LA", (64, 64)))},
     "16-bit images"),
    ({"init_images": []}, "no images"),
    ({"init_images": [123]}, "an int"),
]


@pytest.mark.parametrize("fields,why", BAD_IMG2IMG, ids=[w for _, w in BAD_IMG2IMG])
def test_bad_images_are_a_4xx_never_a_500(client, fields, why):
    r = client.post(f"{API}/img2img", json=small(**fields))
    if why == "16-bit images":  # odd modes are converted, not refused
        assert r.status_code == 200, r.text
        return
    assert_shape(r, (404, 413, 422))


def test_images_are_measured_before_they_are_decoded(client, monkeypatch):
    loaded = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self.size) or real(self))
    r = client.post(f"{API}/png-info", json={"image": b64(png_header(7000, 7000))})
    b = assert_shape(r, 413)
    assert "max_image_pixels" in b["detail"] and (7000, 7000) not in loaded
    assert_shape(client.post(f"{API}/png-info", json={"image": "%%%"}), 422)


def test_body_size_is_limited_before_reading(models):
    srv = Server(str(models / "tiny.safetensors"), device="cpu", precision="fp32",
                 limits=DEFAULT_LIMITS.with_overrides(["max_body_bytes=2000"]))
    c = TestClient(create_app(srv), raise_server_exceptions=False)
    b = assert_shape(c.post(f"{API}/txt2img", json=small(prompt="x" * 5000)), 413)
    assert "max_body_bytes" in b["detail"]

    def chunks():  # no Content-Length: the cap applies while streaming
        for _ in range(100):
            yield b" " * 100
    b = assert_shape(c.post(f"{API}/txt2img", content=chunks(),
                            headers={"Content-Type": "application/json"}), 413)
    assert "max_body_bytes" in b["detail"]
    assert c.post(f"{API}/txt2img", json=small()).status_code == 200


def test_limits_name_themselves_and_serve_takes_overrides(models):
    from sdloom.cli import build_parser
    a = build_parser().parse_args(["serve", "--limit", "max_images=3", "--limit",
                                   "max_prompt_bytes=100"])
    limits = DEFAULT_LIMITS.with_overrides(a.limit)
    assert limits.max_images == 3 and limits.max_prompt_bytes == 100
    srv = Server(str(models / "tiny.safetensors"), device="cpu", precision="fp32", limits=limits)
    c = TestClient(create_app(srv), raise_server_exceptions=False)
    b = assert_shape(c.post(f"{API}/txt2img", json=small(batch_size=2, n_iter=2)), 413)
    assert "max_images" in b["detail"] and b["error"] == "LimitError"
    b = assert_shape(c.post(f"{API}/txt2img", json=small(prompt="é" * 60)), 413)
    assert "max_prompt_bytes" in b["detail"]
    b = assert_shape(c.post(f"{API}/txt2img", json=small(negative_prompt="y" * 101)), 413)
    assert "max_prompt_bytes" in b["detail"]


# ------------------------------------------------------------------ 3. per-job isolation
def pixels(r) -> bytes:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).tobytes()


def test_a_failed_job_leaves_no_lora_merged(client):
    base = pixels(client.post(f"{API}/txt2img", json=small()))
    with_lora = pixels(client.post(f"{API}/txt2img", json=small(prompt="x <lora:good:1>")))
    assert with_lora != base  # the LoRA changes the image...
    assert pixels(client.post(f"{API}/txt2img", json=small())) == base  # ...only in its job
    r = client.post(f"{API}/txt2img", json=small(prompt="x <lora:good:1> <lora:nosuch:1>"))
    assert_shape(r, 404)
    assert pixels(client.post(f"{API}/txt2img", json=small())) == base


def test_a_job_that_fails_mid_sampling_leaves_no_lora_merged(client, monkeypatch):
    base = pixels(client.post(f"{API}/txt2img", json=small()))
    real = jobs_mod.generate

    def fail_after_loras(engine, p, cb=None):
        def bad_cb(*a):
            raise MemoryError("out of memory")
        return real(engine, p, bad_cb)
    monkeypatch.setattr(jobs_mod, "generate", fail_after_loras)
    r = client.post(f"{API}/txt2img", json=small(prompt="x <lora:good:1>"))
    assert 400 <= r.status_code < 600 and "Traceback" not in r.text
    monkeypatch.setattr(jobs_mod, "generate", real)
    assert pixels(client.post(f"{API}/txt2img", json=small())) == base


def test_override_settings_apply_to_one_job_only(client):
    r = client.post(f"{API}/txt2img", json=small(override_settings={
        "CLIP_stop_at_last_layers": 2, "samples_format": "jpg"}))
    assert json.loads(r.json()["info"])["clip_skip"] == 2
    assert client.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 1
    r = client.post(f"{API}/txt2img", json=small())
    assert json.loads(r.json()["info"])["clip_skip"] == 1
    assert base64.b64decode(r.json()["images"][0])[:4] == b"\x89PNG"


@pytest.mark.parametrize("body", [
    {"CLIP_stop_at_last_layers": 100}, {"CLIP_stop_at_last_layers": 0},
    {"CLIP_stop_at_last_layers": 1e308}, {"CLIP_stop_at_last_layers": "2x"},
    {"CLIP_stop_at_last_layers": None}, {"samples_format": "exe"},
    {"sd_model_checkpoint": "/etc/passwd"}, {"sd_model_checkpoint": ["x"]},
])
def test_post_options_validates_before_storing(client, body):
    before = client.get(f"{API}/options").json()
    assert_shape(client.post(f"{API}/options", json=body), (404, 422))
    assert client.get(f"{API}/options").json() == before
    assert client.post(f"{API}/txt2img", json=small()).status_code == 200


def test_post_options_stores_values_in_range(client):
    assert client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 12}).status_code \
        == 200
    assert client.get(f"{API}/options").json()["CLIP_stop_at_last_layers"] == 12
    client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 1})


def test_a_failed_save_leaves_no_empty_file_and_a_json_error(client, server, monkeypatch):
    import sdloom.infotext as infotext

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(infotext, "save_image", full)
    b = assert_shape(client.post(f"{API}/txt2img", json=small(save_images=True)), 500)
    assert "No space left on device" in b["detail"] and str(server.outdir) not in b["detail"]
    folder = server.outdir / "txt2img-images"
    assert not folder.exists() or [p for p in folder.iterdir() if p.stat().st_size == 0] == []


# ------------------------------------------------------------------ 4. names, not paths
def test_lora_names_resolve_only_inside_the_lora_folder(client, models):
    # ../tiny and the absolute path name real files outside the LoRA folder
    def detail(name):
        r = client.post(f"{API}/txt2img", json=small(prompt=f"<lora:{name}:1> x"))
        return r.status_code, r.json()["error"], re.sub(r"'.*'", "NAME", r.json()["detail"])
    unknown = detail("nosuch")
    assert unknown[0] == 404
    for name in ("../tiny", str(models / "tiny"), str(models / "tiny.safetensors"),
                 "/etc/passwd", "..\\tiny", "loras/../good", "./good"):
        assert detail(name) == unknown, name


def test_model_names_resolve_only_inside_the_models_folder(client, models, server):
    before = server.engine.path
    # (the listed file names, as /sd-models gives them, are accepted: not these)
    for name in ("/etc/passwd", str(models / "loras" / "good.safetensors"), "../secmodels/tiny",
                 "loras/good", str(models.parent)):
        r = client.post(f"{API}/options", json={"sd_model_checkpoint": name})
        b = assert_shape(r, 422)  # a value sdloom cannot honour, named
        assert "model not found" in b["detail"]
    assert server.engine.path == before


# ------------------------------------------------------------------ 5. control routes
def test_control_routes_answer_at_once_while_a_job_runs(client, server, monkeypatch):
    started = threading.Event()

    def slow(engine, p, cb=None):
        for i in range(3000):
            started.set()
            cb(i, 3000, None)
            time.sleep(0.005)
        raise AssertionError("not interrupted")
    monkeypatch.setattr(jobs_mod, "generate", slow)
    seen = {}
    jobs = [threading.Thread(target=lambda k=k: seen.__setitem__(
        k, client.post(f"{API}/txt2img", json=small()))) for k in range(3)]
    for t in jobs:
        t.start()
    assert started.wait(30)
    for route, method in (("progress", "get"), ("skip", "post"), ("progress", "get")):
        t0 = time.perf_counter()
        r = getattr(client, method)(f"{API}/{route}")
        assert r.status_code == 200 and time.perf_counter() - t0 < 0.5, route
    assert client.get(f"{API}/progress").json()["state"]["job_count"] == 1
    for k in range(3):  # one interrupt per job: each of the three queued jobs stops at once
        deadline = time.time() + 30
        while not server.jobs.running() and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        assert client.post(f"{API}/interrupt").status_code == 200
        assert time.perf_counter() - t0 < 0.5
        while len(seen) <= k and time.time() < deadline:  # that job has answered
            time.sleep(0.01)
    for t in jobs:
        t.join(30)
        assert not t.is_alive()
    assert all(seen[k].status_code == 200 for k in range(3))


def test_control_routes_never_take_the_job_lock_or_a_worker_thread(server):
    # coroutines run on the event loop: queued jobs holding every worker thread cannot block them
    a = create_app(server)
    found = 0
    for r in a.routes:
        if getattr(r, "path", "") in (f"{API}/progress", f"{API}/interrupt", f"{API}/skip"):
            assert inspect.iscoroutinefunction(r.endpoint), r.path
            found += 1
    assert found == 3
    # generation routes wait for their job on the event loop too: waiting holds no thread
    waits = [r for r in a.routes if getattr(r, "path", "") in (f"{API}/txt2img", f"{API}/img2img")]
    assert len(waits) == 2 and all(inspect.iscoroutinefunction(r.endpoint) for r in waits)


# ------------------------------------------------------------------ 7. auth and hosts
def test_auth_covers_every_route_with_several_users(server):
    a = create_app(server, api_auth="u1:p1,ünï:pässwörd")
    c = TestClient(a, raise_server_exceptions=False)
    paths = ["/", "/docs", "/redoc", "/openapi.json", "/web/app.js", "/nope"] + [
        r.path for r in a.routes if "GET" in getattr(r, "methods", ()) and "{" not in r.path]
    for p in paths:
        r = c.get(p)
        assert r.status_code == 401, p
        assert r.headers["www-authenticate"].startswith("Basic")
    assert c.post(f"{API}/txt2img", json=small()).status_code == 401
    for user, pw in (("u1", "p1"), ("ünï", "pässwörd")):
        auth = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        for p in ("/", "/docs", "/openapi.json", f"{API}/samplers"):
            assert c.get(p, headers={"Authorization": auth}).status_code == 200, (user, p)


@pytest.mark.parametrize("header", [
    "Basic " + b64(b"u1:wrong"), "Basic " + b64(b"nobody:p1"), "Basic " + b64(b"nobody:wrong"),
    "Basic " + b64(b"u1"), "Basic " + b64("ünï:pässwörd".encode("latin-1")),
    "Basic " + b64(b"\xff\xfe:\xff"), "Basic !!!notbase64", "Basic ", "Bearer abc", "Basic",
    "Basic " + b64(b"u1:p1") + "=extra",
])
def test_wrong_credentials_all_get_the_same_401(server, header):
    c = TestClient(create_app(server, api_auth="u1:p1,ünï:pässwörd"),
                   raise_server_exceptions=False)
    ref = c.get(f"{API}/samplers", headers={"Authorization": "Basic " + b64(b"u1:nope")})
    r = c.get(f"{API}/samplers", headers={"Authorization": header})
    assert r.status_code == 401 and r.json() == ref.json()
    assert r.headers["www-authenticate"] == ref.headers["www-authenticate"]


def test_compare_is_constant_time_on_bytes(monkeypatch, server):
    import secrets
    calls = []
    real = secrets.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)
    monkeypatch.setattr(secrets, "compare_digest", spy)
    c = TestClient(create_app(server, api_auth="u1:p1,u2:p2"), raise_server_exceptions=False)
    c.get(f"{API}/samplers", headers={"Authorization": "Basic " + b64(b"u1:p1")})
    n_hit = len(calls)
    calls.clear()
    c.get(f"{API}/samplers", headers={"Authorization": "Basic " + b64(b"zz:p1")})
    assert calls and all(t == (bytes, bytes) for t in calls)
    assert len(calls) == n_hit  # every user is compared, whether the name exists or not


def test_allowed_hosts_block_dns_rebinding(server):
    from sdloom.server import default_allowed_hosts
    assert default_allowed_hosts("127.0.0.1", None) == ["localhost", "127.0.0.1", "[::1]"]
    assert default_allowed_hosts("0.0.0.0", None) is None
    assert default_allowed_hosts("0.0.0.0", "a.example,b.example") == ["a.example", "b.example"]
    c = TestClient(create_app(server, allowed_hosts=default_allowed_hosts("127.0.0.1", None)),
                   raise_server_exceptions=False)
    for host in ("evil.example", "evil.example:7860", "localhost.evil.example", ""):
        assert_shape(c.get(f"{API}/samplers", headers={"Host": host}), 400)
    for host in ("localhost:7860", "127.0.0.1", "[::1]:7860", "LOCALHOST"):
        assert c.get(f"{API}/samplers", headers={"Host": host}).status_code == 200, host


# ------------------------------------------------------------------ 8. command line
@pytest.fixture(scope="module")
def model_file(models):
    return models / "tiny.safetensors"


@pytest.mark.parametrize("extra", [
    ["--width", "0"], ["--height", "-64"], ["--cfg", "nan"], ["--cfg", "inf"],
    ["--eta", "nan"], ["--steps", "-1"], ["--steps", "0"], ["--batch-size", "0"],
    ["--n-iter", "0"], ["--seed", str(2 ** 64)], ["--seed", "-5"], ["--hires-scale", "-1"],
    ["--hires-scale", "nan"], ["--denoise", "nan"], ["--subseed-strength", "inf"],
    ["--clip-skip", "0"], ["--width", "abc"], ["--seed", str(2 ** 64 - 1), "--batch-size", "2"],
])
def test_cli_bad_values_are_one_line_and_non_zero(model_file, tmp_path, capsys, extra):
    base = ["generate", "x", "--model", str(model_file), "-q", "--output", str(tmp_path)]
    code = main(base + (["--steps", "1"] if "--steps" not in extra else []) + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None)
    assert len(err) == 1 and err[0].startswith("sdloom: error:"), err
    assert "Traceback" not in err[0] and "ValueError" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_failed_save_leaves_no_empty_png(model_file, tmp_path, capsys, monkeypatch):
    import sdloom.infotext as infotext

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(infotext, "save_png", full)
    monkeypatch.setattr(infotext, "save_image", full)
    assert main(["generate", "x", "--model", str(model_file), "-q", "--steps", "1",
                 "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_cli_hides_raw_exception_texts(model_file, tmp_path, capsys, monkeypatch):
    import sdloom.pipelines.generate as gen

    def overflow(*a, **k):
        raise ValueError("Overflow when unpacking long")
    monkeypatch.setattr(gen, "generate", overflow)
    assert main(["generate", "x", "--model", str(model_file), "-q", "--steps", "1",
                 "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Overflow" not in err[0] and "SDLOOM_DEBUG" in err[0], err


def test_cli_mask_keeps_its_alpha(model_file, tmp_path, monkeypatch):
    import sdloom.pipelines.generate as gen
    seen = {}

    def spy(engine, p, cb=None):
        seen["mode"] = p.mask.mode
        raise KeyboardInterrupt
    monkeypatch.setattr(gen, "generate", spy)
    init, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.new("RGB", (64, 64)).save(init)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(mask)
    main(["inpaint", "x", "--model", str(model_file), "--init", str(init), "--mask", str(mask),
          "-q", "--output", str(tmp_path / "o")])
    assert seen["mode"] == "RGBA"


def _pickle_ckpt(path):
    import pickle

    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("echo pwned > " + str(path.parent / "PWNED"),)
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))


@pytest.mark.parametrize("kind", ["truncated", "huge-header", "pickle", "empty", "folder"])
def test_cli_info_on_hostile_checkpoints(model_file, tmp_path, capsys, kind):
    p = tmp_path / ("bad.ckpt" if kind == "pickle" else "bad.safetensors")
    if kind == "truncated":
        p.write_bytes(model_file.read_bytes()[:5000])
    elif kind == "huge-header":
        p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    elif kind == "pickle":
        _pickle_ckpt(p)
    elif kind == "empty":
        p.write_bytes(b"")
    else:
        p.mkdir()
    assert main(["info", str(p)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdloom: error:"), err
    assert "Traceback" not in err[0] and not (tmp_path / "PWNED").exists()
