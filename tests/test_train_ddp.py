"""A 2-process gloo `torchrun` run of `python -m sdloom.training.train`: it completes, both
ranks end with identical weights, and the saved model holds exactly those weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sdloom.checkpoints.load import load_model
from sdloom.checkpoints.save import save_model
from sdloom.training.distributed import checksum
from sdloom.training.state import find_state

from test_training import make_shapes
from tiny import TINY_SD1, tiny_model


def torchrun_train(data: Path, out: Path, *args: str) -> None:
    """`python -m sdloom.training.train` under torchrun, 2 CPU processes (gloo), one thread
    each, logging every step; fails the test with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sdloom.training.train", "--data", str(data), "--output", str(out), *args,
           "--device", "cpu", "--no-progress", "--set", "log_every=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]


def test_torchrun_two_processes_gloo(tmp_path):
    data = make_shapes(tmp_path / "data")
    init = tmp_path / "init.safetensors"
    save_model(tiny_model(), TINY_SD1, init)
    out = tmp_path / "out"
    torchrun_train(data, out, "--model", str(init), "--what", "full", "--resolution", "32",
                   "--batch-size", "2", "--grad-accum", "2", "--steps", "4", "--warmup", "1",
                   "--lr", "1e-3", "--flip")
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    # the saved file is rank 0's final weights: U-Net and text encoder trained, VAE frozen
    saved, before = load_model(out / "model.safetensors").model, load_model(init).model
    for m in (saved, before):
        m.requires_grad_(False)
        m.unet.requires_grad_(True)
        m.text_encoders[0].requires_grad_(True)
    assert checksum(saved) == sums[0]
    assert checksum(before) != sums[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes
    st = torch.load(find_state(out) / "trainer.pt", weights_only=True)
    assert st["world"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["data"], st["rng"][1]["data"])  # own noise per rank


def test_torchrun_two_processes_gloo_esrgan(tmp_path):
    """what=esrgan under torchrun: both ranks train on their own batches and crops, end with
    the same weights (sr_train checks it), and rank 0 saves them."""
    from safetensors.torch import load_file, save_file
    from sdloom.models import esrgan
    data = make_shapes(tmp_path / "data")
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_file(esrgan.build(esrgan.CompactConfig(nf=8, num_conv=1)).state_dict(), str(init))
    out = tmp_path / "out"
    torchrun_train(data, out, "--model", str(init), "--what", "esrgan", "--resolution", "32",
                   "--x4-crop", "16", "--batch-size", "2", "--grad-accum", "2", "--steps", "3",
                   "--warmup", "0")
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(init))
    assert saved.keys() == before.keys()
    assert not torch.equal(saved["body.0.weight"], before["body.0.weight"])
    st = torch.load(find_state(out) / "trainer.pt", weights_only=True)
    assert st["world"] == 2 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["data"], st["rng"][1]["data"])  # own blur per rank
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_torchrun_two_processes_gloo_words(tmp_path):
    """what=words under torchrun: each rank draws its own prompts, the rows' gradients are
    all-reduced, both ranks end alike (words_train checks it) and rank 0 saves a model whose
    only change is the new words' rows."""
    from safetensors.torch import load_file
    from test_words_train import TABLE, make_words_set, new_word_ids
    data = make_words_set(tmp_path / "data")
    init = tmp_path / "init.safetensors"
    save_model(tiny_model(), TINY_SD1, init)
    out = tmp_path / "out"
    torchrun_train(data, out, "--model", str(init), "--what", "words", "--batch-size", "3",
                   "--grad-accum", "2", "--steps", "3", "--warmup", "0", "--lr", "0.05",
                   "--save-dtype", "fp32", "--caption-templates", "{}", "a {}", "{} emoji")
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(init))
    assert [k for k in before if not torch.equal(before[k], saved[k])] == [TABLE]
    changed = (before[TABLE] != saved[TABLE]).any(1).nonzero().flatten().tolist()
    assert set(changed) == new_word_ids()
    st = torch.load(find_state(out) / "trainer.pt", weights_only=True)
    assert st["world"] == 2 and not torch.equal(st["rng"][0]["data"], st["rng"][1]["data"])
