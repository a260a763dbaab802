"""The web page in a real browser (Chromium through Playwright) against a live `sdloom serve`
on the embedded model: txt2img, a bad value's error, img2img, PNG info → txt2img, outputs
history across a reload, live preview and interrupt, the inpaint brush (drop, draw, erase →
the request's mask), send-to, the LoRA/embedding browser, hires/styles/clip skip in the
request, the X/Y/Z plot grid and the Extras tab (paste → upscale)."""
import base64
import io
import shutil
import socket
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdloom.checkpoints.save import save_model
from sdloom.infotext import encode_image
from sdloom.server.app import Server, create_app

from tiny import TINY_SD1, tiny_model

EMBEDDED_WIDTH = 96  # the embedded model's text encoder width (an embedding must match it)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


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
def served(tmp_path_factory):
    import uvicorn
    d = tmp_path_factory.mktemp("web")
    (d / "loras").mkdir()
    (d / "loras" / "mylora.safetensors").write_bytes(b"")  # listed by name, never loaded here
    (d / "emb").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(1, EMBEDDED_WIDTH, generator=g)},
              str(d / "emb" / "shiny.safetensors"))
    (d / "styles.csv").write_text("name,prompt,negative_prompt\nCrisp,\"{prompt}, crisp\",blurry\n")
    (d / "models").mkdir()
    save_model(tiny_model(), TINY_SD1, d / "models" / "tiny.safetensors")
    server = Server(None, device="cpu", precision="fp32", outdir=str(d / "outputs"),
                    models_dir=str(d / "models"),
                    lora_dir=str(d / "loras"), embeddings_dir=str(d / "emb"),
                    styles_file=str(d / "styles.csv"))
    app = create_app(server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=uv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", d / "outputs"
    uv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def page(chromium, served):
    sync_api, path = chromium
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(20_000)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        open_page(pg, served[0])
        yield pg
        browser.close()
        assert errors == []  # no uncaught script errors on the page


def open_page(pg, url):
    pg.goto(url)
    pg.wait_for_function("document.getElementById('sampler_name').options.length > 0 && "
                         "document.getElementById('upscaler_1').options.length > 0")


def fill(pg, **fields):
    for k, v in fields.items():
        pg.fill(f"#{k}", str(v))


def png_b64(img: Image.Image, text: str | None = None) -> str:
    return base64.b64encode(encode_image(img, "png", text)).decode()


def data_url_image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def drop_image(pg, selector: str, img: Image.Image) -> None:
    """A file dragged from the desktop and dropped on `selector`."""
    pg.evaluate("""([sel, b64]) => {
        const bin = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bin], "dropped.png", {type: "image/png"}));
        document.querySelector(sel).dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [selector, png_b64(img)])


def paste_image(pg, img: Image.Image) -> None:
    """An image pasted from the clipboard (Ctrl+V) anywhere on the page."""
    pg.evaluate("""(b64) => {
        const bin = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bin], "pasted.png", {type: "image/png"}));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true}));
    }""", png_b64(img))


def gallery_images(pg) -> list[Image.Image]:
    return [data_url_image(s) for s in pg.eval_on_selector_all("#gallery img",
                                                               "ims => ims.map(i => i.src)")]


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


def test_outputs_are_saved_and_the_history_survives_a_reload(page, served):
    url, outdir = served
    saved = sorted(p.name for p in (outdir / "txt2img-images").iterdir())
    assert saved == ["00000-5.png", "00001-6.png"]  # saved by default, A1111's names
    open_page(page, url)  # a reload: the page keeps nothing of its own
    assert page.query_selector_all("#gallery img") == []
    page.click("button[data-tab=history]")
    page.wait_for_function("document.querySelectorAll('#history-grid img').length == 2")
    assert page.inner_text("#history-page") == "1–2 of 2"
    names = page.eval_on_selector_all("#history-grid figcaption", "cs => cs.map(c => c.textContent)")
    assert names == ["txt2img-images/00001-6.png", "txt2img-images/00000-5.png"]  # newest first
    page.click("#history-grid figure:nth-child(2) img")
    info = page.inner_text("#history-info")
    assert info.startswith("a red apple") and "Seed: 5" in info
    # send-to from the history: the image's own infotext fills txt2img
    page.click(".sendto[data-from=history] button[data-to=txt2img]")
    page.wait_for_function("document.getElementById('prompt').value === 'a red apple'")
    assert page.input_value("#seed") == "5" and page.input_value("#steps") == "3"
    assert page.is_visible("#hires-row")


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
    fill(page, width="", height="", seed=7, steps=3)
    page.set_input_files("#init", str(init))
    page.wait_for_function("document.getElementById('init-preview').naturalWidth === 96")
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


def test_live_preview_then_interrupt_returns_the_partial_image(page):
    page.click("button[data-tab=txt2img]")
    # the embedded model has no latent → RGB preview factors: switch (in the page) to a tiny
    # SD1-shaped model, which has SD1's
    page.select_option("#model", "tiny.safetensors")
    page.wait_for_function("document.getElementById('status').textContent === "
                           "'model: tiny.safetensors'")
    # long enough to be seen running: 3 batches of 1000 steps (~10 ms each); a preview
    # every 10 steps (the server's default show_progress_every_n_steps)
    fill(page, prompt="a blue car", seed=3, width=64, height=64, steps=1000, n_iter=3,
         batch_size=1)
    page.click("#generate")
    page.wait_for_selector("#live:not([hidden])")
    preview = data_url_image(page.get_attribute("#live", "src"))
    assert preview.size == (8, 8)  # the cheap latent → RGB preview: one pixel per latent cell
    assert "batch 1/3" in page.inner_text("#status")
    page.click("#interrupt")
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=30_000)
    assert "1 image(s)" in page.inner_text("#status") and "(interrupted)" in page.inner_text("#status")
    assert [im.size for im in gallery_images(page)] == [(64, 64)]
    assert page.is_hidden("#live")
    fill(page, steps=3, n_iter=1)
    page.select_option("#model", index=0)  # back to the embedded model
    page.wait_for_function("document.getElementById('status').textContent.startsWith("
                           "'model: sdloom-emoji')")


def test_inpaint_mask_drawn_with_the_brush_is_the_requests_mask(page):
    page.click("button[data-tab=inpaint]")
    assert page.is_visible("#mask-canvas") and page.is_visible("#brush-row")
    drop_image(page, "#init-drop", Image.new("RGB", (64, 64), (200, 30, 30)))
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    fill(page, prompt="a green leaf", seed=9, steps=3, width="", height="")
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / 64  # the canvas is shown larger than the image

    def at(x, y):
        return box["x"] + x * scale, box["y"] + y * scale

    page.fill("#brush-size", "8")
    page.mouse.move(*at(8, 32))
    page.mouse.down()
    for x in range(8, 57, 4):  # a horizontal stroke across the middle
        page.mouse.move(*at(x, 32))
    page.mouse.up()
    page.check("#eraser")  # erase a vertical band through its middle
    page.mouse.move(*at(32, 20))
    page.mouse.down()
    page.mouse.move(*at(32, 44), steps=6)
    page.mouse.up()
    page.uncheck("#eraser")
    page.fill("#mask_blur", "2")
    page.select_option("#inpainting_fill", "2")
    page.select_option("#inpaint_full_res", "true")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/img2img")) as req:
        page.click("#generate")
    body = req.value.post_data_json
    mask = data_url_image(body["mask"]).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((16, 32)) == 255 and mask.getpixel((48, 32)) == 255  # painted
    assert mask.getpixel((32, 32)) == 0  # erased
    assert mask.getpixel((16, 8)) == 0 and mask.getpixel((48, 56)) == 0  # never painted
    assert (body["mask_blur"], body["inpainting_fill"], body["inpaint_full_res"]) == (2, 2, True)
    assert body["inpainting_mask_invert"] == 0 and len(body["init_images"]) == 1
    page.wait_for_function("document.querySelector('#gallery img')?.alt === 'seed 9'")
    assert [im.size for im in gallery_images(page)] == [(64, 64)]
    page.click("#mask-clear")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "draw the mask" in page.inner_text("#status")


def test_send_to_img2img_and_extras_from_the_gallery(page):
    page.click("button[data-tab=txt2img]")
    fill(page, prompt="a yellow star", seed=11, steps=2, width=64, height=64, batch_size=1)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#gallery img')?.alt === 'seed 11'")
    fill(page, prompt="something else", seed=-1, steps=20)
    page.click(".sendto[data-from=gallery] button[data-to=img2img]")
    page.wait_for_function("document.getElementById('init-preview').naturalWidth === 64 && "
                           "document.getElementById('prompt').value === 'a yellow star'")
    assert page.is_visible("#init-row") and page.is_hidden("#mask-canvas")
    assert page.input_value("#seed") == "11" and page.input_value("#steps") == "2"
    sent = data_url_image(page.get_attribute("#init-preview", "src"))
    assert sent.tobytes() == gallery_images(page)[0].tobytes()  # the very image, not a copy
    page.click(".sendto[data-from=gallery] button[data-to=extras]")
    page.wait_for_function("document.getElementById('extras-preview').naturalWidth === 64")
    assert page.is_visible("#extras")


def test_lora_and_embedding_browser_insert_into_the_prompt(page):
    page.click("button[data-tab=txt2img]")
    fill(page, prompt="a cat")
    page.click("#networks summary")
    page.click("#lora-list button[data-name=mylora]")
    assert page.input_value("#prompt") == "a cat <lora:mylora:1>"
    page.click("#embedding-list button[data-name=shiny]")
    assert page.input_value("#prompt") == "a cat <lora:mylora:1> shiny"


def test_hires_styles_vae_and_clip_skip_reach_the_request(page):
    page.click("button[data-tab=txt2img]")
    fill(page, prompt="a house", negative_prompt="", seed=2, steps=2, width=64, height=64, clip_skip=2,
         hr_second_pass_steps=1, hr_scale=2)
    page.select_option("#styles", "Crisp")
    page.check("#enable_hr")
    page.select_option("#hr_upscaler", "Lanczos")
    assert page.eval_on_selector_all("#sd_vae option", "os => os.map(o => o.value)")[:2] == \
        ["Automatic", "None"]
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as req:
        page.click("#generate")
    body = req.value.post_data_json
    assert body["styles"] == ["Crisp"] and body["enable_hr"] is True
    assert (body["hr_upscaler"], body["hr_second_pass_steps"], body["hr_scale"]) == \
        ("Lanczos", 1, 2)
    assert body["override_settings"] == {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2}
    page.wait_for_function("document.querySelector('#gallery img')?.alt === 'seed 2'")
    info = page.inner_text("#infotext")
    assert info.startswith("a house, crisp\nNegative prompt: blurry")  # the style applied
    assert "Clip skip: 2" in info and "Hires upscaler: Lanczos" in info
    assert [im.size for im in gallery_images(page)] == [(128, 128)]
    page.uncheck("#enable_hr")
    page.select_option("#styles", [])
    fill(page, clip_skip=1)


def test_xyz_plot_returns_a_labelled_grid_of_the_cells(page):
    page.click("button[data-tab=txt2img]")
    fill(page, prompt="a red apple", seed=4, steps=2, width=64, height=64, batch_size=1,
         n_iter=1)
    page.select_option("#script", "x/y/z plot")
    page.select_option("#x_type", "Seed")
    fill(page, x_values="4, 5, 6")
    page.select_option("#y_type", "Steps")
    fill(page, y_values="1-2")
    page.check("#include_lone_images")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 7")
    grid, *cells = gallery_images(page)
    pad_left = 64 * 3 // 4  # the row labels' band
    assert grid.width == pad_left + 3 * 64
    pad_top = grid.height - 2 * 64
    assert 8 < pad_top < 64  # one line of column labels
    for k, cell in enumerate(cells):  # x fastest: seeds 4, 5, 6 at 1 step, then at 2 steps
        x, y = pad_left + (k % 3) * 64, pad_top + (k // 3) * 64
        assert grid.crop((x, y, x + 64, y + 64)).tobytes() == cell.convert("RGB").tobytes()
    assert "X Type: Seed" in page.inner_text("#infotext")
    page.uncheck("#include_lone_images")
    page.select_option("#script", "")
    assert page.is_hidden("#xyz-row")


def test_extras_tab_upscales_a_pasted_image(page):
    page.click("button[data-tab=extras]")
    paste_image(page, Image.new("RGB", (48, 36), (10, 200, 90)))
    page.wait_for_function("document.getElementById('extras-preview').naturalWidth === 48")
    page.select_option("#upscaler_1", "Lanczos")
    fill(page, upscaling_resize=2)
    page.click("#extras-run")
    page.wait_for_selector("#extras-result:not([hidden])")
    # A1111 rounds an upscaler's target down to a multiple of 8: 96x72 → 96x72, 36·2 → 72
    page.wait_for_function("document.getElementById('extras-status').textContent === '96x72'")
    out = data_url_image(page.get_attribute("#extras-result", "src"))
    assert out.size == (96, 72) and out.convert("RGB").getpixel((48, 36)) == (10, 200, 90)
    assert "Postprocess upscaler: Lanczos" in page.inner_text("#extras-info")
    page.select_option("#extras_resize_mode", "1")
    fill(page, upscaling_resize_w=100, upscaling_resize_h=100)
    page.click("#extras-run")
    page.wait_for_function("document.getElementById('extras-status').textContent === '100x100'")
