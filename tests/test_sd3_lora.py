"""SD3 LoRA files in diffusers/PEFT and kohya (sd-scripts) names on a tiny random SD3 pipeline,
merged through Engine.set_loras: the merged weights equal W + s·(alpha/r)·B·A computed in the
file's own names and taken through the key map (fused q/k/v rows, swapped adaLN halves); the
merged MMDiT gives diffusers' transformer output with the same delta added to diffusers' weights;
clearing restores the exact originals. Negative controls: a q delta on the k rows, and an adaLN
delta left unswapped, are each caught at exactly that weight.
(peft is not installed in this venv, so diffusers' own load_lora_weights is not an oracle here.)"""
import copy

import pytest
import torch

from sdloom.checkpoints.save import save_safetensors
from sdloom.errors import ModelFileError
from sdloom.families.keymaps.mmdit import mmdit_diffusers_to_original, mmdit_original_to_diffusers
from sdloom.pipelines.engine import Engine
from test_sd3 import make_pipeline

DIT = "model.diffusion_model."
RANK = 4
# diffusers component → where its weights are in our model
TE = {"text_encoder": "text_encoders.clip_l.transformer.",
      "text_encoder_2": "text_encoders.clip_g.transformer.",
      "text_encoder_3": "text_encoders.t5xxl.transformer."}
# PEFT modules: q/k/v of a joint block (k with alpha 2), a context-stream piece, its out
# projections, an FF, both swapped adaLNs (last block's context, final layer), a plain adaLN,
# CLIP-L and CLIP-G layers; {module: alpha or None}
PEFT = {"transformer.transformer_blocks.0.attn.to_q": None,
        "transformer.transformer_blocks.0.attn.to_k": 2.0,
        "transformer.transformer_blocks.0.attn.to_v": None,
        "transformer.transformer_blocks.0.attn.add_v_proj": 8.0,
        "transformer.transformer_blocks.0.attn.to_add_out": None,
        "transformer.transformer_blocks.1.attn.to_out.0": None,
        "transformer.transformer_blocks.1.ff.net.0.proj": None,
        "transformer.transformer_blocks.0.norm1.linear": None,
        "transformer.transformer_blocks.1.norm1_context.linear": None,
        "transformer.norm_out.linear": 3.0,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": None,
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": 1.0}
# kohya modules: {module: (our weight, alpha)} — the weights written out by hand
KOHYA = {"lora_unet_joint_blocks_0_x_block_attn_qkv":
         (DIT + "joint_blocks.0.x_block.attn.qkv.weight", 2.0),
         "lora_unet_joint_blocks_1_context_block_attn_qkv":
         (DIT + "joint_blocks.1.context_block.attn.qkv.weight", 4.0),
         "lora_unet_joint_blocks_0_context_block_mlp_fc2":
         (DIT + "joint_blocks.0.context_block.mlp.fc2.weight", 1.0),
         "lora_unet_final_layer_adaLN_modulation_1":
         (DIT + "final_layer.adaLN_modulation.1.weight", 4.0),
         "lora_te1_text_model_encoder_layers_0_self_attn_k_proj":
         ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
          4.0),
         "lora_te2_text_model_encoder_layers_1_self_attn_out_proj":
         ("text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
          4.0),
         "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
         ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", 4.0)}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_lora")
    pipe = make_pipeline(root)
    pipe.save_pretrained(root / "folder")
    eng = Engine.load(root / "folder", device="cpu", precision="fp32")
    original = {k: v.clone() for k, v in eng.model.state_dict().items()}
    return pipe, eng, original, root


def _diffusers_sds(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {"transformer": {k: v.clone() for k, v in pipe.transformer.state_dict().items()},
            **{c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in TE}}


def _random_ab(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(RANK, shape[1], generator=g) * 0.3,
            torch.randn(shape[0], RANK, generator=g) * 0.3)


def _peft_file(pipe, path):
    """A random PEFT file for PEFT's modules; returns {module: (A, B, alpha)} too."""
    sds = _diffusers_sds(pipe)
    mods, tensors = {}, {}
    for i, (mod, alpha) in enumerate(PEFT.items()):
        comp, _, sub = mod.partition(".")
        a, b = _random_ab(sds[comp][sub + ".weight"].shape, i)
        mods[mod] = (a, b, alpha)
        tensors[mod + ".lora_A.weight"], tensors[mod + ".lora_B.weight"] = a, b
        if alpha is not None:
            tensors[mod + ".alpha"] = torch.tensor(alpha)
    save_safetensors(tensors, path)
    return mods


def _expected_peft(pipe, mods, strength, move=None, unswap=()):
    """Our state dict after the merge, computed in diffusers names (W + s·(α/r)·B·A, α = r when
    absent) and renamed by the key map; also the merged diffusers transformer weights.
    `move` puts a module's delta on another diffusers weight; `unswap` lists modules whose delta
    is pre-swapped, so that the key map's swap cancels it (what an unswapped merge would give)."""
    sds = _diffusers_sds(pipe)
    for mod, (a, b, alpha) in mods.items():
        comp, _, sub = mod.partition(".")
        key = (move or {}).get(sub, sub) + ".weight"
        delta = (b @ a) * (strength * (alpha / RANK if alpha is not None else 1.0))
        if mod in unswap:
            delta = torch.cat(delta.chunk(2)[::-1])
        sds[comp][key] += delta
    ours = {DIT + k: v for k, v in mmdit_diffusers_to_original(sds["transformer"]).items()}
    for comp, prefix in TE.items():
        ours.update({prefix + k: v for k, v in sds[comp].items()})
    return ours, sds["transformer"]


def _mismatched(model, want) -> list[str]:
    """Keys of our model whose values differ from `want` (beyond float rounding)."""
    have = {k: v for k, v in model.state_dict().items() if k.startswith((DIT, "text_encoders."))}
    assert have.keys() <= want.keys(), sorted(have.keys() - want.keys())[:5]  # all compared
    return sorted(k for k in have if not torch.allclose(have[k], want[k], atol=1e-6, rtol=0))


def _mmdit_outputs(eng, ref_transformer):
    g = torch.Generator().manual_seed(11)
    x, ctx = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 7, 256, generator=g)
    y, t = torch.randn(2, 192, generator=g), torch.tensor([937.5, 120.0])
    with torch.no_grad():
        ours = eng.model.model.diffusion_model(x, t, ctx, y)
        theirs = ref_transformer(hidden_states=x, encoder_hidden_states=ctx,
                                 pooled_projections=y, timestep=t).sample
    return ours, theirs


def _restored(eng, original) -> bool:
    return all(torch.equal(v, original[k]) for k, v in eng.model.state_dict().items())


def test_peft_lora_lands_on_fused_rows_and_swapped_adaln(sd3):
    pipe, eng, original, root = sd3
    path = root / "peft.safetensors"
    mods = _peft_file(pipe, path)
    strength = 0.8
    assert eng.set_loras([(str(path), strength)]) == ["peft"]
    assert eng.loras.applied == [("peft", strength)]
    want, merged_diffusers = _expected_peft(pipe, mods, strength)
    assert _mismatched(eng.model, want) == []
    # negative controls: each wrong placement is caught at exactly its weight
    q, k = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"
    wrong, _ = _expected_peft(pipe, {m: v for m, v in mods.items() if not m.endswith("to_k")},
                              strength, move={q: k})
    assert _mismatched(eng.model, wrong) == [DIT + "joint_blocks.0.x_block.attn.qkv.weight"]
    wrong, _ = _expected_peft(pipe, mods, strength,
                              unswap={"transformer.norm_out.linear",
                                      "transformer.transformer_blocks.1.norm1_context.linear"})
    assert _mismatched(eng.model, wrong) == [
        DIT + "final_layer.adaLN_modulation.1.weight",
        DIT + "joint_blocks.1.context_block.adaLN_modulation.1.weight"]
    # the merged MMDiT computes what diffusers' transformer computes with the delta in its weights
    ref = copy.deepcopy(pipe.transformer)
    ref.load_state_dict(merged_diffusers, strict=True)
    ours, theirs = _mmdit_outputs(eng, ref.eval())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    _, plain = _mmdit_outputs(eng, pipe.transformer)
    assert (theirs - plain).abs().max() > 100 * 1e-4  # the LoRA changes the output
    eng.set_loras([])
    assert eng.loras.applied == [] and _restored(eng, original)


def test_kohya_sd3_lora_targets_whole_fused_weights_and_text_encoders(sd3):
    pipe, eng, original, root = sd3
    tensors, want = {}, {k: v.clone() for k, v in original.items()}
    strength = -0.6
    for i, (mod, (param, alpha)) in enumerate(KOHYA.items()):
        down, up = _random_ab(original[param].shape, 100 + i)
        tensors |= {f"{mod}.lora_down.weight": down, f"{mod}.lora_up.weight": up,
                    f"{mod}.alpha": torch.tensor(alpha)}
        want[param] += (up @ down) * (strength * alpha / RANK)
    save_safetensors(tensors, root / "kohya.safetensors")
    eng.set_loras([(str(root / "kohya.safetensors"), strength)])
    assert _mismatched(eng.model, want) == []
    # diffusers' transformer with these original-layout weights gives the same output
    ref = copy.deepcopy(pipe.transformer)
    ref.load_state_dict(mmdit_original_to_diffusers(
        {k[len(DIT):]: v for k, v in want.items() if k.startswith(DIT)}), strict=True)
    ours, theirs = _mmdit_outputs(eng, ref.eval())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    eng.set_loras([])
    assert _restored(eng, original)


def test_peft_and_kohya_spellings_name_the_same_weights(sd3):
    _, eng, _, _ = sd3
    t = eng.family.lora_targets(eng.model)
    qkv = DIT + "joint_blocks.1.context_block.attn.qkv.weight"
    assert t["transformer.transformer_blocks.1.attn.add_k_proj"].param == qkv
    assert t["transformer.transformer_blocks.1.attn.add_k_proj"].rows == slice(32, 64)
    assert t["lora_transformer_transformer_blocks_1_attn_add_k_proj"] == \
        t["base_model.model.transformer_blocks.1.attn.add_k_proj"] == \
        t["transformer.transformer_blocks.1.attn.add_k_proj"]
    assert t["lora_unet_joint_blocks_1_context_block_attn_qkv"].rows is None
    # the last block's text stream is pre-only: no output projection or MLP to target
    assert "transformer.transformer_blocks.1.attn.to_add_out" not in t
    assert "lora_unet_joint_blocks_1_context_block_mlp_fc1" not in t
    assert t["text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wo"] == \
        t["lora_te3_encoder_block_1_layer_1_DenseReluDense_wo"]


def test_bad_sd3_loras_are_refused_and_change_nothing(sd3):
    pipe, eng, original, root = sd3
    to_q = "transformer.transformer_blocks.0.attn.to_q"
    a, b = torch.ones(RANK, 32), torch.ones(32, RANK)
    cases = {  # file → what the error says
        "other": ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
                   "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b},
                  "does not fit this model"),
        # a q-sized delta where diffusers' file meant the whole fused qkv: shapes refuse it
        "shape": ({f"{to_q}.lora_A.weight": a, f"{to_q}.lora_B.weight": torch.ones(96, RANK),
                   "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
                   "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b},
                  r"to_q has down \[4, 32\] and up \[96, 4\], the weight is \[32, 32\]"),
        "dora": ({f"{to_q}.lora_A.weight": a, f"{to_q}.lora_B.weight": b,
                  f"{to_q}.lora_magnitude_vector": torch.ones(32)}, "is DoRA"),
        "twice": ({f"{to_q}.lora_A.weight": a, f"{to_q}.lora_B.weight": b,
                   f"{to_q}.lora_down.weight": a}, "has two lora_down.weight tensors")}
    for name, (tensors, message) in cases.items():
        save_safetensors(tensors, root / f"{name}.safetensors")
        with pytest.raises(ModelFileError, match=message):
            eng.set_loras([(str(root / f"{name}.safetensors"), 1.0)])
        assert _restored(eng, original), name
