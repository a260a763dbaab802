"""SD3 conditioning against diffusers' StableDiffusion3Pipeline.encode_prompt on tiny random
encoders (CLIP-L with an identity projection, as single files store it; CLIP-G; T5), plus the
A1111 rules diffusers lacks: T5 off → zeros, emphasis on the joint L ‖ G tensor only, long
prompts and prompt-editing schedules with T5 at 77·k tokens, CLIP-L's unprojected pool."""
import pytest
import torch

from sdloom.families.keymaps.clip import normalize_hf_clip
from sdloom.prompts import apply_emphasis
from sdloom.sd3_conditioning import T5_ALIAS, SD3PromptEncoder, SD3TextEncoders
from sdloom.t5_tokenizer import T5Tokenizer, find_tokenizer_json
from sdloom.tokenizer import get_tokenizer

import transformers  # noqa: E402  (a test requirement: missing, the test fails)
import diffusers  # noqa: E402  (a test requirement: missing, the test fails)

WL, WG, WT = 64, 128, 256  # CLIP-L, CLIP-G, T5 (= context) widths; heads of 64 as the real ones
LONG = ", ".join(f"a {w} cat" for w in ("red", "blue", "green", "small", "fat", "old", "young",
                                         "happy", "sad", "tall", "wild", "calm", "shy", "odd",
                                         "bold", "wise", "lazy", "quick", "proud", "dark", "pale",
                                         "soft", "loud", "tiny", "cold", "warm", "grey", "pink"))


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """randn·0.3 for every parameter, norms included, so a swapped key or a skipped norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _clip(width: int, act: str, seed: int, identity: bool):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width,
                                      intermediate_size=4 * width, num_hidden_layers=3,
                                      num_attention_heads=width // 64, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=width, bos_token_id=49406,
                                      eos_token_id=49407)
    m = _randomize(transformers.CLIPTextModelWithProjection(cfg), seed)
    if identity:
        with torch.no_grad():
            m.text_projection.weight.copy_(torch.eye(width))
    return m


def _single_file(te1, te2, te3=None) -> dict[str, torch.Tensor]:
    sd = {f"text_encoders.clip_l.transformer.{k}": v
          for k, v in normalize_hf_clip(te1.state_dict()).items()}
    sd |= {f"text_encoders.clip_g.transformer.{k}": v
           for k, v in normalize_hf_clip(te2.state_dict()).items()}
    if te3 is not None:
        sd |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in te3.state_dict().items()}
    return {k: v.clone() for k, v in sd.items()}


def _encoders(sd: dict[str, torch.Tensor], use_t5: bool = True) -> SD3TextEncoders:
    """The encoders of a single file's tensors, detected from shapes and loaded strictly."""
    sd = {k[len("text_encoders."):]: v for k, v in sd.items()}
    if not use_t5:
        sd = {k: v for k, v in sd.items() if not k.startswith("t5xxl.")}
    m = SD3TextEncoders(*SD3TextEncoders.detect({k: tuple(v.shape) for k, v in sd.items()},
                                                use_t5))
    m.load_state_dict(sd)  # strict; the T5 token table's tied copy is read as `shared`
    return m.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sdloom.families.sd_diffusers import write_clip_tokenizer
    from sdloom.sd3_conditioning import CLIP_G_SD3, CLIP_L_SD3
    te1 = _clip(WL, "quick_gelu", 1, identity=True)
    te2 = _clip(WG, "gelu", 2, identity=False)
    t5cfg = transformers.T5Config(vocab_size=32128, d_model=WT, d_kv=32, d_ff=2 * WT, num_layers=2,
                                  num_heads=4, feed_forward_proj="gated-gelu",
                                  relative_attention_num_buckets=32,
                                  relative_attention_max_distance=128)
    te3 = _randomize(transformers.T5EncoderModel(t5cfg), 3)
    root = tmp_path_factory.mktemp("sd3tok")
    write_clip_tokenizer(root / "tokenizer", CLIP_L_SD3)
    write_clip_tokenizer(root / "tokenizer_2", CLIP_G_SD3)
    tok1 = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    tok2 = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    tok3 = transformers.AutoTokenizer.from_pretrained(find_tokenizer_json().parent)
    assert (tok1.pad_token_id, tok2.pad_token_id) == (49407, 0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3)
    encs = _encoders(_single_file(te1, te2, te3))
    clip_tok, t5_tok = get_tokenizer(), T5Tokenizer()
    pe = SD3PromptEncoder(clip_tok, encs, t5_tok, context_dim=WT)
    pe_off = SD3PromptEncoder(clip_tok, encs, t5_tok, context_dim=WT, use_t5=False)
    return dict(te1=te1, te2=te2, te3=te3, tok3=tok3, pipe=pipe, encs=encs, pe=pe, pe_off=pe_off)


def _t5_oracle(s, text: str, length: int) -> torch.Tensor:
    ids = s["tok3"](text, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return s["te3"](ids).last_hidden_state


@pytest.mark.parametrize("prompt", ["a photo of a cat", "a red BMX bike on a hill, oil painting",
                                    ""])
def test_matches_diffusers_encode_prompt(setup, prompt):
    with torch.no_grad():
        ctx, _, pooled, _ = setup["pipe"].encode_prompt(
            prompt, prompt_2=None, prompt_3=None, max_sequence_length=77,
            do_classifier_free_guidance=False)
    c = setup["pe"].encode([prompt])[0]
    assert c.context.shape == ctx.shape == (1, 154, WT)
    assert c.pooled.shape == pooled.shape == (1, WL + WG)
    torch.testing.assert_close(c.context, ctx, atol=1e-4, rtol=0)
    torch.testing.assert_close(c.pooled, pooled, atol=1e-4, rtol=0)
    assert c.context[0, :77, WL + WG:].abs().max() == 0  # zero padding of L ‖ G
    assert c.context[0, 77:].abs().max() > 0.1  # the T5 part carries T5's output


def test_state_dict_keys_are_single_file_keys(setup):
    sd = _single_file(setup["te1"], setup["te2"], setup["te3"])
    file_keys = {k[len("text_encoders."):] for k in sd} - {T5_ALIAS}
    assert set(setup["encs"].state_dict()) == file_keys
    assert "clip_g.transformer.text_projection.weight" in file_keys
    no_t5 = _encoders(sd, use_t5=False)
    assert no_t5.t5xxl is None and not any(k.startswith("t5xxl") for k in no_t5.state_dict())


def test_t5_disabled_gives_zeros_and_same_clip_part(setup):
    prompt = "a photo of a (cat:1.3), BREAK oil painting"
    on, off = setup["pe"].encode([prompt])[0], setup["pe_off"].encode([prompt])[0]
    assert off.context.shape == on.context.shape == (1, 4 * 77, WT)
    assert torch.equal(off.context[:, 2 * 77:], torch.zeros(1, 2 * 77, WT))
    assert torch.equal(off.context[:, :2 * 77], on.context[:, :2 * 77])
    assert torch.equal(off.pooled, on.pooled)
    assert on.context[:, 2 * 77:].abs().max() > 0.1


def test_emphasis_on_joint_clip_part_t5_ignores_weights(setup):
    pe = setup["pe"]
    plain, weighted = pe.encode(["a photo of a cat", "a photo of a (cat:1.5)"])
    # T5: the syntax is removed, the weight dropped
    assert pe.t5_ids("a photo of a (cat:1.5)", 77) == pe.t5_ids("a photo of a cat", 77)
    assert torch.equal(weighted.context[:, 77:], plain.context[:, 77:])
    # CLIP: A1111's Original emphasis over the whole zero-padded L ‖ G tensor of the chunk
    w = torch.tensor(pe.tokenize("a photo of a (cat:1.5)")[0].weights)
    assert w[5] == 1.5 and (w[torch.arange(77) != 5] == 1).all()  # BOS a photo of a cat
    z = plain.context[0, :77]
    want = z * w[:, None]
    want = want * (z.mean() / want.mean())
    torch.testing.assert_close(weighted.context[0, :77], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(weighted.context[0, :77], z, atol=1e-3)
    # not SDXL's rule (each encoder's mean restored apart): that would give another tensor
    per = torch.cat([apply_emphasis(z[None, :, :WL], w[None])[0],
                     apply_emphasis(z[None, :, WL:WL + WG], w[None])[0]], -1)
    assert not torch.allclose(weighted.context[0, :77, :WL + WG], per, atol=1e-4)
    assert torch.equal(weighted.pooled, plain.pooled)  # emphasis never touches the pooled


def test_long_prompt_two_chunks_t5_at_154(setup):
    pe = setup["pe"]
    assert len(pe.tokenize(LONG)) == 2
    c = pe.encode([LONG])[0]
    assert c.context.shape == (1, 4 * 77, WT)
    torch.testing.assert_close(c.context[:, 154:], _t5_oracle(setup, LONG, 154), atol=1e-4, rtol=0)
    ids = pe.t5_ids(LONG, 154)
    assert ids.count(1) == 1 and ids[-1] == 0  # one </s>, then pads: the prompt fits 154
    # each CLIP chunk is its own 77-token window: the second is not the first
    assert not torch.allclose(c.context[:, :77], c.context[:, 77:154], atol=1e-3)
    # pooled from the first chunk, as A1111
    first = pe.encode_chunks(pe.tokenize(LONG)[:1])[1]
    torch.testing.assert_close(c.pooled, first, atol=1e-5, rtol=1e-5)


def test_t5_truncated_to_token_count(setup):
    ids = setup["pe"].t5_ids(LONG, 20)
    assert len(ids) == 20 and 1 not in ids  # cut before </s>, as A1111's tokenize_line


def test_scheduled_texts_share_chunk_count_with_t5_at_that_count(setup):
    pe = setup["pe"]
    (sched,) = pe.encode_scheduled([f"[cat:{LONG}:2]"], steps=4)
    assert [end for end, _ in sched] == [2, 4]
    first, second = sched[0][1], sched[1][1]
    assert first.context.shape == second.context.shape == (1, 4 * 77, WT)
    cat, empty = pe.encode(["cat"])[0], pe.encode([""])[0]
    torch.testing.assert_close(first.context[:, :77], cat.context[:, :77], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.context[:, 77:154], empty.context[:, :77],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.context[:, 154:], _t5_oracle(setup, "cat", 154),
                               atol=1e-4, rtol=0)
    # T5 at 154 tokens is not T5 at 77 with something appended: pads are attended
    assert not torch.allclose(first.context[:, 154:231], cat.context[:, 77:], atol=1e-3)
    torch.testing.assert_close(first.pooled, cat.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.context, pe.encode([LONG])[0].context, atol=1e-5, rtol=1e-5)


def test_clip_l_pooled_is_unprojected(setup):
    """Negative control: with a non-identity CLIP-L projection, the projected pool (what
    diffusers feeds) differs from A1111's unprojected one, which we take."""
    te1 = _clip(WL, "quick_gelu", 1, identity=False)
    encs = _encoders(_single_file(te1, setup["te2"]))
    pe = SD3PromptEncoder(get_tokenizer(), encs, context_dim=WT, use_t5=False)
    pooled = pe.encode(["a photo of a cat"])[0].pooled
    ids = torch.tensor([pe.tokenize("a photo of a cat")[0].tokens])
    with torch.no_grad():
        out = te1(ids)
        unprojected = te1.text_model(ids).pooler_output
    torch.testing.assert_close(pooled[:, :WL], unprojected, atol=1e-5, rtol=0)
    assert (pooled[:, :WL] - out.text_embeds).abs().max() > 0.1
    # the identity projection of the main fixture makes the two agree (diffusers = A1111 there)
    torch.testing.assert_close(setup["te1"].text_projection.weight, torch.eye(WL))


def test_sdxl_embedding_files_fit_both_clips(setup):
    """An SDXL embedding ({clip_l, clip_g}) puts its vectors in each CLIP's input, as the oracle
    does with those vectors written into its token table; a one-tensor SD1 file is skipped."""
    import copy

    from sdloom.prompts import Embedding, EmbeddingDB
    g = torch.Generator().manual_seed(5)
    vec = {"clip_l": torch.randn(2, WL, generator=g), "clip_g": torch.randn(2, WG, generator=g)}
    db = EmbeddingDB([Embedding("mystyle", vec), Embedding("sd1only", {"*": torch.randn(1, 768)})])
    pe = SD3PromptEncoder(get_tokenizer(), setup["encs"], context_dim=WT, use_t5=False,
                          embeddings=db)
    assert pe.skipped_embeddings == ["sd1only"]
    assert set(pe.used_embeddings(["a photo of mystyle"])) == {"mystyle"}
    c = pe.encode(["a photo of mystyle"])[0]
    tok = get_tokenizer()
    words = tok.encode("a photo of")
    x, y = 1000, 1001  # any two ids: their table rows become the embedding's vectors
    for key, te, lo, hi, pad in (("clip_l", setup["te1"], 0, WL, 49407),
                                 ("clip_g", setup["te2"], WL, WL + WG, 0)):
        ref = copy.deepcopy(te)
        with torch.no_grad():
            ref.text_model.embeddings.token_embedding.weight[[x, y]] = vec[key]
        ids = [tok.bos, *words, x, y, tok.eos]
        ids = torch.tensor([ids + [pad] * (77 - len(ids))])
        with torch.no_grad():
            want = ref(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(c.context[:, :77, lo:hi], want, atol=1e-4, rtol=0)
