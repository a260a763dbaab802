"""Memory modes (pipelines/offload.py): same images, weights back home, LoRA merged at home.

On a CPU the "GPU" is the CPU itself, so these check the wiring (hooks, residency, argument
moves, LoRA); the CUDA tests, run on a GPU, check that the weights really leave the GPU."""
import dataclasses

import numpy as np
import pytest
import torch

from sdloom.errors import SdloomError
from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate
from sdloom.pipelines.offload import Offload
from sdloom.pipelines.params import GenerationParams
from tiny import tiny_model

def live_model():
    """tiny_model with its zero-initialised layers (U-Net output conv, proj_out) made random,
    so that every weight reaches the image."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


P = GenerationParams(prompt="a red apple", steps=3, seed=1, width=64, height=64)


def _pixels(engine: Engine, p: GenerationParams = P) -> np.ndarray:
    return np.asarray(generate(engine, p).images[0], dtype=np.int16)


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_same_image_and_residency(mode):
    ref = _pixels(Engine(tiny_model()))
    eng = Engine(tiny_model(), offload=mode, offload_device="cpu")
    assert not isinstance(eng.denoiser.model, torch.nn.Module) or not eng.cuda_graphs
    assert np.array_equal(_pixels(eng), ref)
    resident = [u.resident for u in eng._offload.units]
    if mode == "model":  # one component stays on the device: the last one used (the VAE)
        assert resident.count(True) == 1 and len(resident) == 3
    else:  # every block leaves after it ran
        assert not any(resident) and len(resident) > 3


def test_blocks_are_bounded_subtrees():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    off = Offload(model, torch.device("cpu"), "blocks", block_params=total // 10)
    sizes = [sum(t.numel() for _, _, t in u.home) for u in off.units]
    covered = sum(sizes)
    assert max(sizes) <= total // 10 or len(sizes) > 10
    assert covered == sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def test_lora_merges_into_the_cpu_home(tmp_path):
    """A LoRA applied while offloaded must reach the weights that later visit the device."""
    from safetensors.torch import save_file

    from sdloom.families.sd_lora import lora_targets
    model = live_model()
    targets = lora_targets(model)
    name, t = next((n, t) for n, t in targets.items() if n == "lora_unet_time_embed_0")
    w = dict(model.named_parameters())[t.param]
    g = torch.Generator().manual_seed(0)
    down = torch.randn(4, w.shape[1], generator=g)
    up = torch.randn(w.shape[0], 4, generator=g)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "l.safetensors"))
    with_lora = dataclasses.replace(P, loras=[(str(tmp_path / "l.safetensors"), 1.0)])
    eng = Engine(model, offload="model", offload_device="cpu")
    plain = _pixels(eng)  # leaves the VAE resident, the U-Net in CPU memory
    out = _pixels(eng, with_lora)
    assert np.array_equal(out, _pixels(Engine(live_model()), with_lora))
    assert not np.array_equal(out, plain)
    assert np.array_equal(_pixels(eng), plain)  # and unmerged again


def test_unknown_mode_and_compile_are_refused():
    with pytest.raises(SdloomError, match="offload must be one of"):
        Engine(tiny_model(), offload="everything")
    with pytest.raises(SdloomError, match="cannot be combined"):
        Engine(tiny_model(), offload="model", offload_device="cpu", compile=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_cuda_weights_leave_the_gpu(mode):
    ref = _pixels(Engine(tiny_model().cuda(), cuda_graphs=False))
    torch.cuda.synchronize()
    eng = Engine(tiny_model(), offload=mode, offload_device="cuda")
    out = _pixels(eng)
    assert np.abs(out - ref).max() <= 1  # same kernels; at most rounding of the last step
    on_gpu = [u for u in eng._offload.units if u.resident]
    assert len(on_gpu) == (1 if mode == "model" else 0)
    assert all(t.device.type == "cpu" for u in eng._offload.units if not u.resident
               for _, _, t in u.home)
    assert all(p.device.type == "cpu" for p in eng.model.model.parameters())
