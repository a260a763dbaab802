"""`sdloom convert`: a diffusers folder we write loads in diffusers offline and computes what our
model computes; a single file of the embedded model loads back by shapes alone; a conversion that
would give an unloadable model fails and leaves nothing behind."""
import dataclasses
import socket
from pathlib import Path

import pytest
import torch

from sdloom.checkpoints.load import open_model_source
from sdloom.checkpoints.save import save_model, save_safetensors
from sdloom.cli import main
from sdloom.config import ModelConfig, TextEncoderConfig, UNetConfig
from sdloom.families.sd_presets import EMBEDDED
from sdloom.models.unet import sdxl_adm
from sdloom.sampling.schedules import DiscreteSchedule
from sdloom.tokenizer import get_tokenizer

from tiny import TINY_SD1, tiny_model

ASSET = Path(__file__).parents[1] / "src" / "sdloom" / "assets" / "sdloom-emoji.safetensors"

# SDXL's wiring at toy width: CLIP-L-style (hf) + OpenCLIP-style (pooled, projected) encoders,
# context = 32 + 64, ADM = pooled 48 + 6 × 256
TINY_SDXL = ModelConfig(
    "sdxl",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
               transformer_depth_middle=2, num_head_channels=16, context_dim=96,
               use_linear_in_transformer=True, adm_in_channels=48 + 6 * 256, num_groups=8),
    TINY_SD1.vae,
    (TextEncoderConfig(width=32, layers=2, heads=2, hidden_layer=-2, final_norm_on_hidden=False),
     TextEncoderConfig(layout="openclip", width=64, layers=3, heads=4, act="gelu",
                       projection_dim=48, hidden_layer=-2, final_norm_on_hidden=False,
                       pad_token=0, pooled=True)),
    default_size=64)

# SD2's wiring: OpenCLIP-style encoder read at the penultimate layer through ln_final, 64-wide
# heads with linear projections, v-prediction
TINY_SD2 = ModelConfig(
    "sd2",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
               transformer_depth_middle=1, num_head_channels=16, context_dim=64,
               use_linear_in_transformer=True, num_groups=8),
    TINY_SD1.vae,
    (TextEncoderConfig(layout="openclip", width=64, layers=3, heads=4, act="gelu",
                       projection_dim=64, hidden_layer=-2, pad_token=0),),
    prediction="v", default_size=64)

PROMPTS = ["a red apple", "A Photo of an ASTRONAUT, riding a horse", "emoji: 😀 smiling face",
           "3.14159 numbers 2024", "don't stop, it's   spaced\tout\n", "ünïcödé café naïve",
           "[bracket] (paren:1.2) <lora:x:1>", "word " * 100]


@pytest.fixture
def offline(monkeypatch):
    """No network at all while diffusers loads: a folder that needs a download fails."""
    def refuse(*a, **k):
        raise OSError("network access in an offline test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _our_model(kind, tmp_path):
    """(model in fp32, its single file) for one of the three test models."""
    from sdloom.checkpoints.load import load_model
    if kind == "embedded":
        return load_model(ASSET).model, ASSET
    path = tmp_path / f"{kind}.safetensors"
    cfg = {"sd1": TINY_SD1, "sd2": TINY_SD2, "sdxl": TINY_SDXL}[kind]
    save_model(tiny_model(cfg, seed=3), cfg, path)
    return load_model(path).model, path


def _close(got, want):
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "embedded"])
def test_diffusers_folder_loads_offline_in_diffusers_and_matches(tmp_path, offline, kind):
    import diffusers as d
    model, path = _our_model(kind, tmp_path)
    cfg = model.config
    folder = tmp_path / "out"
    assert main(["convert", str(path), str(folder)]) == 0
    cls = d.StableDiffusionXLPipeline if cfg.is_sdxl else d.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe).__name__ == cls.__name__
    if not cfg.is_sdxl:
        assert pipe.safety_checker is None and not pipe.config.requires_safety_checker

    # tokenizers: our ids, including the pad token (CLIP-L: <|endoftext|>; OpenCLIP: "!" = 0)
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if cfg.is_sdxl else [])
    ids = []
    for tok, te in zip(toks, cfg.text_encoders):
        ours = get_tokenizer()(PROMPTS, pad_token=te.pad_token)
        theirs = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.tolist() == theirs
        assert ours[0, -1] == te.pad_token
        ids.append(ours)
    # "!" only where it is not the pad token: transformers splits text on every special token,
    # so with OpenCLIP's pad "!" it reads "wow!!" as two pads — as with the published SD2 and
    # SDXL folders, whose tokenizers declare the same pad token
    bang = ["wow!! it's great!", "!!!"]
    if cfg.text_encoders[0].pad_token != 0:
        assert get_tokenizer()(bang).tolist() == pipe.tokenizer(
            bang, padding="max_length", max_length=77).input_ids

    # text encoders: the conditioning diffusers' pipeline builds from the prompts is ours
    with torch.no_grad():
        outs = [te(x) for te, x in zip(model.text_encoders, ids)]
        ctx = torch.cat([h for h, _ in outs], dim=-1)
        if cfg.is_sdxl:
            embeds, _, pooled_d, _ = pipe.encode_prompt(PROMPTS, device="cpu",
                                                        do_classifier_free_guidance=False)
            pooled = outs[1][1]
            _close(pooled, pooled_d)
        else:
            embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        _close(ctx, embeds)

        # U-Net on the same latents, timesteps and conditioning
        g = torch.Generator().manual_seed(0)
        n, c, h = 2, cfg.unet.in_channels, cfg.default_size // 8
        x = torch.randn(n, c, h, h, generator=g)
        t = torch.tensor([981.0, 17.0])
        kw, y = {}, None
        if cfg.is_sdxl:
            s = cfg.default_size
            y = sdxl_adm(pooled[:n], (s, s), (0, 0), (s, s))
            kw["added_cond_kwargs"] = {"text_embeds": pooled[:n],
                                       "time_ids": torch.tensor([[s, s, 0, 0, s, s]] * n) * 1.0}
        _close(model.unet(x, t, ctx[:n], y=y),
               pipe.unet(x, t, encoder_hidden_states=ctx[:n], **kw).sample)

        # VAE both ways, and its scaling factor
        img = torch.rand(1, 3, cfg.default_size, cfg.default_size, generator=g) * 2 - 1
        _close(model.vae.encode(img)[0], pipe.vae.encode(img).latent_dist.mean)
        z = torch.randn(1, 4, h, h, generator=g)
        _close(model.vae.decode(z), pipe.vae.decode(z).sample)
        assert pipe.vae.config.scaling_factor == pytest.approx(cfg.vae.scale_factor)

    # scheduler: the model's training betas and prediction type
    want = DiscreteSchedule.scaled_linear(cfg.num_timesteps, cfg.linear_start, cfg.linear_end)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), want.alphas_cumprod,
                               atol=1e-6, rtol=0)
    assert pipe.scheduler.config.prediction_type == (
        "v_prediction" if cfg.prediction == "v" else "epsilon")

    # the pipeline runs end to end as loaded, at the model's own size
    out = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, cfg.default_size, cfg.default_size, 3)
    assert 0.0 < out.images.std() and out.images.min() >= 0.0 and out.images.max() <= 1.0

    # and our own loader reads the folder back as the same model
    back, _ = open_model_source(folder)
    if cfg.family == "sd2":  # diffusers' SD2 encoder: the unused last layer cut, read at its end
        te = cfg.text_encoders[0]
        assert back.text_encoders[0].layers == te.layers - 1
        back = back.replace(text_encoders=cfg.text_encoders)
    # (load.py reads every SDXL folder as 1024 px, whatever the U-Net's sample_size says)
    assert back == cfg.replace(name="", default_size=1024 if cfg.is_sdxl else cfg.default_size)


def _strip_metadata(path, dst):
    _, src = open_model_source(path)
    save_safetensors({k: src.get(k) for k in src.shapes}, dst)  # no sdloom_config metadata
    return dst


def _same_as_embedded(path):
    from sdloom.checkpoints.load import load_model
    got = load_model(path)
    assert got.config == EMBEDDED, got.config
    _, src = open_model_source(ASSET)
    sd = got.model.state_dict()
    assert set(sd) == set(src.shapes)
    assert all(torch.equal(sd[k], src.get(k).float()) for k in sd)


def test_embedded_single_file_loads_back_by_shapes_alone(tmp_path):
    single = tmp_path / "emoji.safetensors"
    assert main(["convert", str(ASSET), str(single)]) == 0
    bare = _strip_metadata(single, tmp_path / "bare.safetensors")
    assert not open_model_source(bare)[1].metadata
    _same_as_embedded(bare)


def test_embedded_ckpt_converts_to_a_file_that_loads(tmp_path):
    _, src = open_model_source(ASSET)
    ckpt = tmp_path / "emoji.ckpt"
    torch.save({k: src.get(k) for k in src.shapes}, ckpt)
    out = tmp_path / "emoji.safetensors"
    assert main(["convert", str(ckpt), str(out)]) == 0
    _same_as_embedded(out)


@pytest.mark.parametrize("dst", ["out.safetensors", "folder"])
def test_convert_refuses_to_write_a_model_that_would_not_load(tmp_path, monkeypatch, capsys, dst):
    """A source whose config does not build (the embedded model seen with 32 norm groups, as
    detection once read it) fails with one clear line and leaves no file, folder or temp file."""
    from sdloom.checkpoints import save
    real = save.open_model_source

    def wrong_config(path):
        cfg, src = real(path)
        unet = dataclasses.replace(cfg.unet, num_groups=32)  # 32 does not divide 48 channels
        return cfg.replace(unet=unet), src
    monkeypatch.setattr(save, "open_model_source", wrong_config)
    (tmp_path / "src").mkdir()
    before = set(tmp_path.iterdir())
    assert main(["convert", str(ASSET), str(tmp_path / dst)]) == 1
    err = capsys.readouterr().err
    assert "would not load" in err and "num_groups" in err and dst in err
    assert err.count("\n") == 1
    assert set(tmp_path.iterdir()) == before  # nothing written, no temp left
