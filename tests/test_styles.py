"""Prompt styles as A1111's styles.csv: parsing, the merge rules, and `styles` in requests."""
import base64
import io
import json

import pytest
from PIL import Image

from fastapi.testclient import TestClient

from sdloom.checkpoints.save import save_model
from sdloom.errors import SdloomError
from sdloom.infotext import parse_infotext
from sdloom.server.app import Server, create_app
from sdloom.styles import StyleDB, merge_prompt, read_styles

from tiny import TINY_SD1, tiny_model

API = "/sdapi/v1"

CSV = ('\ufeffname,prompt,negative_prompt\n'
       '"Cinematic","cinematic still of {prompt}, film grain","cartoon, ""drawing"""\n'
       'Sharp,"sharp focus, 8k",blurry\n'
       '"Multi\nline",  "first\nsecond",\n'
       '# comment,ignored,ignored\n'
       ',no name,x\n'
       'Sharp,"sharper",\n')  # a later row of the same name replaces the earlier one


def write(tmp_path, text, name="styles.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def test_merge_rule_is_a1111s():
    assert merge_prompt("art of {prompt}, detailed", " a cat ") == "art of  a cat , detailed"
    assert merge_prompt("detailed", " a cat ") == "a cat, detailed"  # stripped, ", "
    assert merge_prompt("detailed", "") == "detailed"  # no leading separator
    assert merge_prompt("", " a cat ") == "a cat"  # an empty style strips, adds nothing
    assert merge_prompt("{prompt}", "") == ""
    assert merge_prompt("{prompt} and {prompt}", "x") == "x and x"


def test_csv_with_bom_quotes_newlines_comments_and_duplicates(tmp_path):
    styles = read_styles(write(tmp_path, CSV))
    assert [s.name for s in styles] == ["Cinematic", "Sharp", "Multi\nline", "Sharp"]
    assert styles[0].negative_prompt == 'cartoon, "drawing"'  # doubled quotes, comma kept
    assert styles[2].prompt == "first\nsecond" and styles[2].negative_prompt == ""
    db = StyleDB.load(write(tmp_path, CSV))
    assert [s["name"] for s in db.list()] == ["Cinematic", "Sharp", "Multi\nline"]
    assert db.styles["Sharp"].prompt == "sharper"
    # applied in order, prompt and negative alike
    p, n = db.apply("a cat", "ugly", ["Cinematic", "Sharp"])
    assert p == "cinematic still of a cat, film grain, sharper"
    assert n == 'ugly, cartoon, "drawing"'  # no {prompt}: appended after the user's text
    assert db.apply("a cat", "ugly", ["Sharp", "Cinematic"])[0] == \
        "cinematic still of a cat, sharper, film grain"
    # A1111's old two-column layout (name, text), spaces after commas in the header
    old = read_styles(write(tmp_path, "name, text\nOld, old style\n", "old.csv"))
    assert [(s.name, s.prompt, s.negative_prompt) for s in old] == [("Old", "old style", "")]
    assert read_styles(write(tmp_path, "", "empty.csv")) == []


@pytest.mark.parametrize("content,why", [
    (b"title,body\nx,y\n", "header must name"),
    (b"name,prompt\n\"open quote,x\n", "line 2: unexpected end"),
    (b"name,prompt\na,b\n\"x\"y,z\nc,d\n", "line 3"),
    (b"name,prompt\n\xff\xfe\x00bad\n", "not UTF-8"),
    (b"name,prompt\nx,\x00y\n", "NUL"),
])
def test_a_broken_file_is_one_clear_error_before_the_model_loads(tmp_path, content, why):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    with pytest.raises(SdloomError, match=why) as e:
        read_styles(p)
    assert "bad.csv" in str(e.value) and "\n" not in str(e.value)

    def loader(*a, **k):
        raise AssertionError("the model must not load when the styles file is broken")
    with pytest.raises(SdloomError, match=why):
        Server(None, styles_file=str(p), loader=loader)
    with pytest.raises(SdloomError, match="not found"):
        Server(None, styles_file=str(tmp_path / "missing.csv"), loader=loader)


def test_serve_takes_styles_files():
    from sdloom.cli import build_parser
    assert build_parser().parse_args(["serve"]).styles_file == []
    a = build_parser().parse_args(["serve", "--styles-file", "a.csv", "--styles-file", "b.csv"])
    assert a.styles_file == ["a.csv", "b.csv"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("styles")
    save_model(tiny_model(), TINY_SD1, d / "tiny.safetensors")
    csv_path = d / "styles.csv"
    csv_path.write_bytes(CSV.encode("utf-8"))
    return Server(str(d / "tiny.safetensors"), device="cpu", precision="fp32",
                  styles_file=str(csv_path))


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server))


def pixels(r) -> bytes:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert(
        "RGB").tobytes()


BASE = {"seed": 7, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def test_prompt_styles_route(client):
    r = client.get(f"{API}/prompt-styles")
    assert r.status_code == 200
    assert r.json()[0] == {"name": "Cinematic", "prompt": "cinematic still of {prompt}, film grain",
                           "negative_prompt": 'cartoon, "drawing"'}
    assert [s["name"] for s in r.json()] == ["Cinematic", "Sharp", "Multi\nline"]


def test_styles_give_the_image_of_the_merged_prompt(client):
    styled = client.post(f"{API}/txt2img", json={**BASE, "prompt": "a cat",
                                                 "negative_prompt": "ugly",
                                                 "styles": ["Cinematic", "Sharp"]})
    merged = "cinematic still of a cat, film grain, sharper"
    neg = 'ugly, cartoon, "drawing"'
    direct = client.post(f"{API}/txt2img", json={**BASE, "prompt": merged,
                                                 "negative_prompt": neg})
    plain = client.post(f"{API}/txt2img", json={**BASE, "prompt": "a cat",
                                                "negative_prompt": "ugly"})
    assert pixels(styled) == pixels(direct) != pixels(plain)
    info = json.loads(styled.json()["info"])
    assert info["styles"] == ["Cinematic", "Sharp"]  # A1111's Processed.js "styles"
    assert info["prompt"] == merged and info["all_prompts"] == [merged]
    assert info["negative_prompt"] == neg
    text = info["infotexts"][0]
    assert text.startswith(merged + "\nNegative prompt: " + neg + "\n")  # infotext: merged
    assert parse_infotext(text)["Seed"] == "7"
    assert styled.json()["parameters"]["prompt"] == "a cat"  # the request, as sent
    assert styled.json()["parameters"]["styles"] == ["Cinematic", "Sharp"]
    assert json.loads(plain.json()["info"])["styles"] == []


def test_styles_reach_img2img_and_hires_prompts(client):
    init = Image.new("RGB", (64, 64), (90, 20, 200))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    b = base64.b64encode(buf.getvalue()).decode()
    body = {**BASE, "init_images": [b], "denoising_strength": 0.7}
    styled = client.post(f"{API}/img2img", json={**body, "prompt": "x", "styles": ["Sharp"]})
    direct = client.post(f"{API}/img2img", json={**body, "prompt": "x, sharper"})
    assert pixels(styled) == pixels(direct)
    assert json.loads(styled.json()["info"])["styles"] == ["Sharp"]
    r = client.post(f"{API}/txt2img", json={**BASE, "prompt": "x", "enable_hr": True,
                                            "hr_scale": 1.25, "hr_prompt": "y",
                                            "styles": ["Sharp"]})
    assert r.status_code == 200, r.text
    info = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert info["Hires prompt"] == "y, sharper"  # A1111 styles the hires prompt too


def test_unknown_styles_are_ignored_as_a1111(client):
    # A1111 (StyleDatabase.apply_styles_to_prompt) merges an unknown name as an empty style:
    # no error, the prompt only stripped; the name still appears in info["styles"]
    r = client.post(f"{API}/txt2img", json={**BASE, "prompt": "  a cat ",
                                            "styles": ["Nope", "Sharp"]})
    direct = client.post(f"{API}/txt2img", json={**BASE, "prompt": "a cat, sharper"})
    assert pixels(r) == pixels(direct)
    assert json.loads(r.json()["info"])["styles"] == ["Nope", "Sharp"]
