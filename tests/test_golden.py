"""The embedded model: a fixed prompt and seed reproduce the committed reference image, and
`sdloom generate` works with no --model, offline.

The golden image guards regressions: it is this code's own earlier output, not an independent
reference, so it proves that a change kept the images, not that they are right."""
from pathlib import Path

import numpy as np
from PIL import Image

from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams

GOLDEN = Path(__file__).parent / "golden" / "red-apple-seed1.png"



def test_golden_image():
    eng = Engine.load(None, device="cpu", precision="fp32")
    img = generate(eng, GenerationParams(prompt="a red apple", seed=1, steps=20)).images[0]
    assert img.size == (128, 128)
    got = np.asarray(img, dtype=np.float64) / 255
    want = np.asarray(Image.open(GOLDEN).convert("RGB"), dtype=np.float64) / 255
    mse = ((got - want) ** 2).mean()
    # the same weights, seed and sampler: only CPU kernel differences may remain
    assert mse < 1e-4, mse
    other = generate(eng, GenerationParams(prompt="a red apple", seed=2, steps=20)).images[0]
    assert ((np.asarray(other, dtype=np.float64) / 255 - want) ** 2).mean() > 10 * max(mse, 1e-5)


def test_cli_generate_default_model(tmp_path):
    from sdloom.cli import main
    out = tmp_path / "apple.png"
    assert main(["generate", "a red apple", "--seed", "1", "--steps", "4", "-o", str(out),
                 "-q"]) == 0
    assert Image.open(out).size == (128, 128)
