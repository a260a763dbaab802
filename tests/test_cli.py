"""The command line: generate/img2img/inpaint/info/convert/pnginfo, and one-line errors."""
import pytest
from PIL import Image

from sdloom.checkpoints.save import save_model
from sdloom.cli import _lora_arg, main

from tiny import TINY_SD1, tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, p)
    return p


def test_generate_writes_numbered_pngs_with_infotext(model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "9",
            "--output", str(out), "-q", "--batch-size", "2", "--grid"]
    assert main(args) == 0
    assert main(args) == 0  # a second run never overwrites the first
    names = sorted(p.name for p in out.iterdir())
    assert names[:4] == ["00000-9.png", "00001-10.png", "00002-9.png", "00003-10.png"]
    assert any(n.startswith("grid-") for n in names)
    capsys.readouterr()
    assert main(["pnginfo", str(out / "00001-10.png")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("a cat\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
                           "Seed: 10, Size: 64x64, Model hash: ")


def test_img2img_inpaint_info_convert(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 32))
    m.save(mask)
    assert main(["img2img", "x", "--model", str(model), "--init", str(init), "--steps", "2",
                 "--output", str(tmp_path / "a.png"), "-q"]) == 0
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert main(["inpaint", "x", "--model", str(model), "--init", str(init), "--mask", str(mask),
                 "--steps", "2", "--output", str(tmp_path / "b.png"), "-q"]) == 0
    assert Image.open(tmp_path / "b.png").getpixel((60, 60)) == (10, 200, 10)
    assert main(["inpaint", "x", "--model", str(model), "--init", str(init), "--outpaint",
                 "16,0,0,0", "--steps", "2", "--output", str(tmp_path / "c.png"), "-q"]) == 0
    assert Image.open(tmp_path / "c.png").size == (80, 64)
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    info = capsys.readouterr().out
    assert "family:      sd1" in info and "hash:" in info
    assert main(["convert", str(model), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "unet" / "config.json").exists()


@pytest.mark.parametrize("argv,msg", [
    (["generate", "x", "--width", "32"], "at least 64"),
    (["generate", "x", "--width", "99992"], "max_side"),
    (["generate", "x", "--width", "0"], "--width"),
    (["generate", "x", "--cfg", "nan"], "--cfg"),
    (["generate", "x", "--sampler", "Euler z"], "unknown sampler"),
    (["img2img", "x", "--init", "/nonexistent.png"], "cannot read image"),
    (["generate", "x", "--model", "/nonexistent.safetensors"], "no such model"),
    (["pnginfo", "/nonexistent.png"], "cannot read image"),
])
def test_bad_input_is_one_clear_line(model, argv, msg, capsys):
    if "--model" not in argv and argv[0] != "pnginfo":
        argv = argv + ["--model", str(model)]
    assert main(argv + (["-q"] if argv[0] != "pnginfo" else [])) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdloom: error:") and msg in err[0], err


def test_mask_of_another_size_and_corrupt_model(model, tmp_path, capsys):
    init = tmp_path / "i.png"
    Image.new("RGB", (64, 64)).save(init)
    mask = tmp_path / "m.png"
    Image.new("L", (32, 32)).save(mask)
    out = tmp_path / "o.png"  # resized to the image, as A1111 does
    assert main(["inpaint", "x", "--model", str(model), "--init", str(init), "--mask", str(mask),
                 "--steps", "2", "-o", str(out), "-q"]) == 0
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["info", str(bad)]) == 1
    assert capsys.readouterr().err.startswith("sdloom: error: cannot read checkpoint")


def test_lora_argument_parsing():
    assert _lora_arg("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert _lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert _lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


@pytest.mark.parametrize("w,h", [(136, 128), (200, 152)])
def test_any_multiple_of_8_from_the_command_line(model, tmp_path, w, h):
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(model), "--steps", "2", "--width", str(w),
                 "--height", str(h), "--output", str(out), "-q"]) == 0
    assert Image.open(out).size == (w, h)
    mask = tmp_path / "m.png"
    m = Image.new("RGBA", (w, h), (0, 0, 0, 0))  # transparent = keep: the alpha rule
    m.paste((255, 255, 255, 255), (8, 8, 40, 40))
    m.save(mask)
    got = tmp_path / "i.png"
    assert main(["inpaint", "x", "--model", str(model), "--init", str(out), "--mask", str(mask),
                 "--steps", "2", "--output", str(got), "-q"]) == 0
    assert Image.open(got).size == (w, h)
    assert Image.open(got).getpixel((w - 2, h - 2)) == Image.open(out).convert(
        "RGB").getpixel((w - 2, h - 2))
