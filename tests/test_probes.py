"""The start-up probe routes A1111 clients call (cmd-flags, embeddings, memory, scripts, …),
unload/reload of the model, and the refresh routes."""
import base64
import io
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastapi.testclient import TestClient

from sdloom.checkpoints.save import save_model
from sdloom.server.app import Server, create_app

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"
WIDTH = TINY_SD1.text_encoders[0].width  # 32


def embedding(path, n, width, seed):
    g = torch.Generator().manual_seed(seed)
    save_file({"emb_params": torch.randn(n, width, generator=g)}, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    save_model(tiny_model(), TINY_SD1, d / "tiny.safetensors")
    (d / "emb").mkdir()
    embedding(d / "emb" / "shiny.safetensors", 2, WIDTH, 0)
    embedding(d / "emb" / "foreign.safetensors", 1, 768, 1)  # an SD1.x file: not this model
    (d / "styles.csv").write_text("name,prompt,negative_prompt\nS,{prompt} s,n\n")
    return Server(str(d / "tiny.safetensors"), models_dir=str(d), device="cpu",
                  precision="fp32", embeddings_dir=str(d / "emb"), lora_dir=str(d / "loras"),
                  styles_file=str(d / "styles.csv"),
                  flags={"host": "127.0.0.1", "port": 7861, "api_auth": "me:secret"})


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server))


def pixels(r) -> bytes:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert(
        "RGB").tobytes()


BASE = {"seed": 4, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_lists_without_content_have_a1111_shapes(client):
    assert client.get(f"{API}/hypernetworks").json() == []
    assert client.get(f"{API}/face-restorers").json() == []
    assert client.get(f"{API}/extensions").json() == []
    assert client.get(f"{API}/scripts").json() == {"txt2img": ["x/y/z plot"],
                                                   "img2img": ["x/y/z plot"]}
    info = client.get(f"{API}/script-info").json()
    assert {(s["name"], s["is_alwayson"], s["is_img2img"]) for s in info} == {
        ("controlnet", True, False), ("controlnet", True, True),
        ("x/y/z plot", False, False), ("x/y/z plot", False, True)}
    assert all(s["args"] == [] for s in info if s["name"] == "controlnet")
    xyz = [s for s in info if s["name"] == "x/y/z plot"]
    assert [a["label"] for a in xyz[0]["args"]][:4] == ["X type", "X values", "X values",
                                                         "Y type"]
    for route in ("refresh-loras", "refresh-vae", "refresh-checkpoints"):
        assert client.post(f"{API}/{route}").status_code == 200


def test_cmd_flags_use_a1111_names_and_hide_the_password(client, server):
    f = client.get(f"{API}/cmd-flags").json()
    assert f["api"] is True and f["port"] == 7861 and f["server_name"] == "127.0.0.1"
    assert f["listen"] is False
    assert f["ckpt"].endswith("tiny.safetensors") and f["ckpt_dir"] == str(server.models_dir)
    assert f["embeddings_dir"].endswith("emb") and f["lora_dir"].endswith("loras")
    assert f["styles_file"][0].endswith("styles.csv") and f["no_half"] is True
    assert f["api_auth"] and "secret" not in json.dumps(f)
    assert f["esrgan_models_path"] is None and f["max_queue"] == server.max_queue


def test_memory_has_ram_and_cuda_as_a1111(client):
    m = client.get(f"{API}/memory").json()
    ram = m["ram"]
    assert set(ram) == {"free", "used", "total"}
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    if torch.cuda.is_available():
        assert set(m["cuda"]) == {"system", "active", "allocated", "reserved", "inactive",
                                  "events"}
        assert m["cuda"]["system"]["total"] > 0
    else:
        assert m["cuda"] == {"error": "unavailable"}


def test_embeddings_loaded_and_skipped(client):
    e = client.get(f"{API}/embeddings").json()
    assert e["loaded"] == {"shiny": {"step": None, "sd_checkpoint": None,
                                     "sd_checkpoint_name": None, "shape": WIDTH, "vectors": 2}}
    assert e["skipped"] == {"foreign": {"step": None, "sd_checkpoint": None,
                                        "sd_checkpoint_name": None, "shape": 768, "vectors": 1}}


def test_refresh_embeddings_picks_up_a_new_file(client, server):
    folder = server.embeddings_dir
    before = pixels(client.post(f"{API}/txt2img", json={**BASE, "prompt": "a newcomer"}))
    embedding(f"{folder}/newcomer.safetensors", 3, WIDTH, 2)
    assert "newcomer" not in client.get(f"{API}/embeddings").json()["loaded"]
    assert client.post(f"{API}/refresh-embeddings").status_code == 200
    loaded = client.get(f"{API}/embeddings").json()["loaded"]
    assert loaded["newcomer"]["vectors"] == 3 and "shiny" in loaded
    after = pixels(client.post(f"{API}/txt2img", json={**BASE, "prompt": "a newcomer"}))
    assert after != before  # the prompt now uses the embedding's vectors
    # a removed file is gone after the next refresh
    os.remove(f"{folder}/newcomer.safetensors")
    client.post(f"{API}/refresh-embeddings")
    assert "newcomer" not in client.get(f"{API}/embeddings").json()["loaded"]
    again = pixels(client.post(f"{API}/txt2img", json={**BASE, "prompt": "a newcomer"}))
    assert again == before


def test_unload_then_generate_reloads_the_model(client, server):
    ref = pixels(client.post(f"{API}/txt2img", json={**BASE, "prompt": "x"}))
    title = client.get(f"{API}/options").json()["sd_model_checkpoint"]
    assert client.post(f"{API}/unload-checkpoint").status_code == 200
    assert server._engine is None  # the weights are dropped
    # listing routes answer without loading it again
    assert client.get(f"{API}/options").json()["sd_model_checkpoint"] == title
    assert title in [m["title"] for m in client.get(f"{API}/sd-models").json()]
    assert client.get(f"{API}/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get(f"{API}/memory").status_code == 200
    assert server._engine is None
    # a bad request is still refused before any load
    assert client.post(f"{API}/txt2img", json={"prompt": "x", "width": 32}).status_code == 422
    assert server._engine is None
    assert pixels(client.post(f"{API}/txt2img", json={**BASE, "prompt": "x"})) == ref
    assert server._engine is not None
    # reload-checkpoint after an unload loads it; on a loaded model it changes nothing
    client.post(f"{API}/unload-checkpoint")
    assert client.post(f"{API}/reload-checkpoint").status_code == 200
    eng = server._engine
    assert eng is not None and eng.path.name == "tiny.safetensors"
    assert client.post(f"{API}/reload-checkpoint").status_code == 200
    assert server._engine is eng
    assert client.get(f"{API}/embeddings").json()["loaded"].keys() == {"shiny"}


NEW_ROUTES = [("get", "prompt-styles"), ("get", "cmd-flags"), ("get", "embeddings"),
              ("get", "hypernetworks"), ("get", "face-restorers"), ("get", "scripts"),
              ("get", "script-info"), ("get", "extensions"), ("get", "memory"),
              ("post", "unload-checkpoint"), ("post", "reload-checkpoint"),
              ("post", "refresh-embeddings"), ("post", "refresh-loras"),
              ("post", "refresh-vae")]


def test_auth_and_host_checks_cover_the_new_routes(server):
    c = TestClient(create_app(server, api_auth="me:secret",
                              allowed_hosts=["localhost", "testserver"]))
    for method, route in NEW_ROUTES:
        call = getattr(c, method)
        assert call(f"{API}/{route}").status_code == 401, route
        assert call(f"{API}/{route}", auth=("me", "wrong")).status_code == 401, route
        assert call(f"{API}/{route}", auth=("me", "secret"),
                    headers={"Host": "evil.example"}).status_code == 400, route
        assert call(f"{API}/{route}", auth=("me", "secret")).status_code == 200, route
    assert server._engine is not None  # the last unload was followed by a reload


def test_refresh_embeddings_while_unloaded_is_no_error(tmp_path):
    """Found by bench/fuzz_api.py: refresh-embeddings after unload-checkpoint answered 500."""
    server = Server(device="cpu", precision="fp32", outdir=str(tmp_path))
    client = TestClient(create_app(server))
    assert client.post("/sdapi/v1/unload-checkpoint").status_code == 200
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
