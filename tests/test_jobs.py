"""The job queue behind `sdloom serve` (server/jobs.py): FIFO order and its bound (503 with
Retry-After), many concurrent clients on a live server, progress by task id, interrupt with
the partly denoised batch, a client that goes away, live previews, A1111's internal routes."""
import base64
import io
import json
import socket
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import sdloom.server.jobs as jobs_mod
from sdloom.checkpoints.save import save_model
from sdloom.families import family_of
from sdloom.server.app import Server, create_app
from sdloom.server.jobs import Job, JobQueue, QueueFull, approx_preview

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    return path


def make_server(model, **kw) -> Server:
    return Server(str(model), device="cpu", precision="fp32",
                  outdir=str(model.parent / "out"), **kw)


def small(**kw):
    return {"prompt": "x", "seed": 3, "steps": 3, "width": 64, "height": 64,
            "sampler_name": "Euler", **kw}


def png(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def until(cond, timeout=60.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


class Gate:
    """A fake generate that records the order jobs ran in and holds each until released."""

    def __init__(self):
        self.order, self.release = [], threading.Event()

    def __call__(self, engine, p, cb=None):
        self.order.append(p.prompt)
        for i in range(100000):
            cb(i % 50 + 1, 50, None)  # raises Stop when interrupted
            if self.release.is_set():
                break
            time.sleep(0.005)
        raise jobs_mod.Stop("done")  # no images: the test checks order, not pixels


def post_in_thread(client, body, results, key):
    t = threading.Thread(target=lambda: results.__setitem__(
        key, client.post(f"{API}/txt2img", json=body)))
    t.start()
    return t


# ------------------------------------------------------------------ order, bound, progress
def test_fifo_order_bound_503_and_progress_by_task_id(model, monkeypatch):
    gate = Gate()
    monkeypatch.setattr(jobs_mod, "generate", gate)
    server = make_server(model, max_queue=2)
    client = TestClient(create_app(server))
    assert client.get("/internal/ping").json() == {}
    assert client.get("/internal/pending-tasks").json() == {"size": 0, "tasks": []}
    seen = {}
    ta = post_in_thread(client, small(prompt="a", force_task_id="task(a)"), seen, "a")
    until(lambda: server.jobs.running())
    tb = post_in_thread(client, small(prompt="b", force_task_id="task(b)"), seen, "b")
    until(lambda: server.jobs.pending())
    assert client.get("/internal/pending-tasks").json() == {"size": 1, "tasks": ["task(b)"]}
    # full: a third client is refused at once with a Retry-After, nothing queued
    r = client.post(f"{API}/txt2img", json=small(prompt="c"))
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == "QueueFull" and "max-queue 2" in r.json()["detail"]
    # progress of each job by its id while a runs: a is running, b waits its turn
    until(lambda: client.get(f"{API}/progress").json()["state"]["sampling_step"] > 0)
    pa = client.get(f"{API}/progress", params={"id_task": "task(a)"}).json()
    assert pa["state"]["job"] == "txt2img" and pa["state"]["job_count"] == 1
    assert 0.01 < pa["progress"] < 1 and pa["current_task"] == "task(a)"
    pb = client.get(f"{API}/progress", params={"id_task": "task(b)"}).json()
    assert pb["progress"] == 0 and pb["textinfo"] == "In queue: 1/1"
    assert pb["state"]["job_count"] == 0 and pb["current_task"] == "task(a)"
    unknown = client.get(f"{API}/progress", params={"id_task": "task(zz)"}).json()
    assert unknown["textinfo"] == "Waiting..." and unknown["progress"] == 0
    ip = client.post("/internal/progress", json={"id_task": "task(b)"}).json()
    assert (ip["active"], ip["queued"], ip["completed"]) == (False, True, False)
    # interrupt by id: only a stops; b then runs
    client.post(f"{API}/interrupt", params={"id_task": "task(a)"})
    ta.join(30)
    until(lambda: gate.order == ["a", "b"])
    assert client.get(f"{API}/progress").json()["current_task"] == "task(b)"
    gate.release.set()
    tb.join(30)
    assert seen["a"].status_code == 200 and seen["b"].status_code == 200
    assert gate.order == ["a", "b"]  # first come, first run; c never ran
    ip = client.post("/internal/progress", json={"id_task": "task(a)"}).json()
    assert ip["completed"] is True and ip["active"] is False
    assert server.jobs.find("task(a)").interrupted and not server.jobs.find("task(b)").interrupted
    server.jobs.close()


def test_a_task_id_in_use_is_refused_and_progress_formula():
    q = JobQueue(max_queue=3)
    go = threading.Event()
    first = q.submit(Job("txt2img", lambda job: go.wait(30), id="task(x)"))
    with pytest.raises(Exception, match="already queued or running"):
        q.submit(Job("txt2img", lambda job: None, id="task(x)"))
    until(lambda: first.status == "running")
    # A1111: 0.01 + job_no/job_count + step/steps/job_count
    first.begin(4)
    first.job_no, first.sampling_step, first.sampling_steps = 1, 5, 10
    p, eta = first.progress()
    assert p == pytest.approx(0.01 + 1 / 4 + 0.5 / 4) and eta >= 0
    go.set()
    first.wait(30)
    assert first.progress() == (1.0, 0.0)
    with pytest.raises(QueueFull):  # bound counts running and waiting jobs
        q2 = JobQueue(max_queue=1)
        hold = threading.Event()
        q2.submit(Job("x", lambda job: hold.wait(30)))
        try:
            q2.submit(Job("x", lambda job: None))
        finally:
            hold.set()
    q.close()


# ------------------------------------------------------------------ interrupt mid-batch
def test_interrupt_returns_finished_batches_and_the_partial_one(model, monkeypatch):
    server = make_server(model)
    client = TestClient(create_app(server))
    ref = client.post(f"{API}/txt2img", json=small(seed=20, steps=40, batch_size=2)).json()
    real = jobs_mod.generate

    def slowed(engine, p, cb=None, **kw):  # the real pipeline, slowed so the test can aim
        def slow_cb(*a):
            time.sleep(0.02)
            cb(*a)
        return real(engine, p, slow_cb, **kw)
    monkeypatch.setattr(jobs_mod, "generate", slowed)
    seen = {}
    t = post_in_thread(client, small(seed=20, steps=40, batch_size=2, n_iter=3), seen, "r")
    until(lambda: (server.progress()["state"]["job_no"] == 1
                   and server.progress()["state"]["sampling_step"] >= 3))
    t0 = time.perf_counter()
    assert client.post(f"{API}/interrupt").status_code == 200
    assert time.perf_counter() - t0 < 0.5  # returns at once
    t.join(60)
    out = seen["r"].json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [20, 21, 22, 23]  # batch 1 finished, batch 2 partial, 3 never
    imgs = [png(s) for s in out["images"]]
    assert [im.size for im in imgs] == [(64, 64)] * 4
    # the finished batch is what an uninterrupted request gives
    assert [im.tobytes() for im in imgs[:2]] == [png(s).tobytes() for s in ref["images"]]
    # the partial ones are a few steps in: the decoded x̂0, not a finished image or noise
    ref2 = client.post(f"{API}/txt2img", json=small(seed=22, steps=40)).json()
    assert imgs[2].tobytes() != png(ref2["images"][0]).tobytes()
    assert imgs[2].tobytes() != imgs[3].tobytes()
    assert "Seed: 22" in info["infotexts"][2] and "Seed: 23" in info["infotexts"][3]
    assert server.progress()["state"]["job_count"] == 0  # idle again
    server.jobs.close()


# ------------------------------------------------------------------ live previews
def test_approx_preview_is_the_factor_matrix():
    m = torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, -0.5])
    x = torch.zeros(1, 2, 2, 3)
    x[0, 0, 0, 0] = 1.0  # → RGB (0.5, -0.5, -0.5) → (191, 64, 64)
    x[0, 1, 1, 2] = 1.0  # → RGB (0, 0, 0.5) → (128, 128, 191)
    img = approx_preview(x, (m, bias))
    assert img.size == (3, 2)
    assert img.getpixel((0, 0)) == (191, 64, 64) and img.getpixel((2, 1)) == (128, 128, 191)
    assert approx_preview(x.repeat(2, 1, 1, 1), (m, None)).size == (6, 2)  # batch → grid


def test_preview_every_n_steps_and_skip_current_image(model, monkeypatch):
    server = make_server(model)
    client = TestClient(create_app(server))
    steps = []
    real_set = Job.set_preview
    monkeypatch.setattr(Job, "set_preview",
                        lambda self, img, step: (steps.append((step, img.size)),
                                                 real_set(self, img, step)))
    body = small(steps=7, n_iter=2, override_settings={"show_progress_every_n_steps": 3})
    assert client.post(f"{API}/txt2img", json=body).status_code == 200
    # each batch has its own period (A1111 state.nextjob), previews at latent size (64/8)
    assert steps == [(3, (8, 8)), (6, (8, 8))] * 2
    steps.clear()
    client.post(f"{API}/txt2img", json=small(steps=12))  # A1111's default: every 10 steps
    assert [s for s, _ in steps] == [10]
    steps.clear()
    client.post(f"{API}/txt2img", json=small(
        steps=6, override_settings={"show_progress_every_n_steps": -1}))
    assert steps == []
    # a family whose factors are unknown (the embedded model) has no preview
    fam = family_of(server.engine.config)
    monkeypatch.setattr(type(fam), "preview_factors", lambda self, cfg: None)
    client.post(f"{API}/txt2img", json=small(steps=12))
    assert steps == []
    monkeypatch.undo()
    # over HTTP while the job runs: a PNG of the latent size, omitted with skip_current_image
    real = jobs_mod.generate
    hold = threading.Event()

    def held(engine, p, cb=None, **kw):
        def cb2(step, total, x0):
            cb(step, total, x0)
            if step >= 2:
                hold.wait(30)
        return real(engine, p, cb2, **kw)
    monkeypatch.setattr(jobs_mod, "generate", held)
    seen = {}
    t = post_in_thread(client, small(steps=5, override_settings={
        "show_progress_every_n_steps": 2}), seen, "r")
    until(lambda: server.progress()["current_image"] is not None)
    r = client.get(f"{API}/progress").json()
    assert png(r["current_image"]).size == (8, 8) and r["state"]["sampling_step"] == 2
    assert client.get(f"{API}/progress", params={"skip_current_image": True}).json()[
        "current_image"] is None
    hold.set()
    t.join(30)
    assert seen["r"].status_code == 200
    assert client.get(f"{API}/progress").json()["current_image"] is None  # nothing runs
    assert client.post(f"{API}/options", json={"show_progress_every_n_steps": 5000}
                       ).status_code == 422
    server.jobs.close()


# ------------------------------------------------------------------ a live server
@pytest.fixture
def live(model):
    import uvicorn
    servers = []

    def start(**kw):
        server = make_server(model, **kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                           log_level="warning"))
        t = threading.Thread(target=uv.run, daemon=True)
        t.start()
        until(lambda: uv.started, 30)
        servers.append((uv, t, server))
        return server, f"http://127.0.0.1:{port}", port
    yield start
    for uv, t, server in servers:
        uv.should_exit = True
        t.join(10)
        server.jobs.close()


def test_many_concurrent_clients_complete_or_get_503(live):
    import httpx
    server, url, _ = live(max_queue=3)
    body = small(seed=77, steps=4)
    with httpx.Client(base_url=url, timeout=120) as c:
        single = c.post(f"{API}/txt2img", json=body)
    assert single.status_code == 200
    want = png(single.json()["images"][0]).tobytes()
    results = []

    def client_thread():
        with httpx.Client(base_url=url, timeout=120) as c:
            results.append(c.post(f"{API}/txt2img", json=body))
    threads = [threading.Thread(target=client_thread) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 10 and set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 3  # the queue's worth at least
    for r in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
        else:  # the same seed gives the same image as a request alone
            assert png(r.json()["images"][0]).tobytes() == want
    assert server.jobs.busy() == 0


def test_a_client_that_disconnects_does_not_block_the_next_job(live, monkeypatch):
    import httpx
    gate = Gate()
    monkeypatch.setattr(jobs_mod, "generate", gate)
    server, url, port = live(max_queue=2)
    raw = json.dumps(small(prompt="gone", force_task_id="task(gone)")).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: application/json\r\nContent-Length: "
              + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    until(lambda: server.jobs.running())
    s.close()  # the client goes away mid-job
    until(lambda: server.jobs.find("task(gone)").done, 30)
    assert server.jobs.find("task(gone)").interrupted
    gate.release.set()
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(f"{API}/txt2img", json=small(prompt="next"))
    assert r.status_code == 200 and gate.order == ["gone", "next"]


def test_one_worker_and_one_engine_per_device(tmp_path):
    """--device cpu,cpu: two workers, each with its own engine on its device, running two jobs
    at once (a barrier that only two concurrent jobs pass), and the same image from either."""
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from sdloom.server.options import devices_of
    assert devices_of("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and devices_of("cpu") == ["cpu"]
    save_model(tiny_model(), TINY_SD1, tmp_path / "m.safetensors")
    server = Server(str(tmp_path / "m.safetensors"), device="cpu,cpu", precision="fp32",
                    outdir=str(tmp_path / "out"))
    both = threading.Barrier(2, timeout=60)

    def work(job):
        eng, _ = server.with_engine(None, False, lambda e: both.wait(), worker=job.worker)
        return job.worker, eng

    a, b = server.jobs.submit(Job("a", work)), server.jobs.submit(Job("b", work))
    (wa, ea), (wb, eb) = a.wait(120), b.wait(120)
    assert {wa, wb} == {0, 1} and ea is not eb
    assert server.engine_for(0) is server.engine and server.engine_for(1) in (ea, eb)
    p = GenerationParams(prompt="a cat", seed=3, steps=2, width=64, height=64)
    imgs = [generate(server.engine_for(w), p).images[0].tobytes() for w in (0, 1)]
    assert imgs[0] == imgs[1]
    server.unload()
    assert not server._more


def test_full_vae_preview_and_preview_format(model, monkeypatch):
    """show_progress_type "Full": the preview is x̂0 through the VAE (the image size, equal to
    decoding that x̂0); live_previews_image_format picks the encoding; the A1111 types that
    need other weights are a 422 naming the option."""
    from sdloom.images import to_pil
    server = make_server(model)
    client = TestClient(create_app(server))
    seen = []
    real_set = Job.set_preview

    def record(self, img, step):
        seen.append((step, img))
        real_set(self, img, step)
    monkeypatch.setattr(Job, "set_preview", record)
    x0s = {}
    real = jobs_mod.generate

    def keep(engine, p, cb=None, **kw):
        def cb2(step, total, x0):
            x0s[step] = x0.clone()
            cb(step, total, x0)
        return real(engine, p, cb2, **kw)
    monkeypatch.setattr(jobs_mod, "generate", keep)
    body = small(steps=4, override_settings={"show_progress_every_n_steps": 2,
                                             "show_progress_type": "Full"})
    assert client.post(f"{API}/txt2img", json=body).status_code == 200
    assert [s for s, _ in seen] == [2, 4]
    step, img = seen[0]
    assert img.size == (64, 64)
    assert img.tobytes() == to_pil(server.engine.decode(x0s[step]))[0].tobytes()
    job = Job("p", lambda j: None)
    job.set_preview(img, 1)
    job.preview_format = "jpeg"
    assert base64.b64decode(job.preview_png())[:3] == b"\xff\xd8\xff"  # JPEG
    r = client.post(f"{API}/txt2img", json=small(override_settings={
        "show_progress_type": "TAESD"}))
    assert r.status_code == 422 and "show_progress_type" in r.json()["detail"]
