"""The web page in a real browser (Chromium through Playwright) against a live `sdloom serve`
on a tiny random model: txt2img, a bad value's error, img2img, PNG info → txt2img."""
import shutil
import socket
import threading
import time

import pytest
from PIL import Image

from sdloom.checkpoints.save import save_model
from sdloom.infotext import encode_image
from sdloom.server.app import Server, create_app

from tiny import TINY_SD1, tiny_model


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, driven by the playwright package (no browser download). Missing
    either is a failure that says what to install, never a skip."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the web UI test needs the playwright package: run scripts/install.sh "
                    "--test (it installs requirements-test.txt)", pytrace=False)
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the web UI test needs Chromium: run `sudo apt-get install chromium` "
                    "(scripts/install.sh --test does it when run as root)", pytrace=False)
    return sync_api, path


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import uvicorn
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    app = create_app(Server(str(path), device="cpu", precision="fp32"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def page(chromium, url):
    sync_api, path = chromium
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path,
                                    args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url)
        pg.wait_for_function("document.getElementById('sampler_name').options.length > 0")
        yield pg
        browser.close()
        assert errors == []  # no uncaught script errors on the page


def fill(pg, **fields):
    for k, v in fields.items():
        pg.fill(f"#{k}", str(v))


def test_txt2img_in_the_browser(page):
    fill(page, prompt="a red apple", seed=5, width=64, height=64, steps=3, batch_size=2)
    page.select_option("#sampler_name", "Euler")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 2")
    info = page.inner_text("#infotext")
    assert "a red apple" in info and "Seed: 5" in info and "Size: 64x64" in info
    assert "Sampler: Euler" in info
    assert page.eval_on_selector("#gallery img", "im => im.naturalWidth") == 64
    page.click("#gallery a:nth-child(2) img")
    assert "Seed: 6" in page.inner_text("#infotext")
    page.click("#reuse-seed")
    assert page.input_value("#seed") == "6"
    assert "2 image(s)" in page.inner_text("#status")


def test_a_bad_value_shows_the_servers_error(page):
    fill(page, width=32)  # (sizes that are not multiples of 8 are rounded, as A1111)
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "width must be at least 64 pixels, got 32" in page.inner_text("#status")
    fill(page, width=64)


def test_img2img_and_png_info(page, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (20, 120, 200)).save(init)
    page.click("button[data-tab=img2img]")
    fill(page, width="", height="", seed=7)
    page.set_input_files("#init", str(init))
    page.click("#generate")
    page.wait_for_function("document.querySelector('#gallery img')?.alt === 'seed 7'")
    assert page.eval_on_selector("#gallery img", "im => [im.naturalWidth, im.naturalHeight]") \
        == [96, 64]
    text = "a cat\nNegative prompt: dog\nSteps: 9, Sampler: Euler a, Seed: 42, Size: 72x80"
    png = tmp_path / "info.png"
    png.write_bytes(encode_image(Image.new("RGB", (8, 8)), "png", text))
    page.click("button[data-tab=pnginfo]")
    page.set_input_files("#png", str(png))
    page.wait_for_function("!document.getElementById('png-send').disabled")
    assert page.inner_text("#png-text") == text
    page.click("#png-send")
    assert page.input_value("#prompt") == "a cat" and page.input_value("#steps") == "9"
    assert page.input_value("#negative_prompt") == "dog" and page.input_value("#seed") == "42"
    assert page.input_value("#sampler_name") == "Euler a"
    assert page.input_value("#width") == "72" and page.input_value("#height") == "80"
    assert page.is_visible("#hires-row")  # back on txt2img
