"""SD3 single files without text encoders (sd3_medium.safetensors, sd3.5_large.safetensors) plus
the encoders as separate files, as A1111 and ComfyUI users keep them (clip_l, clip_g, t5xxl in
transformers' layouts): built from a tiny StableDiffusion3Pipeline, they must give the complete
single file's image bit for bit."""
import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdloom.checkpoints.load import load_model
from sdloom.cli import main
from sdloom.errors import ModelFileError, SdloomError
from sdloom.families.sd3 import SD3Family
from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams
from test_sd3 import WG, WL, WT, _randomize, make_pipeline

T5_Q = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"


def _save(sd, path, prefix="", metadata=None):
    # clone: T5's `shared` and `encoder.embed_tokens` share storage, which save_file refuses
    save_file({prefix + k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path),
              metadata=metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3te")
    pipe = make_pipeline(root)
    # without metadata, what shapes cannot say is assumed as in the published models: a 64-wide
    # MMDiT head (without qk-norm) and the most VAE norm groups up to 32 (test_sd3's tiny model
    # has 16-wide heads and 8 groups)
    transformer = _randomize(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=1, joint_attention_dim=WT, caption_projection_dim=64,
        pooled_projection_dim=WL + WG, out_channels=16, pos_embed_max_size=16), 4)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(16, 16, 32, 32),
        layers_per_block=1, latent_channels=16, norm_num_groups=16, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609), 5)
    pipe = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer,
                                                 "vae": vae})
    pipe.save_pretrained(root / "folder")
    full = root / "full.safetensors"
    assert main(["convert", str(root / "folder"), str(full)]) == 0
    sd = load_file(str(full))
    with safe_open(str(full), "pt") as f:
        meta = f.metadata()
    assert "sdloom_config" in meta
    bare = {k: v for k, v in sd.items() if not k.startswith("text_encoders.")}
    assert len(bare) < len(sd)
    out = {"full": full,
           "bare_meta": _save(bare, root / "bare_meta.safetensors", metadata=meta),
           "bare": _save(bare, root / "bare.safetensors"),
           "clips_only": _save({k: v for k, v in sd.items()
                                if not k.startswith("text_encoders.t5xxl.")},
                               root / "clips_only.safetensors")}
    (root / "te").mkdir()
    for name, module in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2),
                         ("t5xxl", pipe.text_encoder_3)):
        out[name] = _save(module.state_dict(), root / "te" / f"{name}.safetensors")
        out[name + "_prefixed"] = _save(module.state_dict(), root / f"{name}_tr.safetensors",
                                        prefix="transformer.")
    out["te_folder"] = root / "te"
    out["root"] = root
    return out


def _image(eng):
    """The image at fixed settings, weights first copied out of the memory-mapped files: CPU
    kernels may round differently on tensors at other address alignments (a file's tensor
    offsets), which is not what these tests compare."""
    with torch.no_grad():
        for t in list(eng.model.parameters()) + list(eng.model.buffers()):
            t.data = t.data.clone()
    p = GenerationParams(prompt="a photo of a cat", seed=7, steps=2, cfg_scale=5.0, width=64,
                         height=64, sampler_name="Euler")
    return generate(eng, p).images[0].tobytes()


@pytest.fixture(scope="module")
def full_engine(files):
    return Engine.load(files["full"], device="cpu", precision="fp32")


@pytest.mark.parametrize("model", ["bare_meta", "bare"])
def test_separate_files_give_the_complete_files_image(files, full_engine, model):
    # with metadata (its config read again for the text encoders) and without (detected from
    # the merged shapes)
    eng = Engine.load(files[model], device="cpu", precision="fp32",
                      text_encoders=[files["clip_l"], files["clip_g"], files["t5xxl"]])
    assert eng.config == full_engine.config
    ours, full = eng.model.state_dict(), full_engine.model.state_dict()
    assert ours.keys() == full.keys() and all(torch.equal(ours[k], full[k]) for k in ours)
    assert _image(eng) == _image(full_engine)


def test_any_order_prefixed_names_and_a_folder(files, full_engine):
    want = _image(full_engine)
    shuffled = Engine.load(files["bare"], device="cpu", precision="fp32",
                           text_encoders=[files["t5xxl_prefixed"], files["clip_g_prefixed"],
                                          files["clip_l_prefixed"]])
    assert _image(shuffled) == want
    folder = Engine.load(files["bare"], device="cpu", precision="fp32",
                         text_encoders=files["te_folder"])
    assert _image(folder) == want
    # the CLIPs told apart by width, not by name: swapped names load the same encoders
    swapped = files["root"] / "swapped"
    swapped.mkdir()
    (swapped / "clip_l.safetensors").write_bytes(files["clip_g"].read_bytes())
    (swapped / "clip_g.safetensors").write_bytes(files["clip_l"].read_bytes())
    m = load_model(files["bare"], text_encoders=[swapped / "clip_l.safetensors",
                                                 swapped / "clip_g.safetensors"]).model
    assert m.config.clip_l.width == 64 and m.config.clip_g.width == 128


def test_without_t5_file_the_t5_part_is_zeros(files, full_engine):
    eng = Engine.load(files["bare"], device="cpu", precision="fp32",
                      text_encoders=[files["clip_g"], files["clip_l"]])
    assert eng.config.t5 is None and eng.model.text_encoders.t5xxl is None
    (ctx,), (want,) = (e.prompt_encoder.encode(["a cat"]) for e in (eng, full_engine))
    torch.testing.assert_close(ctx.context[:, :77], want.context[:, :77], atol=0, rtol=0)
    assert ctx.context[:, 77:].abs().max() == 0 and want.context[:, 77:].abs().max() > 0
    assert _image(eng) != _image(full_engine)  # T5 matters: the comparisons above can fail


@pytest.mark.parametrize("given, missing", [(("clip_l", "t5xxl"), "CLIP-G.*clip_g"),
                                            (("clip_g",), "CLIP-L.*clip_l")])
def test_a_missing_clip_names_the_file_needed(files, given, missing):
    with pytest.raises(ModelFileError, match=missing):
        load_model(files["bare"], text_encoders=[files[g] for g in given])


def test_without_text_encoders_the_error_names_the_option(files):
    for name in ("bare", "bare_meta"):
        with pytest.raises(ModelFileError, match="--text-encoders"):
            load_model(files[name])


def test_given_files_replace_the_files_own(files, full_engine):
    # an *_incl_clips* file (CLIP-L and CLIP-G, no T5) takes a T5 file: the complete model
    eng = Engine.load(files["clips_only"], device="cpu", precision="fp32",
                      text_encoders=[files["t5xxl"]])
    assert _image(eng) == _image(full_engine)
    # a file with all three: the given T5 replaces its own
    sd = load_file(str(files["t5xxl"]))
    other = {k: v * 2 for k, v in sd.items()}
    path = _save(other, files["root"] / "t5_other.safetensors")
    m = load_model(files["full"], text_encoders=[path]).model
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(m.state_dict()[T5_Q], other[q]) and not torch.equal(other[q], sd[q])


def test_fp8_t5_file_loads_upcast(files):
    sd = load_file(str(files["t5xxl"]))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim > 1 else v for k, v in sd.items()}
    path = _save(fp8, files["root"] / "t5xxl_fp8_e4m3fn.safetensors")
    m = load_model(files["bare"], text_encoders=[files["clip_l"], files["clip_g"], path]).model
    got = m.state_dict()[T5_Q]
    q = fp8["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, q.float())
    assert not torch.equal(got, sd["encoder.block.0.layer.0.SelfAttention.q.weight"])


def test_cli_text_encoders(files, tmp_path):
    common = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler",
              "--seed", "3", "--device", "cpu", "--precision", "fp32", "-q"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a cat", "--model", str(files["full"]), "-o", str(a)] + common) == 0
    assert main(["generate", "a cat", "--model", str(files["bare"]), "--text-encoders",
                 str(files["t5xxl"]), str(files["clip_l"]), str(files["clip_g"]),
                 "-o", str(b)] + common) == 0
    import numpy as np
    from PIL import Image
    # the CLI runs on the memory-mapped weights: ±1 for CPU rounding by alignment (see _image)
    diff = np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(b), float))
    assert diff.max() <= 1 and np.asarray(Image.open(a), float).std() > 5
    assert main(["generate", "a cat", "--model", str(files["bare"]), "-o", str(b)]
                + common) != 0


# ---------------------------------------------------------------- shapes only (published sizes)

def _clip_shapes(width, layers, prefix="", projection=True):
    s = {f"{prefix}text_model.embeddings.token_embedding.weight": (49408, width),
         f"{prefix}text_model.embeddings.position_embedding.weight": (77, width),
         f"{prefix}text_model.final_layer_norm.weight": (width,)}
    for i in range(layers):
        s[f"{prefix}text_model.encoder.layers.{i}.mlp.fc1.weight"] = (4 * width, width)
    if projection:
        s[f"{prefix}text_projection.weight"] = (width, width)
    return s


T5_SHAPES = {"shared.weight": (32128, 4096),
             "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
             "encoder.embed_tokens.weight": (32128, 4096)}
SD3_MAIN = {"model.diffusion_model.y_embedder.mlp.0.weight": (1536, 2048),
            "model.diffusion_model.context_embedder.weight": (1536, 4096)}


def test_published_widths_are_told_apart_by_shapes():
    files = [("t5xxl_fp16.safetensors", T5_SHAPES),
             ("a.safetensors", _clip_shapes(1280, 32, "transformer.")),
             ("b.safetensors", _clip_shapes(768, 12, projection=False))]
    merge = SD3Family().merge_component_files(SD3_MAIN, files)
    assert set(merge.replaces) == {"text_encoders.t5xxl.", "text_encoders.clip_g.",
                                   "text_encoders.clip_l."}
    t5, g, l = merge.renames
    assert t5 == {"shared.weight": "text_encoders.t5xxl.transformer.shared.weight",
                  "encoder.block.0.layer.0.SelfAttention.q.weight":
                  "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"}
    assert g["transformer.text_projection.weight"] == \
        "text_encoders.clip_g.transformer.text_projection.weight"
    assert l["text_model.encoder.layers.11.mlp.fc1.weight"] == \
        "text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"
    # a lone CLIP-G file: the missing one is CLIP-L, named
    with pytest.raises(ModelFileError, match="CLIP-L"):
        SD3Family().merge_component_files(SD3_MAIN, files[:2])
    # T5 alone without its `shared` copy: the tied embedding is read as `shared`
    only_tied = {k: v for k, v in T5_SHAPES.items() if k != "shared.weight"}
    merge = SD3Family().merge_component_files(SD3_MAIN, [("t5", only_tied)] + files[1:])
    assert merge.renames[0]["encoder.embed_tokens.weight"] == \
        "text_encoders.t5xxl.transformer.shared.weight"


@pytest.mark.parametrize("given, match", [
    ([("x", _clip_shapes(768, 12)), ("y", _clip_shapes(768, 12))], "same width"),
    ([("x", _clip_shapes(768, 12)), ("y", _clip_shapes(1024, 24))], "pooled input of 2048"),
    ([("x", {"scaled_fp8": (0,)} | T5_SHAPES)], "scaled fp8"),
    ([("x", {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)})], "not a text encoder"),
    ([("x", _clip_shapes(768, 12) | _clip_shapes(1280, 32, "g."))], "2 text encoders"),
    ([("x", T5_SHAPES), ("y", T5_SHAPES)], "more than one T5"),
])
def test_refusals(given, match):
    with pytest.raises(ModelFileError, match=match):
        SD3Family().merge_component_files(SD3_MAIN, given)


def test_not_for_folders_or_other_families(files):
    with pytest.raises(SdloomError, match="single-file"):
        load_model(files["root"] / "folder", text_encoders=[files["clip_l"]])
    # the embedded emoji model (SD family) holds its text encoder itself
    with pytest.raises(SdloomError, match="apply to SD3"):
        Engine.load(None, device="cpu", text_encoders=[files["clip_l"]])
