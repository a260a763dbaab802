"""SD3 through the family layer, end to end on a tiny random StableDiffusion3Pipeline: loading its
diffusers folder, a whole image against diffusers with the same starting latents, flow sigmas
against FlowMatchEulerDiscreteScheduler(shift=3), convert both ways, and the pipeline modes."""
import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
import transformers
from sdloom.cli import main
from sdloom.errors import SdloomError
from sdloom.families.sd_diffusers import write_clip_tokenizer
from sdloom.infotext import parse_infotext
from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams
from sdloom.sampling.model_sampling import FlowSchedule
from sdloom.sampling.schedules import get_sigmas
from sdloom.sd3_conditioning import CLIP_G_SD3, CLIP_L_SD3
from sdloom.seeds import ImageRNG
from sdloom.t5_tokenizer import find_tokenizer_json

WL, WG, WT = 64, 128, 256  # CLIP-L, CLIP-G and T5 (= context) widths, 64-wide heads as the real


def _randomize(module, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p[0].numel() ** 0.5 * 4)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1
                        + (1.0 if name.endswith("weight") else 0.0))
    return module.eval()


def _clip(width, act, seed, identity):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width,
                                      intermediate_size=4 * width, num_hidden_layers=2,
                                      num_attention_heads=width // 64, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=width, bos_token_id=49406,
                                      eos_token_id=49407)
    m = _randomize(transformers.CLIPTextModelWithProjection(cfg), seed)
    if identity:  # CLIP-L's projection is identity in SD3 files
        with torch.no_grad():
            m.text_projection.weight.copy_(torch.eye(width))
    return m


def make_pipeline(root, shift=3.0, t5=True):
    write_clip_tokenizer(root / "tok1", CLIP_L_SD3)
    write_clip_tokenizer(root / "tok2", CLIP_G_SD3)
    transformer = _randomize(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=WT, caption_projection_dim=32,
        pooled_projection_dim=WL + WG, out_channels=16, pos_embed_max_size=16), 4)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(16, 16, 32, 32),
        layers_per_block=1, latent_channels=16, norm_num_groups=8, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609), 5)
    te3 = tok3 = None
    if t5:
        t5cfg = transformers.T5Config(vocab_size=32128, d_model=WT, d_kv=32, d_ff=2 * WT,
                                      num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
        te3 = _randomize(transformers.T5EncoderModel(t5cfg), 3)
        tok3 = transformers.AutoTokenizer.from_pretrained(find_tokenizer_json().parent)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=_clip(WL, "quick_gelu", 1, True),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tok1"),
        text_encoder_2=_clip(WG, "gelu", 2, False),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(root / "tok2"),
        text_encoder_3=te3, tokenizer_3=tok3)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipe = make_pipeline(root)
    pipe.save_pretrained(root / "folder")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "folder", Engine.load(root / "folder", device="cpu", precision="fp32")


def test_flow_sigmas_equal_diffusers_flow_match_euler():
    ours = get_sigmas("uniform", 6, FlowSchedule(3.0))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 6).tolist())
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.timesteps.float(), ours[:-1] * 1000, atol=1e-3, rtol=0)
    # every scheduler works on the flow table and starts at σ = 1
    for name in ("karras", "exponential", "sgm_uniform", "simple", "normal", "beta"):
        s = get_sigmas(name, 6, FlowSchedule(3.0))
        assert s[0] == pytest.approx(1.0, abs=1e-4) and s[-1] == 0 and (s.diff() < 0).all()


def test_loads_a_diffusers_folder_as_sd3(sd3):
    _, folder, eng = sd3
    cfg = eng.config
    assert cfg.family == "sd3" and cfg.mmdit.depth == 2 and cfg.t5 is not None
    assert (cfg.vae.embed_dim, cfg.vae.scale_factor, cfg.vae.shift_factor) == (16, 1.5305, 0.0609)
    assert eng.latent_format.channels == 16 and eng.family.size_multiple(cfg) == 16


def _ours(eng, **kw):
    final = []
    kw.setdefault("sampler_name", "Euler")
    p = GenerationParams(prompt="a photo of a cat", seed=7, steps=4, cfg_scale=5.0, width=64,
                         height=64, **kw)
    res = generate(eng, p, lambda i, n, x0: final.append(x0))
    return res, final[-1]


def _theirs(pipe, eng, **kw):
    noise = ImageRNG((16, 8, 8), [7]).first()
    with torch.no_grad():
        return pipe("a photo of a cat", negative_prompt="", num_inference_steps=4,
                    guidance_scale=5.0, height=64, width=64, latents=noise,
                    sigmas=np.linspace(1.0, 1 / 1000, 4).tolist(), max_sequence_length=77,
                    output_type="latent", **kw).images


def test_whole_image_matches_stable_diffusion_3_pipeline(sd3):
    pipe, _, eng = sd3
    res, lat = _ours(eng)
    want = _theirs(pipe, eng)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(lat, want, atol=1e-3 * float(want.abs().max()), rtol=0)
    # and the picture: diffusers' VAE decode of its latents against our image
    with torch.no_grad():
        img = pipe.vae.decode(want / 1.5305 + 0.0609).sample
    theirs = ((img[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(res.images[0], dtype=np.float64) - theirs).max() <= 1
    assert parse_infotext(res.infotexts[0])["Size"] == "64x64"


def test_negative_control_another_shift_does_not_match(sd3):
    # the comparison above can fail: diffusers with shift 1 walks other sigmas
    pipe, _, eng = sd3
    _, lat = _ours(eng)
    other = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe1 = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "scheduler": other})
    pipe1.set_progress_bar_config(disable=True)
    assert (lat - _theirs(pipe1, eng)).abs().max() > 1e-2


def test_modes_on_sd3(sd3):
    _, _, eng = sd3
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    i2i = generate(eng, GenerationParams(prompt="x", seed=1, steps=4, sampler_name="Euler",
                                         init_image=init, denoising_strength=0.5, width=64,
                                         height=64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inp = generate(eng, GenerationParams(prompt="x", seed=1, steps=2, sampler_name="DPM++ 2M",
                                         init_image=init, mask=mask, mask_blur=0, width=64,
                                         height=64))
    assert inp.images[0].getpixel((2, 2)) == (200, 40, 40)
    hr = generate(eng, GenerationParams(prompt="[cat:dog:2]", seed=1, steps=2,
                                        sampler_name="Heun", width=64, height=64, enable_hr=True,
                                        hr_scale=1.5, denoising_strength=0.5))
    assert i2i.images[0].size == (64, 64) and hr.images[0].size == (96, 96)
    sized = generate(eng, GenerationParams(prompt="x", seed=1, steps=1, sampler_name="Euler",
                                           width=72, height=88))
    assert sized.images[0].size == (64, 80)  # rounded down to multiples of 16 (2×2 patches)
    # ancestral and SDE samplers re-noise in the flow form (tests/test_samplers_flow.py)
    anc = generate(eng, GenerationParams(prompt="x", seed=1, steps=3, sampler_name="Euler a",
                                         width=64, height=64))
    sde = generate(eng, GenerationParams(prompt="x", seed=1, steps=3, sampler_name="DPM++ 2M SDE",
                                         width=64, height=64))
    assert anc.images[0].tobytes() != sde.images[0].tobytes()
    with pytest.raises(SdloomError, match="not defined for sd3 models"):
        generate(eng, GenerationParams(prompt="x", steps=2, sampler_name="DPM fast", width=64,
                                       height=64))


def test_convert_both_ways(sd3, tmp_path):
    pipe, folder, eng = sd3
    single = tmp_path / "sd3.safetensors"
    assert main(["convert", str(folder), str(single)]) == 0
    assert main(["info", str(single)]) == 0
    from safetensors import safe_open
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.qkv.weight" in keys
    assert "text_encoders.t5xxl.transformer.shared.weight" in keys
    back = tmp_path / "back"
    assert main(["convert", str(single), str(back)]) == 0
    again = diffusers.StableDiffusion3Pipeline.from_pretrained(back)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the single file written from the folder gives the same image as the folder
    one = Engine.load(single, device="cpu", precision="fp32")
    a, _ = _ours(eng)
    b, _ = _ours(one)
    assert a.images[0].tobytes() == b.images[0].tobytes()


def test_without_t5_the_t5_part_is_zeros_and_fp8_files_load(sd3, tmp_path):
    pipe, folder, eng = sd3
    no_t5 = Engine.load(folder, device="cpu", precision="fp32", without=("t5",))
    assert no_t5.config.t5 is None and no_t5.model.text_encoders.t5xxl is None
    (ctx_on,), (ctx_off,) = (e.prompt_encoder.encode(["a cat"]) for e in (eng, no_t5))
    torch.testing.assert_close(ctx_off.context[:, :77], ctx_on.context[:, :77])
    assert ctx_off.context[:, 77:].abs().max() == 0 and ctx_on.context[:, 77:].abs().max() > 0
    with pytest.raises(SdloomError, match="no optional component"):
        Engine.load(None, device="cpu", without=("t5",))  # the embedded SD1-family model
    # a single file whose MMDiT is stored in float8_e4m3fn (as published fp8 files) loads upcast
    from safetensors.torch import load_file, save_file
    single = tmp_path / "sd3.safetensors"
    assert main(["convert", str(folder), str(single)]) == 0
    sd = load_file(str(single))
    from safetensors import safe_open
    with safe_open(str(single), "pt") as f:
        meta = f.metadata()
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim > 1
               else v) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"), metadata=meta)
    e8 = Engine.load(tmp_path / "fp8.safetensors", device="cpu", precision="fp32")
    w = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    got = e8.model.state_dict()[w]
    assert got.dtype == torch.float32
    assert torch.equal(got, fp8[w].float()) and not torch.equal(got, sd[w])
    assert generate(e8, GenerationParams(prompt="x", steps=1, sampler_name="Euler", width=64,
                                         height=64)).images[0].size == (64, 64)


def test_sd3_over_the_a1111_api(sd3, tmp_path):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from sdloom.server.app import Server, create_app
    _, folder, _ = sd3
    client = TestClient(create_app(Server(str(folder), device="cpu", precision="fp32",
                                          outdir=str(tmp_path / "out"))))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a (cat:1.2)", "seed": 2, "steps": 2,
                                               "width": 64, "height": 64,
                                               "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert img.size == (64, 64) and json.loads(r.json()["info"])["seed"] == 2
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64,
                                               "height": 64, "sampler_name": "Restart"})
    assert r.status_code == 422 and "not defined for sd3" in r.json()["detail"]
