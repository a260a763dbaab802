"""`sdloom train` on SD3 (rectified flow, Esser et al. 2024) with a tiny random
StableDiffusion3Pipeline: the first step's loss by hand, a falling loss, a saved single file that
loads and generates, an exact resume, a VAE run, LoRA on the MMDiT (kohya file that merges to the
trained model), and what is refused."""
import json

import pytest
import torch
from PIL import Image, ImageDraw

from sdloom.checkpoints.load import CONFIG_KEY, load_model
from sdloom.errors import SdloomError
from sdloom.families import family_of
from sdloom.prompts import EmbeddingDB
from sdloom.training.config import TrainConfig
from sdloom.training.data import BatchSampler, ImageCaptionDataset
from sdloom.training.state import find_state
from sdloom.training.train import lr_factor, train

from test_sd3 import make_pipeline

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
          "yellow": (240, 220, 30)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    make_pipeline(root).save_pretrained(root / "folder")
    return root / "folder"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 images 64×64 (4 colours × square/circle) with .txt captions."""
    root = tmp_path_factory.mktemp("data")
    for name, rgb in COLORS.items():
        for shape in ("square", "circle"):
            im = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(im)
            (draw.rectangle if shape == "square" else draw.ellipse)((12, 12, 52, 52), fill=rgb)
            im.save(root / f"{name}-{shape}.png")
            (root / f"{name}-{shape}.txt").write_text(f"a {name} {shape}")
    return root


def cfg(model, **kw):
    base = dict(what="unet", model=str(model), resolution=64, batch_size=4, lr=1e-3, warmup=0,
                schedule="constant", steps=4, save_every=1000, log_every=1,
                caption_dropout=0.0, seed=5)
    base.update(kw)
    return TrainConfig().override(base)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_first_step_matches_a_hand_computation(sd3_folder, data, tmp_path):
    """σ = shift·u/(1+(shift−1)·u), u = sigmoid(n), n ~ N(0, 1), then ε, from the seeded generator;
    x_t = (1 − σ)·x0 + σ·ε; MSE of the MMDiT's output at σ·1000 to ε − x0. Only the MMDiT moves:
    AdamW's first update is −lr·sign(g) on it, and the text encoders and the VAE stay put."""
    c = cfg(sd3_folder, steps=1, weight_decay=0.0, grad_clip=0.0)
    res = train(c, data, tmp_path, progress=False)
    m = load_model(sd3_folder).model
    ds = ImageCaptionDataset(data, 64)
    idx = [i for i, _ in BatchSampler(ds.sizes, 4, c.seed).epoch(0)[0]]
    enc = family_of(m.config).prompt_encoder(m, EmbeddingDB())
    conds = enc.encode([ds.items[i].text for i in idx])
    context = torch.cat([k.context for k in conds])
    pooled = torch.cat([k.pooled for k in conds])
    assert context.shape == (4, 2 * 77, 256) and pooled.shape == (4, 64 + 128)
    gen = torch.Generator().manual_seed(c.seed * 7919)
    u = torch.sigmoid(torch.randn(4, generator=gen))
    sigma = 3.0 * u / (1 + 2.0 * u)
    with torch.no_grad():
        x0 = m.first_stage_model.latent_from_image(torch.stack([ds.image(i) for i in idx]))
    eps = torch.randn(x0.shape, generator=gen)
    net = m.model.diffusion_model
    net.requires_grad_(True)

    def loss_at(s):
        s4 = s.view(-1, 1, 1, 1)
        v = net((1 - s4) * x0 + s4 * eps, s * 1000, context, pooled)
        return (v - (eps - x0)).pow(2).mean()

    loss = loss_at(sigma)
    assert res["losses"] == [pytest.approx(loss.item(), rel=1e-5)]
    # the check can fail: without the shift (σ = u) the loss is another number
    assert abs(loss_at(u).item() - loss.item()) > 1e-3 * loss.item()
    loss.backward()
    lr = c.lr * lr_factor(c, 0)
    trained = res["model"]
    t_net = dict(trained.model.diffusion_model.named_parameters())
    moved = 0
    for name, p in net.named_parameters():
        big = p.grad.abs() > 1e-4  # |g| ≫ Adam's ε: the step is lr in size
        delta = (t_net[name] - p).detach()[big]
        torch.testing.assert_close(delta, -lr * p.grad[big].sign(), rtol=2e-3, atol=1e-8)
        moved += int(big.any())
    assert moved > 0.8 * len(t_net)
    before, after = m.state_dict(), trained.state_dict()
    frozen = [k for k in before if k.startswith(("text_encoders.", "first_stage_model."))]
    assert len(frozen) > 50 and all(torch.equal(before[k], after[k]) for k in frozen)


def test_loss_decreases_and_the_file_loads_and_generates(sd3_folder, data, tmp_path):
    c = cfg(sd3_folder, steps=20, batch_size=8, lr=3e-3, save_dtype="fp32")
    res = train(c, data, tmp_path, progress=False)
    first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
    assert len(res["losses"]) == 20 and last < 0.8 * first, (first, last)
    out = tmp_path / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta[CONFIG_KEY])["family"] == "sd3"  # the config travels with it
    loaded = load_model(out).model
    assert loaded.config.family == "sd3" and loaded.config.shift == 3.0
    trained = params(res["model"].model)
    saved, before = params(loaded.model), params(load_model(sd3_folder).model.model)
    assert all(torch.equal(trained[k], saved[k]) for k in trained)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    eng = Engine.load(out, device="cpu", precision="fp32")
    img = generate(eng, GenerationParams(prompt="a red square", steps=2, seed=1, width=64,
                                         height=64, sampler_name="Euler")).images[0]
    assert img.size == (64, 64)
    first_eng = Engine.load(sd3_folder, device="cpu", precision="fp32")
    img0 = generate(first_eng, GenerationParams(prompt="a red square", steps=2, seed=1,
                                                width=64, height=64,
                                                sampler_name="Euler")).images[0]
    assert img.tobytes() != img0.tobytes()  # the trained weights drew it


def test_resume_reproduces_the_uninterrupted_run(sd3_folder, data, tmp_path):
    c = cfg(sd3_folder, steps=5, batch_size=2, grad_accum=2, ema_decay=0.9, flip=True,
            caption_dropout=0.3, offset_noise=0.1, save_every=2, cache_latents=False)
    full = train(c, data, tmp_path / "a", progress=False)["losses"]
    part = train(c, data, tmp_path / "b", progress=False, stop_after=3)["losses"]
    st = torch.load(find_state(tmp_path / "b") / "trainer.pt", weights_only=True)
    assert st["step"] == 3
    rest = train(c, data, tmp_path / "b", resume=True, progress=False)["losses"]
    assert len(part) == 3 and len(rest) == 2
    torch.testing.assert_close(torch.tensor(part + rest), torch.tensor(full), rtol=0, atol=1e-6)
    a = load_model(tmp_path / "a" / "model.safetensors").model.state_dict()
    b = load_model(tmp_path / "b" / "model.safetensors").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    shadow = torch.load(find_state(tmp_path / "a") / "trainer.pt", weights_only=True)["ema"]
    assert {k.split(".")[0] for k in shadow["shadow"]} == {"model"}  # the MMDiT only


def test_vae_trains_on_the_16_channel_vae(sd3_folder, data, tmp_path):
    c = cfg(sd3_folder, what="vae", steps=2, lr=1e-3, batch_size=4)
    res = train(c, data, tmp_path, progress=False)
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    m = load_model(tmp_path / "model.safetensors").model
    before = load_model(sd3_folder).model
    assert not torch.equal(m.vae.encoder.conv_in.weight, before.vae.encoder.conv_in.weight)
    assert torch.equal(m.model.diffusion_model.final_layer.linear.weight,
                       before.model.diffusion_model.final_layer.linear.weight)
    ds = ImageCaptionDataset(data, 64)
    with torch.no_grad():  # scale_by_std: unit-variance latents from the saved VAE
        z = m.vae.latent_from_image(torch.stack([ds.image(i) for i in range(8)]))
    assert m.config.vae.shift_factor == pytest.approx(0.0609)
    assert z.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("kw, match", [
    (dict(what="full"), "text encoders frozen"),
    (dict(what="lora", lora_text_encoder=True), "text encoder LoRA"),
    (dict(prediction="v"), "rectified-flow"),
    (dict(min_snr_gamma=5.0), "min_snr_gamma"),
    (dict(grad_checkpointing=True), "grad_checkpointing"),
    (dict(resolution=72), "multiples of 16"),
])
def test_refusals(sd3_folder, data, tmp_path, kw, match):
    with pytest.raises(SdloomError, match=match):
        train(cfg(sd3_folder, **kw), data, tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists()


def test_sd3_refusal_lines():
    fam = family_of(type("C", (), {"family": "sd3"})())
    assert fam.training_refusal(None, "unet") is None and fam.training_refusal(None, "vae") is None
    assert "full" in fam.training_refusal(None, "full")
    assert fam.training_refusal(None, "lora") is None
    assert "what=lora" in fam.training_refusal(None, "dreambooth")


# ------------------------------------------------------------------ LoRA on the MMDiT

def _mmdit_inputs(net, seed=0):
    """One fixed (x, t, context, pooled) for the tiny MMDiT."""
    g = torch.Generator().manual_seed(seed)
    c = net.config
    return (torch.randn(2, c.in_channels, 8, 8, generator=g), torch.tensor([250.0, 800.0]),
            torch.randn(2, 10, c.context_dim, generator=g),
            torch.randn(2, c.pooled_dim, generator=g))


# the tiny fixture (2 blocks, no dual attention): block 0 has both streams whole, block 1's
# context stream is pre-only (attn.qkv alone)
TINY_LORA = {f"lora_unet_joint_blocks_{b}_{s}_{m}" for b in (0, 1)
             for s in ("x_block", "context_block")
             for m in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")} \
    - {f"lora_unet_joint_blocks_1_context_block_{m}" for m in ("attn_proj", "mlp_fc1", "mlp_fc2")}


def test_lora_trains_only_adapters_and_its_file_merges_to_the_trained_model(sd3_folder, data,
                                                                             tmp_path):
    c = cfg(sd3_folder, what="lora", steps=4, lr=1e-2, lora_rank=4, lora_alpha=2.0,
            save_dtype="fp32")
    res = train(c, data, tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    base = load_model(sd3_folder).model
    trained = res["model"].eval()
    # (1) everything but the adapters is bit-identical: MMDiT, text encoders, VAE
    before = base.state_dict()
    after = {k.replace(".base.", "."): v for k, v in trained.state_dict().items()
             if ".lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(k.startswith("text_encoders.") for k in before) > 50
    # the kohya file: the chosen MMDiT linears, original paths with `_`, rank 4, alpha 2
    from safetensors import safe_open
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "lora.safetensors"))
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
            for k in sd} == TINY_LORA
    assert len(sd) == 3 * len(TINY_LORA)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert sd[qkv + ".lora_down.weight"].shape == (4, 32)
    assert sd[qkv + ".lora_up.weight"].shape == (96, 4)
    assert sd[qkv + ".alpha"].item() == 2.0
    assert all(sd[k].abs().sum() > 0 for k in sd if k.endswith(".lora_up.weight"))
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    # sd-scripts' model_type for an MMDiT without qk-norm (SD3-medium-like)
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"],
            meta["ss_base_model_version"], meta["ss_v2"]) == \
        ("networks.lora", "4", "2.0", "medium", "False")
    # (2) merged into the base through the engine, the MMDiT computes what the adapters did
    from sdloom.pipelines.engine import Engine
    eng = Engine.load(sd3_folder, device="cpu", precision="fp32")
    net = eng.model.model.diffusion_model
    inputs = _mmdit_inputs(net)
    with torch.no_grad():
        plain = net(*inputs)
        assert eng.set_loras([(str(tmp_path / "lora.safetensors"), 1.0)]) == ["lora"]
        merged = net(*inputs)
        adapted = trained.model.diffusion_model(*inputs)
    assert (merged - plain).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_lora_loss_decreases(sd3_folder, data, tmp_path):
    c = cfg(sd3_folder, what="lora", steps=20, batch_size=8, lr=3e-2, lora_rank=4,
            lora_alpha=4.0)
    losses = train(c, data, tmp_path, progress=False)["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 20 and last < 0.8 * first, (first, last)


def test_lora_resume_reproduces_the_uninterrupted_run(sd3_folder, data, tmp_path):
    c = cfg(sd3_folder, what="lora", steps=5, batch_size=2, grad_accum=2, ema_decay=0.9,
            flip=True, caption_dropout=0.3, offset_noise=0.1, save_every=2, lora_rank=4,
            cache_latents=False, save_dtype="fp32")
    full = train(c, data, tmp_path / "a", progress=False)["losses"]
    part = train(c, data, tmp_path / "b", progress=False, stop_after=3)["losses"]
    assert torch.load(find_state(tmp_path / "b") / "trainer.pt", weights_only=True)["step"] == 3
    rest = train(c, data, tmp_path / "b", resume=True, progress=False)["losses"]
    assert len(part) == 3 and len(rest) == 2
    torch.testing.assert_close(torch.tensor(part + rest), torch.tensor(full), rtol=0, atol=1e-6)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / "lora.safetensors"))
    b = load_file(str(tmp_path / "b" / "lora.safetensors"))
    assert a.keys() == b.keys() == {k for k in a}  # same names
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    shadow = torch.load(find_state(tmp_path / "a") / "trainer.pt", weights_only=True)["ema"]
    assert shadow["shadow"] and all(".lora_" in k for k in shadow["shadow"])  # adapters only


def test_lora_targets_of_an_sd35_medium_like_mmdit():
    """Dual-attention blocks get attn2 adapters too; the version is sd-scripts' "5-medium"
    (qk-norm + dual attention), "5-large" (qk-norm only), "medium" (neither); no adaLN,
    embedder or final-layer adapters; every name is one the SD3 LoRA reader maps."""
    from types import SimpleNamespace
    from sdloom.families.sd3_lora import lora_targets
    from sdloom.models.mmdit import MMDiT, MMDiTConfig
    from sdloom.families.sd3_lora import MMDIT_TARGETS, mmdit_model_version
    from sdloom.training.lora_train import inject_lora
    mc = MMDiTConfig(depth=2, hidden_size=32, num_heads=2, context_dim=16, pooled_dim=8,
                     pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))
    torch.manual_seed(0)
    net = MMDiT(mc)
    reader = SimpleNamespace(model=SimpleNamespace(diffusion_model=MMDiT(mc)),
                             text_encoders=SimpleNamespace(clip_l=None, clip_g=None, t5xxl=None))
    known = lora_targets(reader)
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=net),
                            config=SimpleNamespace(family="sd3"))
    adapters = inject_lora(model, MMDIT_TARGETS, 2, 1.0)
    want = TINY_LORA | {"lora_unet_joint_blocks_0_x_block_attn2_qkv",
                        "lora_unet_joint_blocks_0_x_block_attn2_proj"}
    assert set(adapters) == want and want <= set(known)
    assert not any("adaLN" in k or "embedder" in k or "final" in k for k in adapters)
    assert mmdit_model_version(mc) == "5-medium"
    import dataclasses
    assert mmdit_model_version(dataclasses.replace(mc, dual_attention_layers=())) == "5-large"
    assert mmdit_model_version(dataclasses.replace(mc, qk_norm=False,
                                                   dual_attention_layers=())) == "medium"
