"""A1111 prompt syntax: emphasis, editing schedules, 77-token chunks, embeddings, and encoding
into conditioning, checked on tiny fake text encoders against hand computations."""
import pytest
import torch
from torch import nn

from sdloom.config import TextEncoderConfig
from sdloom.errors import SdloomError
from sdloom.prompts import (Conditioning, EmbeddingDB, PromptEncoder, cond_at_step,
                            load_embedding, stack_conds,
                            parse_prompt_attention, prompt_schedule, split_and,
                            tokenize_prompt)
from sdloom.tokenizer import BOS, EOS, get_tokenizer



def encode(pe, prompts, clip_skip=1):
    """A batch of prompts → one Conditioning, as the pipeline stacks them."""
    return stack_conds(pe.encode(prompts, clip_skip))


CAT, DOG, A, COMMA = 2368, 1929, 320, 267


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


# ------------------------------------------------------------------ emphasis parser

@pytest.mark.parametrize("text, want", [
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]] (y:0.5)", [("x", 1 / 1.1 / 1.1), (" ", 1.0), ("y", 0.5)]),
    ("((x:2))", [("x", 2 * 1.1)]),
    ("( x : 1.3 )", [(" x ", 1.3)]),
    (r"\(a\) \[b\] c\\d", [(r"(a) [b] c\d", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a BREAKfast", [("a BREAKfast", 1.0)]),  # only the whole uppercase word
    ("a break b", [("a break b", 1.0)]),
    ("(a", [("a", 1.1)]),  # unclosed: applies to the end
    ("a)", [("a)", 1.0)]),  # unopened: literal
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
    ("a:b", [("a:b", 1.0)]),
    ("x (y:z) w", [("x ", 1.0), ("y:z", 1.1), (" w", 1.0)]),  # not a number: literal colon
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("", [("", 1.0)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
])
def test_parse_prompt_attention(text, want):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_break_inside_brackets_stays_a_break():
    # A1111 would scale the marker to -1.1 and then encode the word "break"; we keep the break
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1), ("b", 1.1)]


# ------------------------------------------------------------------ editing schedules

@pytest.mark.parametrize("prompt, steps, want", [
    ("a cat", 20, [(20, "a cat")]),
    ("[a:b:10]", 20, [(10, "a"), (20, "b")]),
    ("[a:b:0.25]", 20, [(5, "a"), (20, "b")]),  # decimal point: a fraction of the steps
    ("[a:b:.5]", 10, [(5, "a"), (10, "b")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),  # added after step 3
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b::3]", 10, [(3, "a b"), (10, "a ")]),  # removed after step 3
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),  # nested
    ("[[a|b]:c:3]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[a|b]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[a|b|c] x", 3, [(1, "a x"), (2, "b x"), (3, "c x")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),  # emphasis passes through verbatim
    ("(x [a:b:2])", 4, [(2, "(x a)"), (4, "(x b)")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[a:b:30]", 20, [(20, "a")]),  # clamped to the step count
    ("[a:b:c]", 10, [(10, "[a:b:c]")]),  # not a number: plain text
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[x:y:2] a | b", 10, [(10, "[x:y:2] a | b")]),  # "|" outside [..|..]: whole prompt is text
    (r"[\[x\]:y:2]", 4, [(2, r"\[x\]"), (4, "y")]),
])
def test_prompt_schedule(prompt, steps, want):
    assert prompt_schedule(prompt, steps) == want


def test_schedule_number_rules_and_hires():
    # A1111 ≥ 1.6: a decimal point makes a fraction even above 1; "old" reads N < 1 as a fraction
    assert prompt_schedule("[a:b:1.5]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:1.5]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, old_scheduling=True) == [(5, "a"), (10, "b")]
    # hires pass of 10 steps after 20: integers count on from 20, fractions from 1.0
    assert prompt_schedule("[a:b:25]", 20, hires_steps=10) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.3]", 20, hires_steps=10) == [(3, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 20, hires_steps=10) == [(10, "b")]


def test_cond_at_step_uses_a1111_boundaries():
    sched = [(2, "a"), (4, "b")]
    # sampling steps are 0-based against 1-based ends: step 2 still uses the first entry
    assert [cond_at_step(sched, s) for s in range(5)] == ["a", "a", "a", "b", "b"]


# ------------------------------------------------------------------ chunks

def test_long_prompt_makes_two_chunks(tok):
    chunks = tokenize_prompt(" ".join(["cat"] * 100), tok)
    assert len(chunks) == 2
    assert chunks[0].tokens == [BOS] + [CAT] * 75 + [EOS]
    assert chunks[1].tokens == [BOS] + [CAT] * 25 + [EOS] * 51
    assert all(len(c.tokens) == len(c.weights) == 77 for c in chunks)


def test_weights_per_token(tok):
    (c,) = tokenize_prompt("a (cat:1.5) [dog]", tok)
    assert c.tokens[:5] == [BOS, A, CAT, DOG, EOS]
    assert c.weights[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert c.weights[5:] == [1.0] * 72  # padding is never weighted


def test_break_and_empty(tok):
    chunks = tokenize_prompt("a cat BREAK a dog", tok)
    assert [c.tokens[:4] for c in chunks] == [[BOS, A, CAT, EOS], [BOS, A, DOG, EOS]]
    (empty,) = tokenize_prompt("", tok)
    assert empty.tokens == [BOS] + [EOS] * 76


def test_comma_backtrack(tok):
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = tokenize_prompt(text, tok)
    # the chunk would overflow 5 tokens after a comma: the dogs all move to the next chunk
    assert first.tokens[:72] == [BOS] + [CAT] * 70 + [COMMA] and first.tokens[72:] == [EOS] * 5
    assert second.tokens[:12] == [BOS] + [DOG] * 10 + [EOS]
    first, second = tokenize_prompt(text, tok, comma_backtrack=0)
    assert first.tokens[71:77] == [COMMA, DOG, DOG, DOG, DOG, EOS]
    assert second.tokens[:8] == [BOS] + [DOG] * 6 + [EOS]
    # a comma more than 20 tokens back is too far: a plain cut at 75
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)
    first, second = tokenize_prompt(far, tok)
    assert first.tokens[52:77] == [DOG] * 24 + [EOS]
    assert second.tokens[:8] == [BOS] + [DOG] * 6 + [EOS]


# ------------------------------------------------------------------ fake text encoders

class FakeEncoder(nn.Module):
    """The text-encoder contract on a toy network: pooled = projection at the first EOS."""
    # a causal running mean makes each state depend on the tokens before it, as in CLIP

    def __init__(self, width: int, pooled_dim: int | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(49408, width)
        self.pos = nn.Parameter(torch.randn(77, width, generator=g))
        self.mix = nn.Linear(width, width)
        self.proj = nn.Linear(width, pooled_dim) if pooled_dim else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.calls: list[dict] = []

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)

    def forward(self, ids, clip_skip=1, inputs_embeds=None):
        self.calls.append({"ids": ids.clone(), "clip_skip": clip_skip, "embeds": inputs_embeds})
        x = self.token_embedding(ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(x + self.pos)) + 0.5 * clip_skip  # non-zero mean
        h = h.cumsum(1) / torch.arange(1, 78)[:, None]
        pooled = None
        if self.proj is not None:
            pooled = self.proj(h[torch.arange(len(ids)), ids.argmax(-1)])
        return h, pooled


def _cfg(width, **kw):
    return TextEncoderConfig(width=width, layers=1, heads=1, **kw)


def _raw(enc, tokens, pad=EOS):
    """The encoder's unweighted output for one chunk of ids (the hand computation's input)."""
    ids = torch.tensor([tokens])
    if pad != EOS:
        ids[0, tokens.index(EOS) + 1:] = pad
    with torch.no_grad():
        return enc.forward(ids)


def test_emphasis_original_matches_hand_computation(tok):
    enc = FakeEncoder(8)
    pe = PromptEncoder(tok, [enc], [_cfg(8)])
    cond = encode(pe, ["a (cat:1.5) [dog]"])
    assert cond.context.shape == (1, 77, 8) and cond.pooled is None
    z, _ = _raw(enc, [BOS, A, CAT, DOG] + [EOS] * 73)
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    weighted = z * w[None, :, None]
    want = weighted * (z.mean() / weighted.mean())
    torch.testing.assert_close(cond.context, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond.context, weighted, atol=1e-4)  # the mean was restored
    # "No norm" keeps the raw product; unweighted prompts pass through unchanged
    nonorm = encode(PromptEncoder(tok, [enc], [_cfg(8)], emphasis="No norm"), ["a (cat:1.5) [dog]"])
    torch.testing.assert_close(nonorm.context, weighted, rtol=1e-5, atol=1e-6)
    plain = encode(pe, ["a cat dog"]).context
    torch.testing.assert_close(plain, _raw(enc, [BOS, A, CAT, DOG] + [EOS] * 73)[0])
    # the mean is restored per prompt: a batch neighbour does not change a prompt's encoding
    batch = encode(pe, ["a (cat:1.5) [dog]", "(((cat))) dog"])
    torch.testing.assert_close(batch.context[:1], want, rtol=1e-5, atol=1e-6)


def test_pad_token_follows_config(tok):
    sd1, sd2 = FakeEncoder(8), FakeEncoder(8, seed=1)
    encode(PromptEncoder(tok, [sd1], [_cfg(8, pad_token=EOS)]), ["a cat"])
    encode(PromptEncoder(tok, [sd2], [_cfg(8, pad_token=0)]), ["a cat"])
    assert sd1.calls[0]["ids"][0].tolist() == [BOS, A, CAT] + [EOS] * 74
    assert sd2.calls[0]["ids"][0].tolist() == [BOS, A, CAT, EOS] + [0] * 73


def test_schedule_texts_pad_with_empty_chunks_and_batches_repeat_the_last_vector(tok):
    # A1111 encodes one prompt's editing texts together (shorter ones get empty chunks), and
    # stacks the prompts of a batch by repeating each shorter one's last token vector
    enc = FakeEncoder(8)
    pe = PromptEncoder(tok, [enc], [_cfg(8)])
    long = " ".join(["cat"] * 80)
    (_, first), (_, second) = pe.encode_scheduled([f"[{long}:dog:2]"], steps=4)[0]
    empty, dog = pe.encode([""])[0], pe.encode(["dog"])[0]
    assert first.chunks == second.chunks == 2
    torch.testing.assert_close(second.context[0, :77], dog.context[0])
    torch.testing.assert_close(second.context[0, 77:], empty.context[0])
    both = stack_conds([dog, first])
    assert both.context.shape == (2, 154, 8)
    torch.testing.assert_close(both.context[0, :77], dog.context[0])
    assert torch.equal(both.context[0, 77:], dog.context[0, -1:].expand(77, -1))
    assert torch.equal(both.context[1], first.context[0])


def test_encode_scheduled_encodes_each_text_once(tok):
    enc = FakeEncoder(8)
    pe = PromptEncoder(tok, [enc], [_cfg(8)])
    out = pe.encode_scheduled(["a [cat:dog:2]", "a cat"], steps=4, clip_skip=2)
    assert len(enc.calls) == 1 and len(enc.calls[0]["ids"]) == 2  # "a cat", "a dog"
    assert enc.calls[0]["clip_skip"] == 2
    (e1, c1), (e2, c2) = out[0]
    assert (e1, e2) == (2, 4) and out[1][0][0] == 4
    assert out[1][0][1] is c1  # the same text shares its encoding
    torch.testing.assert_close(c2.context, pe.encode(["a dog"], clip_skip=2)[0].context)
    assert not torch.allclose(c1.context, c2.context)


def test_sdxl_two_encoders_concatenate_and_pool_from_the_pooled_one(tok):
    clip_l, big_g = FakeEncoder(6, pooled_dim=5, seed=1), FakeEncoder(10, pooled_dim=4, seed=2)
    cfgs = [_cfg(6, layout="hf"), _cfg(10, layout="openclip", pad_token=0, pooled=True)]
    pe = PromptEncoder(tok, [clip_l, big_g], cfgs)
    text = " ".join(["cat"] * 80)  # two chunks: pooled must come from the first
    cond = encode(pe, [text])
    assert cond.context.shape == (1, 154, 16) and cond.pooled.shape == (1, 4)
    first = [BOS] + [CAT] * 75 + [EOS]
    z_l, _ = _raw(clip_l, first)
    z_g, pooled_g = _raw(big_g, first, pad=0)
    torch.testing.assert_close(cond.context[:, :77, :6], z_l)
    torch.testing.assert_close(cond.context[:, :77, 6:], z_g)
    torch.testing.assert_close(cond.pooled, pooled_g)
    # emphasis restores each encoder's own mean, as A1111 wraps each SDXL encoder apart
    cond = encode(pe, ["(cat:1.4) dog"])
    ids = [BOS, CAT, DOG] + [EOS] * 74
    w = torch.ones(1, 77, 1)
    w[0, 1] = 1.4
    z_l, z_g = _raw(clip_l, ids)[0], _raw(big_g, ids, pad=0)[0]
    for z, cols in ((z_l, slice(0, 6)), (z_g, slice(6, 16))):
        torch.testing.assert_close(cond.context[..., cols], z * w * (z.mean() / (z * w).mean()),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ textual inversion

def test_embeddings_from_pt_and_safetensors_replace_input_embeddings(tok, tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    pt_vecs, st_vecs = torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.save({"string_to_param": {"*": nn.Parameter(pt_vecs)}, "name": "ignored", "step": 5},
               tmp_path / "mystyle.pt")
    save_file({"emb_params": st_vecs}, str(tmp_path / "otherthing.safetensors"))
    db = EmbeddingDB()
    db.load_dir(tmp_path)
    assert sorted(e.name for e in db) == ["mystyle", "otherthing"] and not db.errors
    enc = FakeEncoder(8)
    pe = PromptEncoder(tok, [enc], [_cfg(8)], db)
    cond = encode(pe, ["a (mystyle:1.2) cat otherthing"])
    call = enc.calls[-1]
    ids, embeds = call["ids"][0], call["embeds"][0]
    assert ids[:9].tolist() == [BOS, A, 0, 0, CAT, 0, 0, 0, EOS]  # 2 + 3 vector slots
    torch.testing.assert_close(embeds[2:4], pt_vecs)
    torch.testing.assert_close(embeds[5:8], st_vecs)
    torch.testing.assert_close(embeds[[0, 1, 4, 8]], enc.emb(ids[[0, 1, 4, 8]]))
    (chunk,) = pe.tokenize("a (mystyle:1.2) cat otherthing")
    assert chunk.weights[1:5] == pytest.approx([1.0, 1.2, 1.2, 1.0])
    assert set(pe.used_embeddings(["a (mystyle:1.2) cat otherthing"])) == {"mystyle",
                                                                        "otherthing"}
    # without the embeddings the same words are ordinary tokens with another result
    plain = encode(PromptEncoder(tok, [FakeEncoder(8)], [_cfg(8)]), ["a (mystyle:1.2) cat otherthing"])
    assert not torch.allclose(plain.context, cond.context)


def test_sdxl_embedding_and_skipped_sd1_embedding(tok, tmp_path):
    from safetensors.torch import save_file
    vec_l, vec_g = torch.randn(2, 6), torch.randn(2, 10)
    save_file({"clip_l": vec_l, "clip_g": vec_g}, str(tmp_path / "xlstyle.safetensors"))
    save_file({"emb_params": torch.randn(1, 6)}, str(tmp_path / "sdonestyle.safetensors"))
    db = EmbeddingDB()
    db.load_dir(tmp_path)
    xl = db.embeddings["xlstyle"]
    assert set(xl.vectors) == {"clip_l", "clip_g"} and xl.count == 2
    encs = [FakeEncoder(6, seed=1), FakeEncoder(10, pooled_dim=4, seed=2)]
    cfgs = [_cfg(6, layout="hf"), _cfg(10, layout="openclip", pad_token=0, pooled=True)]
    pe = PromptEncoder(tok, encs, cfgs, db)
    assert pe.skipped_embeddings == ["sdonestyle"]  # one tensor does not fit two encoders
    encode(pe, ["xlstyle sdonestyle"])
    torch.testing.assert_close(encs[0].calls[-1]["embeds"][0, 1:3], vec_l)
    torch.testing.assert_close(encs[1].calls[-1]["embeds"][0, 1:3], vec_g)
    n_text = len(tok.encode("sdonestyle"))
    assert encs[1].calls[-1]["ids"][0, 3:3 + n_text].tolist() == tok.encode("sdonestyle")


class _NotAllowed:
    pass


def test_embedding_loading_is_safe_and_errors_are_clear(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": _NotAllowed()},
               tmp_path / "evil.pt")
    # a pickled class is refused, never constructed, and the message names it
    with pytest.raises(SdloomError, match="evil.pt: refused to load.*_NotAllowed.*never runs"):
        load_embedding(tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "twoterms.pt")
    db = EmbeddingDB()
    db.load_dir(tmp_path)
    assert len(db) == 0 and len(db.errors) == 3
    one = tmp_path / "concept.bin"
    torch.save({"<my-concept>": torch.arange(4.0)}, one)  # a diffusers concept: one 1-D vector
    emb = load_embedding(one)
    assert emb.name == "concept" and emb.vectors["*"].shape == (1, 4)


def test_conditioning_to_keeps_pooled():
    c = Conditioning(torch.zeros(2, 77, 3), torch.ones(2, 4)).to(dtype=torch.float64)
    assert c.context.dtype == c.pooled.dtype == torch.float64 and c.chunks == 1


@pytest.mark.parametrize("prompt, parts", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("cat AND dog : -1.5 AND  bird:.25 ", [("cat", 1.0), (" dog", -1.5), ("  bird", 0.25)]),
    ("cat:1.2", [("cat", 1.2)]),           # A1111: a trailing weight even without AND
    ("(cat:1.2)", [("(cat:1.2)", 1.0)]),   # emphasis is not a part weight
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),  # AND is a whole word
    ("cat and dog", [("cat and dog", 1.0)]),         # and in lower case is text
])
def test_split_and(prompt, parts):
    assert split_and(prompt) == parts
