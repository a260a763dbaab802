"""A1111's X/Y/Z plot over the API (script_name "x/y/z plot" + script_args) and the outputs
history route (/sdloom/v1/outputs), on a tiny random model."""
import base64
import io
import json
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdloom.checkpoints.save import save_model
from sdloom.infotext import encode_image, parse_infotext
from sdloom.server.app import Server, create_app
from sdloom.server.xyz import Axis, AXES, annotate, parse_script_args

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"
BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "width": 64,
        "height": 64, "seed": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("xyz")
    save_model(tiny_model(), TINY_SD1, d / "tiny.safetensors")
    return Server(str(d / "tiny.safetensors"), device="cpu", precision="fp32",
                  outdir=str(d / "out"))


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server))


def unb64(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s)))


def xyz(client, args, **extra):
    return client.post(f"{API}/txt2img", json={**BASE, **extra, "script_name": "X/Y/Z plot",
                                              "script_args": args})


def plain(client, **fields) -> Image.Image:
    r = client.post(f"{API}/txt2img", json={**BASE, **fields})
    assert r.status_code == 200, r.text
    return unb64(r.json()["images"][0]).convert("RGB")


def test_grid_cells_are_the_plain_generations_under_their_labels(client):
    # x: Seed 5, 6 (index 1); y: Steps 1, 2 (index 4); lone images included (1.6-1.8 layout)
    r = xyz(client, [1, "5, 6", [], 4, "1-2", [], 0, "", [], True, True, False, False, 0,
                     False, False])
    assert r.status_code == 200, r.text
    grid, *cells = [unb64(s).convert("RGB") for s in r.json()["images"]]
    assert len(cells) == 4 and grid.width == 48 + 2 * 64  # row labels: 3/4 of a cell
    pad_top = grid.height - 128
    assert 8 < pad_top < 64
    for k, (seed, steps) in enumerate([(5, 1), (6, 1), (5, 2), (6, 2)]):  # x fastest
        want = plain(client, seed=seed, steps=steps)
        assert cells[k].tobytes() == want.tobytes()
        x, y = 48 + (k % 2) * 64, pad_top + (k // 2) * 64
        assert grid.crop((x, y, x + 64, y + 64)).tobytes() == want.tobytes()
    # the label bands are white with dark text drawn in them
    band = grid.crop((48, 0, grid.width, pad_top))
    assert band.getpixel((1, 1)) == (255, 255, 255) and band.convert("L").getextrema()[0] < 100
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [5, 5, 6, 5, 6] and len(info["infotexts"]) == 5
    p = parse_infotext(info["infotexts"][0])
    assert (p["Script"], p["X Type"], p["X Values"], p["Y Type"], p["Y Values"]) == \
        ("X/Y/Z plot", "Seed", "5, 6", "Steps", "1-2")
    assert p["Fixed X Values"] == "5, 6"
    assert parse_infotext(info["infotexts"][2])["Seed"] == "6"


def test_axis_kinds_by_label_and_the_img2img_indices(client, server):
    # labels instead of indices (sdloom's leniency); CFG and Prompt S/R; no legend
    r = xyz(client, ["CFG Scale", "3, 9", [], "Prompt S/R", "apple, pear", [], "Nothing", "",
                     [], False, True])
    assert r.status_code == 200, r.text
    grid, *cells = [unb64(s).convert("RGB") for s in r.json()["images"]]
    assert grid.size == (128, 128)  # no legend: the bare cells
    assert cells[3].tobytes() == plain(client, cfg_scale=9, prompt="a red pear").tobytes()
    assert json.loads(r.json()["info"])["infotexts"][3].startswith("a red pear\n")
    # img2img's list: index 5 is CFG Scale there (Hires steps is txt2img-only)
    init = base64.b64encode(encode_image(Image.new("RGB", (64, 64), (9, 90, 200)), "png"))
    r = client.post(f"{API}/img2img", json={
        **BASE, "init_images": [init.decode()], "script_name": "x/y/z plot",
        "script_args": [5, "4,8", [], 9, "", ["Euler", "Heun"], 0, "", []]})
    assert r.status_code == 200, r.text
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert (info["X Type"], info["Y Type"], info["Y Values"]) == ("CFG Scale", "Sampler",
                                                                  "Euler,Heun")
    w, h = unb64(r.json()["images"][0]).size
    assert w == 48 + 128 and 128 < h < 192


def test_values_ranges_and_seed_fixing():
    def values(kind, text):
        return parse_script_args([kind, text, []], False, "p", "").axes[0].values

    assert values("Steps", "1-5 (+2)") == [1, 3, 5]
    assert values("Steps", "10-30 [3]") == [10, 20, 30]
    assert values("CFG Scale", "5-7 [3]") == [5.0, 6.0, 7.0]
    assert values("CFG Scale", "1-2 (+0.5)") == [1.0, 1.5, 2.0]
    assert values("Seed", '-1, 7,"8"') == [-1, 7, 8]
    assert values("Prompt S/R", 'p,"a, b"') == ["p", "a, b"]
    ax = Axis(AXES["cfg scale"], [7.0], "7")
    assert (ax.label(7.0), Axis(AXES["sampler"], ["Euler"], "").label("Euler")) == \
        ("CFG Scale: 7.0", "Euler")


@pytest.mark.parametrize("args, message", [
    ([11, "x", []], "X axis 'Checkpoint name' is not supported"),
    ([99, "x", []], "X type 99 is not an axis sdloom has"),
    ([7, "dog, cat", []], "Prompt S/R did not find dog"),
    ([9, "Euler, Nope", [], 0, "", [], 0, "", [], True, False, False, False, 0, True],
     "unknown sampler 'Nope'"),
    ([4, "a, 3", []], "Steps value 'a' is not an integer"),
    ([4, "", []], "the X axis (Steps) has no values"),
    ([4, "1-3 (+0)", []], "has a step of 0"),
    ([4, "1-1000", []], "more than 256 values"),
])
def test_bad_plots_are_422s_naming_the_problem(client, args, message):
    r = xyz(client, args)
    assert r.status_code in (413, 422), r.text
    assert message in r.json()["detail"]


def test_grid_limits_and_vary_seeds(client, server):
    r = xyz(client, [1, "1-20", [], 4, "1-20", [], 0, "", []])  # 400 images > max_images 256
    assert r.status_code == 413 and "max_images=256" in r.json()["detail"]
    # 1.9+ layout: vary_seeds_x adds the column index to the seed
    r = xyz(client, [4, "1, 2", [], 0, "", [], 0, "", [], True, True, False, False, True, False,
                     False, 0, False])
    seeds = json.loads(r.json()["info"])["all_seeds"]
    assert seeds[1:] == [5, 6]


def test_saved_plot_and_the_history_route(client, server):
    out = server.outdir
    r = xyz(client, [1, "5,6", [], 0, "", [], 0, "", []], save_images=True)
    assert r.status_code == 200, r.text
    assert sorted(p.name for p in (out / "txt2img-grids").iterdir()) == ["00000-5.png"]
    assert sorted(p.name for p in (out / "txt2img-images").iterdir()) == \
        ["00000-5.png", "00001-6.png"]
    (out / "txt2img-images" / "00002-7.png").write_bytes(b"")  # reserved, still being written
    (out / "txt2img-images" / "notes.txt").write_text("not an image")
    os.symlink(out / "txt2img-images" / "00000-5.png", out / "txt2img-images" / "00003-8.png")
    os.utime(out / "txt2img-grids" / "00000-5.png", (2e9, 2e9))  # the newest
    page = client.get("/sdloom/v1/outputs?limit=2").json()
    assert page["total"] == 3 and page["offset"] == 0
    assert [it["name"] for it in page["items"]] == ["txt2img-grids/00000-5.png",
                                                    "txt2img-images/00001-6.png"]
    grid = page["items"][0]
    assert grid["width"] == 128 and 64 < grid["height"] < 128  # no Y axis: no row labels
    assert "Script: X/Y/Z plot" in grid["infotext"]
    rest = client.get("/sdloom/v1/outputs?offset=2&limit=2").json()
    assert [it["name"] for it in rest["items"]] == ["txt2img-images/00000-5.png"]
    assert "Seed: 5" in rest["items"][0]["infotext"]
    f = client.get(page["items"][1]["url"])
    assert f.status_code == 200 and f.headers["content-type"] == "image/png"
    assert f.content == (out / "txt2img-images" / "00001-6.png").read_bytes()
    for bad in ("txt2img-images/notes.txt", "txt2img-images/00003-8.png",
                "txt2img-images/00009-9.png", "other/00000-5.png", "..%2Fx/00000-5.png"):
        r = client.get(f"/sdloom/v1/outputs/{bad}")
        assert r.status_code == 404, bad
    assert client.get("/sdloom/v1/outputs?limit=0").status_code == 422
    assert client.get("/sdloom/v1/outputs?limit=101").status_code == 422


def test_annotate_wraps_long_labels_and_adds_margins():
    cells = Image.new("RGB", (2 * 64, 64), "gray")
    out = annotate(cells, 64, 64, ["a long label " * 4, "b"], ["row"], margin=6)
    assert out.width == 48 + 128 + 6
    short = annotate(cells, 64, 64, ["a", "b"], ["row"])
    assert out.height - 64 > short.height - 64  # several wrapped lines above the cells


def test_z_axis_puts_labelled_sub_grids_side_by_side(client):
    # z: Sampler from the dropdown list (csv_mode off); sub-grids included after the Z grid
    r = xyz(client, [1, "5,6", [], 0, "", [], 9, "", ["Euler", "Heun"], True, False, True,
                     False])
    assert r.status_code == 200, r.text
    z_grid, *subs = [unb64(s).convert("RGB") for s in r.json()["images"]]
    assert len(subs) == 2 and subs[0].size == subs[1].size
    sw, sh = subs[0].size
    assert sw == 128 and 64 < sh < 128  # column labels only (no Y axis)
    assert z_grid.width == 2 * sw and z_grid.height > sh  # the Z labels above
    top = z_grid.height - sh
    for k, sub in enumerate(subs):
        assert z_grid.crop((k * sw, top, (k + 1) * sw, top + sh)).tobytes() == sub.tobytes()
    heun = plain(client, seed=6, sampler_name="Heun")
    assert subs[1].crop((64, sh - 64, 128, sh)).tobytes() == heun.tobytes()
    infos = [parse_infotext(t) for t in json.loads(r.json()["info"])["infotexts"]]
    assert infos[0]["Z Type"] == "Sampler" and "Z Type" not in infos[1]
    assert infos[2]["Sampler"] == "Heun"


def test_the_request_is_read_once_whatever_the_cell_count(client, monkeypatch):
    import sdloom.server.generation as generation
    calls = []
    real = generation.decode_image

    def counting(data, what, limits):
        calls.append(what)
        return real(data, what, limits)

    monkeypatch.setattr(generation, "decode_image", counting)
    init = base64.b64encode(encode_image(Image.new("RGB", (64, 64), (9, 90, 200)), "png"))
    r = client.post(f"{API}/img2img", json={
        **BASE, "init_images": [init.decode()], "mask": init.decode(),
        "script_name": "x/y/z plot", "script_args": [1, "1,2,3", [], 7, "apple,pear", []]})
    assert r.status_code == 200, r.text
    assert sorted(calls) == ["init_images[0]", "mask"]  # not once per cell (6 cells)
    infos = json.loads(r.json()["info"])["infotexts"]
    assert len(infos) == 1 and parse_infotext(infos[0])["Y Values"] == "apple,pear"


def test_interrupt_mid_plot_leaves_the_cells_not_run_black(client):
    import threading
    import time
    out = {}

    def run():
        out["r"] = xyz(client, [1, "5,6,7", [], 0, "", [], 0, "", [], False, True],
                       steps=1000, force_task_id="task(xyz-interrupt)")

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline:  # until the first cell has taken a few steps
        p = client.get(f"{API}/progress?id_task=task(xyz-interrupt)").json()
        if p["state"]["job_count"] == 3 and p["state"]["sampling_step"] >= 5:
            break
        time.sleep(0.02)
    assert p["state"]["job_no"] == 0 and p["progress"] < 1 / 3  # progress over all 3 cells
    client.post(f"{API}/interrupt?id_task=task(xyz-interrupt)")
    t.join(60)
    r = out["r"]
    assert r.status_code == 200, r.text
    grid, *cells = [unb64(s).convert("RGB") for s in r.json()["images"]]
    assert len(cells) == 1 and grid.size == (192, 64)  # the partial first cell, no legend
    assert grid.crop((0, 0, 64, 64)).tobytes() == cells[0].tobytes()
    assert grid.crop((64, 0, 192, 64)).getextrema() == ((0, 0), (0, 0), (0, 0))  # not run
