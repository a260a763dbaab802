"""Checkpoints: family detection from shapes, and whole-model parity with diffusers/transformers
when loading a diffusers folder, a single-file checkpoint in the original key layout, a .ckpt
(state_dict wrapper, EMA keys), and after `convert` in both directions."""
import dataclasses
import json

import pytest
import torch

from sdloom.families.sd_detect import DetectionError, detect
from sdloom.checkpoints.load import CONFIG_KEY, load_model, open_model_source
from sdloom.checkpoints.save import convert, save_safetensors
from sdloom.families.sd_presets import PRESETS
from sdloom.errors import SdloomError
from sdloom.families.sd import LatentDiffusion
from sdloom.models.unet import sdxl_adm

from conftest import randomize_


def preset_shapes(name):
    with torch.device("meta"):
        m = LatentDiffusion(PRESETS[name])
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ detection vs published configs
# The published config.json values of each family (diffusers UNet2DConditionModel and
# AutoencoderKL, transformers CLIPTextConfig; SD2's encoder as the single file holds it: all 24
# OpenCLIP-H layers). Full-size models are built on the meta device (shapes, no memory), renamed
# with our diffusers key maps into the original layout, and detected: a wrong preset, key map or
# convention fails here, not only on a user's download.
CROSS3 = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP3 = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD1_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                cross_attention_dim=768, down_block_types=CROSS3, up_block_types=UP3,
                in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                sample_size=64)
SD2_UNET = {**SD1_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}
SDXL_UNET = dict(attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 use_linear_projection=True, in_channels=4, out_channels=4, layers_per_block=2,
                 norm_num_groups=32, sample_size=128)
REFINER_UNET = dict(attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
                    cross_attention_dim=1280,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                    "UpBlock2D"],
                    transformer_layers_per_block=4, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
                    use_linear_projection=True, in_channels=4, out_channels=4,
                    layers_per_block=2, norm_num_groups=32, sample_size=128)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3,
              latent_channels=4, layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025}
CLIP_L_HF = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                 hidden_act="quick_gelu")
OPENCLIP_H_HF = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                     num_hidden_layers=24, max_position_embeddings=77, vocab_size=49408,
                     hidden_act="gelu", projection_dim=1024)
OPENCLIP_BIGG_HF = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                        num_hidden_layers=32, max_position_embeddings=77, vocab_size=49408,
                        hidden_act="gelu", projection_dim=1280)
# preset: (unet config, vae config, [(text config, projection?, layout)], sd prefix style)
PUBLISHED = {
    "sd1": (SD1_UNET, SD_VAE, [(CLIP_L_HF, False, "hf")]),
    "sd1-inpaint": ({**SD1_UNET, "in_channels": 9}, SD_VAE, [(CLIP_L_HF, False, "hf")]),
    "sd2-v": (SD2_UNET, SD_VAE, [(OPENCLIP_H_HF, True, "openclip")]),
    "sd2-inpaint": ({**SD2_UNET, "in_channels": 9, "sample_size": 64}, SD_VAE,
                    [(OPENCLIP_H_HF, True, "openclip")]),
    "sdxl-base": (SDXL_UNET, SDXL_VAE, [(CLIP_L_HF, False, "hf"),
                                        (OPENCLIP_BIGG_HF, True, "openclip")]),
    "sdxl-refiner": (REFINER_UNET, SDXL_VAE, [(OPENCLIP_BIGG_HF, True, "openclip")]),
}


def published_shapes(name):
    """Original-layout shapes of a full-size published model, built on the meta device."""
    import diffusers as d
    import transformers as t
    from sdloom.families.keymaps.clip import clip_hf_to_openclip, normalize_hf_clip
    from sdloom.families.keymaps.unet import (unet_config_from_diffusers,
                                                 unet_diffusers_to_ldm)
    from sdloom.families.keymaps.vae import vae_diffusers_to_ldm
    uc, vc, texts = PUBLISHED[name]
    with torch.device("meta"):
        unet = d.UNet2DConditionModel(**uc)
        vae = d.AutoencoderKL(**{k: v for k, v in vc.items() if k != "scaling_factor"})
    sd = {"model.diffusion_model." + k: v for k, v in unet_diffusers_to_ldm(
        unet.state_dict(), unet_config_from_diffusers(dict(unet.config))).items()}
    sd.update({"first_stage_model." + k: v
               for k, v in vae_diffusers_to_ldm(vae.state_dict()).items()})
    sdxl = "addition_embed_type" in uc
    for i, (tc, proj, layout) in enumerate(texts):
        cls = t.CLIPTextModelWithProjection if proj else t.CLIPTextModel
        with torch.device("meta"):
            m = cls(t.CLIPTextConfig(**tc))
        w = normalize_hf_clip(m.state_dict())
        prefix = f"conditioner.embedders.{i}." if sdxl else "cond_stage_model."
        if layout == "openclip":
            sd.update({prefix + "model." + k: v for k, v in clip_hf_to_openclip(w).items()})
        else:
            sd.update({prefix + "transformer." + k: v for k, v in w.items()})
    return {k: tuple(v.shape) for k, v in sd.items()}, unet, vae


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_detection_of_published_configs_gives_the_preset(name):
    from sdloom.families.sd_detect import detect_structure
    from sdloom.families.keymaps.unet import unet_config_from_diffusers
    from sdloom.families.sd_diffusers import vae_config_from_diffusers
    shapes, unet, vae = published_shapes(name)
    preset = PRESETS[name]
    # the presets say what diffusers' own configs say
    assert unet_config_from_diffusers(dict(unet.config)) == preset.unet
    assert vae_config_from_diffusers(PUBLISHED[name][1], preset.is_sdxl) == preset.vae
    # detection from shapes gives the preset, and so do the conventions alone (before any
    # preset is matched): heads, groups, prediction, hidden layers as the family defines them
    got = detect(shapes)
    assert got.name == name and got.family == preset.family
    for f in dataclasses.fields(preset):
        assert getattr(got, f.name) == getattr(preset, f.name), f.name
    assert detect_structure(shapes) == preset.replace(name="")


def test_embedded_model_detects_from_shapes_alone(tmp_path):
    from safetensors import safe_open

    from sdloom.pipelines.engine import EMBEDDED_MODEL
    with safe_open(str(EMBEDDED_MODEL), "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    bare = tmp_path / "bare.safetensors"
    save_safetensors(plain, bare)  # no metadata at all
    with_meta, without = load_model(EMBEDDED_MODEL), load_model(bare)
    assert CONFIG_KEY in meta and without.config == with_meta.config == PRESETS["embedded"]
    # the shapes alone would not say 16 groups or 4 heads: the preset match does
    from sdloom.families.sd_detect import detect_structure
    conv = detect_structure({k: tuple(v.shape) for k, v in plain.items()})
    assert (conv.unet.num_heads, conv.vae.num_groups) != (4, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 96, generator=g)
    t = torch.tensor([999.0, 10.0])
    with torch.no_grad():
        a, b = with_meta.model.unet(x, t, ctx), without.model.unet(x, t, ctx)
    assert a.abs().max() > 0.1 and torch.equal(a, b)


def test_presets_are_not_ambiguous():
    seen = {}
    for name in PRESETS:
        key = tuple(sorted(preset_shapes(name).items()))
        assert key not in seen, (name, seen.get(key))
        seen[key] = name


def test_partial_or_foreign_checkpoints_name_what_is_missing():
    shapes = preset_shapes("sd1")
    del shapes["first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(DetectionError, match="first_stage_model.encoder.conv_in.weight"):
        detect(shapes)
    with pytest.raises(DetectionError, match="VAE alone"):
        detect({"encoder.conv_in.weight": (128, 3, 3, 3)})
    with pytest.raises(DetectionError, match="cond_stage_model"):
        detect({k: v for k, v in preset_shapes("sd1").items() if "cond_stage" not in k})


# ------------------------------------------------------------------ tiny diffusers pipelines

def _unet(d, **kw):
    return randomize_(d.UNet2DConditionModel(sample_size=8, norm_num_groups=32, **kw), 1).eval()


def _vae(d):
    # four levels: f = 8, as every SD VAE
    return randomize_(d.AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4,
                                      latent_channels=4, norm_num_groups=32), 2).eval()


def _text(t, act, layers, proj=None, seed=3):
    cfg = t.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=layers, num_attention_heads=1,
                           max_position_embeddings=77, hidden_act=act, projection_dim=proj or 64)
    cls = t.CLIPTextModelWithProjection if proj else t.CLIPTextModel
    return randomize_(cls(cfg), seed).eval()


def make_folder(tmp, family):
    """A diffusers folder whose head layout follows the family's rule (SD1: 8 heads; SD2/SDXL:
    64-wide heads), so that shape detection alone must get it right too."""
    import diffusers as d
    import transformers as t
    if family == "sd1":
        unet = _unet(d, block_out_channels=(64, 64), layers_per_block=1, cross_attention_dim=64,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
        texts = {"text_encoder": _text(t, "quick_gelu", 2)}
        pred = "epsilon"
    elif family == "sd2":
        unet = _unet(d, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     attention_head_dim=(1, 2), use_linear_projection=True)
        texts = {"text_encoder": _text(t, "gelu", 2)}  # diffusers' SD2 encoder: last layer cut
        pred = "v_prediction"
    else:
        unet = _unet(d, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=128,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
                     use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 1536)
        texts = {"text_encoder": _text(t, "quick_gelu", 2),
                 "text_encoder_2": _text(t, "gelu", 3, proj=32, seed=4)}
        pred = "epsilon"
    folder = tmp / family
    unet.save_pretrained(folder / "unet")
    vae = _vae(d)
    vae.save_pretrained(folder / "vae")
    for name, m in texts.items():
        m.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"prediction_type": pred}))
    return folder, unet, vae, texts


def close(got, want):
    """fp32 parity: max error within 1e-4 of the output's scale (random weights give U-Net
    outputs of magnitude ~10, where fp32 summation order alone moves the 5th digit)."""
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), err


def check_parity(model, family, unet, vae, texts):
    g = torch.Generator().manual_seed(0)
    ids = torch.full((2, 77), 49407)
    ids[:, 0] = 49406
    ids[:, 1:6] = torch.randint(300, 4000, (2, 5), generator=g)
    ids[0, 6:] = 49407
    ctx_parts, pooled = [], None
    with torch.no_grad():
        for te, (name, ref) in zip(model.text_encoders, texts.items()):
            oc = te.config.pad_token == 0
            x = ids.clone()
            if oc:
                x[:, 7:] = 0
            h, p = te(x)
            out = ref(x, output_hidden_states=True)
            if family == "sdxl":
                want = out.hidden_states[-2]
            else:
                want = out.last_hidden_state
            torch.testing.assert_close(h, want, atol=1e-4, rtol=1e-4)
            if p is not None:
                torch.testing.assert_close(p, out.text_embeds, atol=1e-4, rtol=1e-4)
                pooled = p
            ctx_parts.append(h)
        ctx = torch.cat(ctx_parts, dim=-1)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([981.0, 17.0])
        kw, y = {}, None
        if family == "sdxl":
            y = sdxl_adm(pooled, (64, 64), (0, 0), (64, 64))
            kw["added_cond_kwargs"] = {"text_embeds": pooled,
                                       "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
        close(model.unet(x, t, ctx, y=y), unet(x, t, encoder_hidden_states=ctx, **kw).sample)
        img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        torch.testing.assert_close(model.vae.encode(img)[0], vae.encode(img).latent_dist.mean,
                                   atol=1e-4, rtol=1e-4)
        z = torch.randn(1, 4, 8, 8, generator=g)
        torch.testing.assert_close(model.vae.decode(z), vae.decode(z).sample, atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder_single_file_and_ckpt_match_the_reference(tmp_path, family):
    folder, unet, vae, texts = make_folder(tmp_path, family)
    loaded = load_model(folder)
    assert loaded.config.family == family
    assert loaded.config.prediction == ("v" if family == "sd2" else "eps")
    check_parity(loaded.model, family, unet, vae, texts)

    single = tmp_path / f"{family}.safetensors"
    convert(folder, single)
    check_parity(load_model(single).model, family, unet, vae, texts)

    # the original layout without our metadata: detection from shapes alone
    cfg, src = open_model_source(single)
    plain = {k: src.get(k) for k in src.shapes}
    if family == "sd2":  # a real SD2 file has the 24th (unused) layer: rebuild that layout
        full = _text(__import__("transformers"), "gelu", 3)
        full.load_state_dict({**texts["text_encoder"].state_dict(),
                              **{k: v for k, v in full.state_dict().items() if ".layers.2." in k}})
        from sdloom.families.keymaps.clip import clip_hf_to_openclip, normalize_hf_clip
        plain = {k: v for k, v in plain.items() if not k.startswith("cond_stage_model.")}
        oc = clip_hf_to_openclip(normalize_hf_clip(full.state_dict()))
        oc["text_projection"] = torch.zeros(64, 64)
        oc["logit_scale"] = torch.tensor(4.6)
        plain.update({"cond_stage_model.model." + k: v for k, v in oc.items()})
    bare = tmp_path / f"{family}-bare.safetensors"
    save_safetensors(plain, bare)
    got = load_model(bare)
    assert got.config.family == family
    check_parity(got.model, family, unet, vae, texts)

    # .ckpt with the state_dict wrapper, EMA copies and schedule buffers
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 0
           for k, v in plain.items() if k.startswith("model.diffusion_model.")}
    ckpt = tmp_path / f"{family}.ckpt"
    torch.save({"state_dict": {**plain, **ema, "alphas_cumprod": torch.ones(1000)},
                "global_step": 5}, ckpt)
    check_parity(load_model(ckpt).model, family, unet, vae, texts)
    assert all((p == 0).all() for p in load_model(ckpt, ema=True).model.unet.parameters())


def test_convert_round_trip_is_lossless(tmp_path):
    folder, *_ = make_folder(tmp_path, "sdxl")
    single = tmp_path / "x.safetensors"
    convert(folder, single)
    back = tmp_path / "back"
    convert(single, back)
    from safetensors.torch import load_file

    from sdloom.families.keymaps.clip import normalize_hf_clip
    for comp, fname in [("unet", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.safetensors"),
                        ("text_encoder", "model.safetensors"),
                        ("text_encoder_2", "model.safetensors")]:
        a = load_file(str(next((folder / comp).glob("*.safetensors"))))
        if comp.startswith("text"):  # transformers 5 drops the `text_model.` prefix
            a = normalize_hf_clip(a)
        b = load_file(str(back / comp / fname))
        assert set(a) == set(b), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    # and single → folder → single gives the same tensors
    again = tmp_path / "again.safetensors"
    convert(back, again)
    x, y = load_model(single).model.state_dict(), load_model(again).model.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_strict_loading_lists_missing_and_wrong_keys(tmp_path):
    folder, *_ = make_folder(tmp_path, "sd1")
    single = tmp_path / "m.safetensors"
    convert(folder, single)
    cfg, src = open_model_source(single)
    sd = {k: src.get(k) for k in src.shapes}
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(sd, bad, {CONFIG_KEY: cfg.to_json()})
    with pytest.raises(SdloomError, match=r"1 missing: model.diffusion_model.out.2.bias.*"
                                          r"1 unexpected: model.diffusion_model.extra.weight"):
        load_model(bad)


def test_vae_override_and_fp16_files(tmp_path):
    folder, unet, vae, texts = make_folder(tmp_path, "sd1")
    single = tmp_path / "m.safetensors"
    convert(folder, single)
    # a VAE file in diffusers names, weights scaled so that it is visibly different
    other = {k: v * 0.5 for k, v in vae.state_dict().items()}
    vfile = tmp_path / "vae.safetensors"
    save_safetensors(other, vfile)
    m = load_model(single, vae=vfile).model
    got = m.vae.post_quant_conv.weight
    assert torch.equal(got, other["post_quant_conv.weight"])
    # fp16 on disk loads into fp32 (and back) without surprises
    cfg, src = open_model_source(single)
    half = tmp_path / "half.safetensors"
    save_safetensors({k: src.get(k).half() for k in src.shapes}, half, {CONFIG_KEY: cfg.to_json()})
    m16 = load_model(half).model
    assert m16.dtype == torch.float32
    ref = load_model(single).model
    k = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(m16.state_dict()[k], ref.state_dict()[k].half().float())
