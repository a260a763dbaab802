"""`--precision auto`: bf16 on a CPU with native bf16 (AMX-BF16 / AVX512-BF16), fp32 on one
without, fp16 on CUDA/MPS; and the embedded model's bf16 images stay close to its fp32 ones."""
import numpy as np
import pytest
import torch

from sdloom.errors import SdloomError
from sdloom.pipelines import engine as engine_mod
from sdloom.pipelines.engine import Engine, cpu_has_native_bf16, pick_dtype
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams

CPU = torch.device("cpu")


def _caps(**flags):
    base = {"avx2": True, "avx512_f": True, "amx_bf16": False, "avx512_bf16": False}
    return lambda: {**base, **flags}


@pytest.mark.parametrize("flags, native", [({}, False), ({"avx512_bf16": True}, True),
                                           ({"amx_bf16": True}, True)])
def test_native_bf16_from_torch_capabilities(monkeypatch, flags, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", _caps(**flags))
    assert cpu_has_native_bf16() is native


@pytest.mark.parametrize("text, native", [("flags : fpu avx2 avx512f\n", False),
                                          ("flags : fpu avx2 avx512f avx512_bf16\n", True),
                                          ("flags : fpu amx_bf16 amx_tile\n", True)])
def test_native_bf16_from_proc_cpuinfo_when_torch_cannot_say(monkeypatch, text, native):
    monkeypatch.delattr(torch.cpu, "get_capabilities")

    class FakePath:
        def __init__(self, p):
            assert p == "/proc/cpuinfo"

        def read_text(self):
            return text
    monkeypatch.setattr(engine_mod, "Path", FakePath)
    assert cpu_has_native_bf16() is native


def test_pick_dtype_rule(monkeypatch):
    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", CPU) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("auto", torch.device("mps")) == torch.float16
    assert pick_dtype("fp32", CPU) == torch.float32  # an explicit choice always wins
    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("auto", CPU) == torch.float32
    assert pick_dtype("bf16", CPU) == torch.bfloat16
    assert pick_dtype("fp16", CPU) == torch.float16
    with pytest.raises(SdloomError, match="precision must be one of"):
        pick_dtype("fp8", CPU)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


@pytest.fixture(scope="module")
def images():
    """The embedded model at its defaults (128², 20 steps DPM++ 2M): fp32 and auto-with-bf16."""
    def img(eng, seed):
        p = GenerationParams(prompt="a red apple", seed=seed, steps=20)
        return np.asarray(generate(eng, p).images[0], dtype=np.float64)
    mp = pytest.MonkeyPatch()
    mp.setattr(engine_mod, "cpu_has_native_bf16", lambda: True)
    try:
        bf16 = Engine.load(None, device="cpu", precision="auto")
    finally:
        mp.undo()
    fp32 = Engine.load(None, device="cpu", precision="fp32")
    fp16 = Engine.load(None, device="cpu", precision="fp16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.vae.parameters()).dtype == torch.bfloat16
    return {"fp32": img(fp32, 1), "bf16": img(bf16, 1), "fp16": img(fp16, 1),
            "fp32_seed2": img(fp32, 2)}


def test_bf16_image_close_to_fp32(images):
    a, b = images["fp32"], images["bf16"]
    # measured 47.6 dB (max 23, mean 0.49 of 255) on this seed; 36-48 dB over three prompts
    assert _psnr(a, b) >= 35
    assert np.abs(a - b).mean() < 2.0
    # it really ran in bf16: its rounding shows, and it is not the fp16 run either
    assert np.abs(a - b).max() > 0
    assert np.abs(b - images["fp16"]).max() > 0
    # the bound separates: another seed of the same prompt (white emoji background) measured
    # 24.7 dB
    assert _psnr(a, images["fp32_seed2"]) < 30
