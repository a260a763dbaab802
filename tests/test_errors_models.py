"""Bad model files give one SdloomError line (what, which file, what to do), never a traceback:
truncated or garbage files, wrong shapes, incomplete diffusers folders, unexpected keys, hostile
pickles, metadata that lies about sizes, non-finite weights, LoRAs for another model."""
import dataclasses
import json
import os
import shutil
import time

import pytest
import torch

from sdloom.families.keymaps.clip import clip_hf_to_openclip, clip_openclip_to_hf
from sdloom.families.keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
from sdloom.checkpoints.load import CONFIG_KEY, load_model, open_file, open_model_source
from sdloom.checkpoints.save import convert, save_model, save_safetensors
from sdloom.errors import ModelFileError, NotFoundError, SdloomError

from tiny import TINY_SD1, tiny_model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    return path


def tensors(path):
    src = open_file(path)
    return {k: src.get(k) for k in src.shapes}, src.metadata


def one_line(e: pytest.ExceptionInfo, tmp_path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) not in msg, msg  # no server folders leak
    return msg


def test_missing_truncated_and_garbage_files(tiny_file, tmp_path):
    with pytest.raises(NotFoundError, match="no such model file or folder: nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(ModelFileError) as e:
        load_model(cut)
    assert one_line(e, tmp_path).startswith("cannot read checkpoint cut.safetensors: ")
    assert "download or export it again" in str(e.value)
    for name, data in [("junk.ckpt", os.urandom(3000)), ("junk.pt", b"PK\x03\x04broken zip")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelFileError) as e:
            load_model(tmp_path / name)
        assert one_line(e, tmp_path).startswith(f"cannot read checkpoint {name}: ")
    (tmp_path / "list.ckpt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(ModelFileError, match="list.ckpt: holds a list, not a state dict"):
        load_model(tmp_path / "list.ckpt")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="m.onnx: unknown checkpoint format"):
        load_model(tmp_path / "m.onnx")


def test_wrong_shapes_are_listed(tiny_file, tmp_path):
    sd, meta = tensors(tiny_file)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(sd, bad, meta)
    with pytest.raises(ModelFileError, match=r"1 wrong shape: model.diffusion_model.out.2.bias"):
        load_model(bad)
    # without metadata, detection reads the shapes: a U-Net width that no level fits
    sd, _ = tensors(tiny_file)
    sd["model.diffusion_model.time_embed.0.weight"] = torch.zeros(128, 7, 7)
    save_safetensors(sd, bad)
    with pytest.raises(ModelFileError) as e:
        load_model(bad)
    assert "bad.safetensors: not a Stable Diffusion U-Net: tensor " \
           "'model.diffusion_model.time_embed.0.weight' has shape [128, 7, 7]" in one_line(e, tmp_path)


@pytest.fixture(scope="module")
def folder(tiny_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "tinyfolder"
    convert(tiny_file, out)
    return out


def test_diffusers_folder_missing_component_or_extra_key(folder, tmp_path):
    for comp, want in [("vae", "diffusers folder incomplete: missing b/vae/config.json"),
                       ("text_encoder", "diffusers folder b has no text_encoder/")]:
        broken = tmp_path / "b"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / comp)
        with pytest.raises(ModelFileError) as e:
            load_model(broken)
        assert one_line(e, tmp_path) == want
        shutil.rmtree(broken)
    broken = tmp_path / "b"
    shutil.copytree(folder, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFileError, match=r"diffusers folder b: unet/ has no weights"):
        load_model(broken)
    # a weight file with a key that fits no block of the config
    shutil.rmtree(broken)
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file
    w = next((broken / "unet").glob("*.safetensors"))
    sd = load_file(str(w))
    sd["down_blocks.0.bogus.weight"] = torch.zeros(1)
    save_safetensors(sd, w)
    with pytest.raises(ModelFileError) as e:
        load_model(broken)
    assert one_line(e, tmp_path).startswith(
        "diffusers folder b/unet: unexpected U-Net key 'down_blocks.0.bogus.weight'")
    # a config.json that lies about the block count is refused before any key map is built
    cfgp = broken / "unet" / "config.json"
    uc = json.loads(cfgp.read_text())
    cfgp.write_text(json.dumps({**uc, "layers_per_block": 100000}))
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match="layers_per_block says 100000, the weights have 1"):
        load_model(broken)
    assert time.perf_counter() - t0 < 2
    cfgp.write_text(json.dumps({k: v for k, v in uc.items() if k != "in_channels"}))
    with pytest.raises(ModelFileError, match=r"config.json lacks or mistypes a field "
                                             r"\(KeyError: 'in_channels'\)"):
        load_model(broken)


def test_key_maps_raise_model_file_errors():
    cfg = TINY_SD1.unet
    with pytest.raises(ModelFileError, match="unexpected U-Net key 'foo.weight'"):
        unet_diffusers_to_ldm({"foo.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ModelFileError, match="unexpected U-Net resnet parameter"):
        unet_diffusers_to_ldm({"down_blocks.0.resnets.0.bogus.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ModelFileError, match="unexpected CLIP text encoder key 'x.y'"):
        clip_hf_to_openclip({"x.y": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="layer 0 lacks self_attn.k_proj.weight"):
        clip_hf_to_openclip({f"text_model.encoder.layers.0.self_attn.{p}_proj.{k}": torch.zeros(1)
                             for p in "qv" for k in ("weight", "bias")})
    with pytest.raises(ModelFileError, match="unexpected open_clip text encoder key 'zz'"):
        clip_openclip_to_hf({"zz": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="attention_head_dim"):
        unet_config_from_diffusers({"down_block_types": ["CrossAttnDownBlock2D"] * 2,
                                    "block_out_channels": [64, 128], "attention_head_dim": [1, 1],
                                    "in_channels": 4, "out_channels": 4,
                                    "cross_attention_dim": 64})


# ------------------------------------------------------------------ hostile pickles

class Exec:
    """A pickle payload that writes a file if anything ever unpickles it with code."""
    target = ""

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_code_is_refused_naming_the_global(tmp_path, zip_format):
    flag = tmp_path / "pwned"
    payload = Exec()
    payload.target = str(flag)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": payload}, f,
                   _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelFileError) as e:
        load_model(path)
    msg = one_line(e, tmp_path)
    assert not flag.exists()
    assert msg.startswith("evil.ckpt: refused to load: its pickle asks for `builtins.exec`")
    assert "sdloom never runs code from a checkpoint" in msg and "may be malicious" in msg
    assert "weights_only=False" not in msg


def test_pickle_with_a_foreign_class_explains_a_safe_conversion(tmp_path):
    import argparse
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelFileError) as e:
        load_model(path)
    msg = one_line(e, tmp_path)
    assert "`argparse.Namespace`" in msg and "never runs code" in msg
    assert "weights_only=False" not in msg
    # the advice is a working one-liner that allows exactly that name
    cmd = msg[msg.index("python -c ") + len("python -c "):]
    assert "import_module('argparse'), 'Namespace'" in cmd and "save_file" in cmd
    import subprocess
    import sys
    code = cmd.strip('"')
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    sd, _ = tensors(tmp_path / "old.safetensors")
    assert torch.equal(sd["w"], torch.ones(2))


# ------------------------------------------------------------------ metadata that lies

def test_metadata_claiming_huge_sizes_is_refused_in_milliseconds(tmp_path):
    te = dataclasses.replace(TINY_SD1.text_encoders[0], vocab_size=16, width=8, max_positions=4,
                             layers=200_000, heads=1)
    cfg = TINY_SD1.replace(text_encoders=(te,))
    p = "cond_stage_model.transformer.text_model."
    sd = {p + "embeddings.token_embedding.weight": torch.zeros(16, 8, dtype=torch.float16),
          p + "embeddings.position_embedding.weight": torch.zeros(4, 8, dtype=torch.float16),
          p + "encoder.layers.0.mlp.fc1.weight": torch.zeros(32, 8, dtype=torch.float16)}
    path = tmp_path / "hostile.safetensors"
    save_safetensors(sd, path, {CONFIG_KEY: cfg.to_json()})
    assert path.stat().st_size < 4096  # a couple of KB
    for run in (lambda: load_model(path), lambda: open_model_source(path)):
        t0 = time.perf_counter()
        with pytest.raises(ModelFileError) as e:
            run()
        assert time.perf_counter() - t0 < 0.5
        msg = one_line(e, tmp_path)
        assert msg.startswith("hostile.safetensors: the config in its metadata does not match")
        assert "text_encoders[0].layers is 200000 in the metadata, 1 in the tensors" in msg


def test_metadata_lies_on_a_complete_model_name_the_field(tiny_file, tmp_path, capsys):
    sd, meta = tensors(tiny_file)
    base = json.loads(meta[CONFIG_KEY])
    cases = [(("text_encoders", 0, "layers"), 200_000,
              "text_encoders[0].layers is 200000 in the metadata, 2 in the tensors"),
             (("unet", "channel_mult"), [1, 2, 4, 8, 16, 32],
              "unet.channel_mult is (1, 2, 4, 8, 16, 32) in the metadata, (1, 2) in the tensors"),
             (("unet", "num_groups"), 7, "unet.num_groups = 7 does not divide the widths"),
             (("text_encoders", 0, "heads"), 10**9, "text_encoders[0].heads = 1000000000"),
             (("prediction",), "x" * 10_000, "prediction = 'xxxxx"),
             (("vae",), "nonsense", "unreadable sdloom_config metadata")]
    from sdloom.cli import main
    for where, value, want in cases:
        c = json.loads(json.dumps(base))
        node = c
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value
        path = tmp_path / "lie.safetensors"
        save_safetensors(sd, path, {CONFIG_KEY: json.dumps(c)})
        t0 = time.perf_counter()
        with pytest.raises(ModelFileError) as e:
            load_model(path)
        assert want in one_line(e, tmp_path) and len(str(e.value)) < 600
        # `sdloom info` reads the same config: bounded too, one line
        assert main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1
        assert time.perf_counter() - t0 < 3


def test_non_finite_weights_warn_once_naming_the_first_key(tiny_file, tmp_path, capsys):
    sd, meta = tensors(tiny_file)
    sd["model.diffusion_model.out.2.bias"] = torch.tensor([0.0, float("nan"), 0, 0])
    sd["first_stage_model.post_quant_conv.bias"] = torch.full((4,), float("inf"))
    path = tmp_path / "nan.safetensors"
    save_safetensors(sd, path, meta)
    capsys.readouterr()
    m = load_model(path).model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdloom: warning: nan.safetensors: ")
    assert "2 tensor(s) hold NaN or inf" in err and "first: model.diffusion_model.out.2.bias" in err
    assert m.unet.out[2].bias.isnan().any()  # loaded as it is: a warning, not a refusal
    load_model(tiny_file)
    assert capsys.readouterr().err == ""
    # finite fp32 values that overflow fp16 are reported too
    sd, meta = tensors(tiny_file)
    sd["model.diffusion_model.out.2.bias"] = torch.tensor([1e6, 0, 0, 0])
    save_safetensors(sd, path, meta)
    load_model(path, dtype=torch.float16)
    assert "1 tensor(s) hold NaN or inf values in float16" in capsys.readouterr().err


def test_lora_that_does_not_fit_changes_nothing(tmp_path):
    from sdloom.families.sd_lora import lora_targets
    from sdloom.models.lora import LoraManager, read_lora
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "lora_unet_input_blocks_1_1_proj_in"  # conv 1x1, 32 → 32
    good = {f"{name}.lora_down.weight": torch.ones(2, 32, 1, 1),
            f"{name}.lora_up.weight": torch.ones(32, 2, 1, 1)}
    bad = {**good, "lora_unet_out_2.lora_down.weight": torch.ones(2, 7, 3, 3),
           "lora_unet_out_2.lora_up.weight": torch.ones(4, 2, 1, 1)}
    save_safetensors(bad, tmp_path / "bad.safetensors")
    mgr = LoraManager(model, lambda: lora_targets(model))
    with pytest.raises(ModelFileError, match=r"LoRA 'bad' does not fit this model: "
                                             r"lora_unet_out_2 has down \[2, 7, 3, 3\]"):
        mgr.apply(read_lora(tmp_path / "bad.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_safetensors(good, tmp_path / "good.safetensors")
    assert mgr.apply(read_lora(tmp_path / "good.safetensors")) == 1
    w = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.allclose(model.state_dict()[w], before[w] + 2)
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "none.safetensors")
    with pytest.raises(ModelFileError, match="none.safetensors: no LoRA tensors"):
        read_lora(tmp_path / "none.safetensors")


def test_clip_skip_deeper_than_the_encoder_is_a_user_error():
    te = tiny_model().cond_stage_model
    ids = torch.full((1, 77), 49407)
    te(ids, clip_skip=3)  # 2 layers: hidden states 0..2 exist
    with pytest.raises(SdloomError, match=r"clip skip 4 is deeper .* 2 layers: use 1..3"):
        te(ids, clip_skip=4)
