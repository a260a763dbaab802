"""T5: the Unigram tokenizer against HF's fast tokenizer and sentencepiece on the same files, and
the v1.1 encoder against transformers' T5EncoderModel on random weights (strict load, same keys)."""
import copy
import random
import unicodedata

import emoji
import pytest
import sentencepiece
import torch
import transformers
from tokenizers import Tokenizer

from sdloom.errors import ModelFileError
from sdloom.models import t5 as t5_module
from sdloom.models.t5 import T5Config, T5Encoder
from sdloom.t5_tokenizer import EOS, PAD, T5Tokenizer, T5TokenizerNotFound, find_tokenizer_json

WORDS = ("masterpiece best quality 1girl solo portrait of an astronaut riding a horse on mars "
         "highly detailed 8k uhd trending artstation cinematic lighting bokeh photorealistic "
         "octane render unreal engine by greg rutkowski alphonse mucha watercolor oil painting "
         "cyberpunk city at night neon rain reflections sharp focus intricate elegant concept art "
         "don't it's low-res jpeg_artifacts bad_hands extra-fingers blurry 35mm f/1.8 ISO100 "
         "café naïve résumé straße Ærøskøbing Zürich São_Paulo").split()
SYNTAX = ["({}:1.2)", "(({}))", "[{}]", "{{{}}}", "[{}:{}:0.5]", "[{}|{}]", "<lora:{}:0.8>",
          "{} BREAK", "{} AND", "({}:0.7)", "{}...", "\"{}\"", "'{}'", "#{}", "@{}", "{}!?", "{}, ",
          "{}/{}", "{}_{}", "{}-{}", "{}™", "{}®", "{}°C", "${}", "{}%", "{}×{}", "«{}»", "“{}”", "‘{}’"]
EXOTIC = ["猫", "日本語のテキスト", "一只可爱的猫，高清", "고양이 사진", "Привет мир", "Γειά σου",
          "مرحبا", "שלום", "नमस्ते", "ภาษาไทย", "ｆｕｌｌ　ｗｉｄｔｈ", "ﬁﬂ ligatures", "½ ¼ ² ³ ①②",
          "ｶﾀｶﾅ", "e\u0301 decomposed", "x\u200by zero width", "a\u200d\u200cb", "\ufeffbom",
          "\u00a0nbsp\u2009thin\u3000ideographic", "tab\tand\nnewline\r\n", "™ © ℃ № ℡", "…‥",
          "𝐛𝐨𝐥𝐝 𝔣𝔯𝔞𝔨", "Ⅻ ⅷ", "ǅ ǈ", "İstanbul ıi", "ß ẞ", "\x07bell\x1b", "‐‑‒–—―", "∞ ≠ ≤ √",
          "▁meta▁space", "  ", "", "x", "😀", "👩‍🔬", "🏳️‍🌈", "👍🏽", "🇯🇵", "❤️", "1️⃣"]


def corpus(n: int = 600) -> list[str]:
    """Prompt-like strings: A1111 weights and brackets, digits, punctuation, emoji (with emoji
    names from the `emoji` package), CJK and other scripts, long prompts."""
    rng = random.Random(0)
    emojis = ["😀", "🍎", "👩‍🔬", "🏳️‍🌈", "👍🏽", "🇫🇷", "❤️", "🐱"]
    data = sorted(emoji.EMOJI_DATA.items())
    emojis += [e for e, _ in rng.sample(data, 300)]
    names = [d["en"] for _, d in rng.sample(data, 300)]
    def piece() -> str:
        r = rng.random()
        if r < 0.55:
            return rng.choice(WORDS)
        if r < 0.75:
            return rng.choice(SYNTAX).format(rng.choice(WORDS), rng.choice(WORDS))
        if r < 0.82:
            return str(rng.choice([rng.randint(0, 10**6), round(rng.uniform(-10, 10), 3)]))
        if r < 0.89:
            return rng.choice(emojis) * rng.randint(1, 3)
        if r < 0.93:
            return rng.choice(names)
        return rng.choice(EXOTIC)
    seps = [" ", ", ", ",", "  ", " , ", "\n", ". ", "; ", "|"]
    texts = list(EXOTIC) + [" ".join(WORDS), ", ".join(WORDS * 5)]
    while len(texts) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 30, 90])
        texts.append("".join(piece() + rng.choice(seps) for _ in range(k)).strip(rng.choice(["", " ,"])))
    return texts


def random_unicode(n: int = 1500) -> list[str]:
    """Strings of random code points from many blocks: combining marks, compatibility forms,
    controls, variation selectors, tags, Hangul jamo, Indic, emoji."""
    rng = random.Random(1)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2100, 0x22FF),
              (0x2460, 0x24FF), (0x3000, 0x30FF), (0x4E00, 0x4E80), (0xAC00, 0xAC50),
              (0xFE00, 0xFE0F), (0xFF00, 0xFFEF), (0x1D400, 0x1D4FF), (0x1F300, 0x1F64F),
              (0x0, 0x1F), (0xE0000, 0xE007F)]
    return ["".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 20)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok_json():
    """T5's tokenizer.json: without it the tests fail saying what to install, never skip."""
    try:
        return find_tokenizer_json()
    except T5TokenizerNotFound as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def tok(tok_json):
    return T5Tokenizer(tok_json)


def test_golden_ids(tok):
    assert tok.encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert tok.encode("") == [EOS]
    assert tok.encode("😀 🐱🐱") == [3, 2, 3, 2, EOS]  # unknown characters, a run fused into one <unk>
    assert tok.vocab_size == 32100


def test_matches_hf_fast_tokenizer(tok, tok_json):
    """Same ids as tokenizers' Tokenizer on the same tokenizer.json (what diffusers runs)."""
    hf = Tokenizer.from_file(str(tok_json))
    texts = corpus() + ["a</s>b", "<extra_id_0> x <pad><unk>", "x </s> ", "</s>"]
    assert len(texts) >= 500
    bad = [t for t in texts if tok.encode(t) != hf.encode(t).ids]
    assert not bad, f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"
    texts = random_unicode()
    bad = [t for t in texts if tok.encode(t) != hf.encode(t).ids]
    assert not bad, f"{len(bad)}/{len(texts)} random strings differ, e.g. {bad[:3]!r}"
    # tokenizers maps a whole grapheme cluster by its first map entry, dropping the accent here;
    # sentencepiece would keep it as <unk> ([361, 2, 1])
    assert tok.encode("ﬁ\u0301") == hf.encode("ﬁ\u0301").ids == [361, EOS]


def test_matches_auto_tokenizer_and_sd3_padding(tok, tok_json):
    """transformers' AutoTokenizer on the folder, called as diffusers' SD3 pipeline calls it:
    max_length 256, padding, truncation keeping </s>."""
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_json.parent))
    texts = ["a photo of a cat", ", ".join(WORDS * 8), "", "猫 😀 (x:1.2)"]
    want = hf(texts, padding="max_length", max_length=256, truncation=True,
              add_special_tokens=True, return_tensors="pt").input_ids
    got = tok(texts)
    assert got.shape == (4, 256) and torch.equal(got, want)
    assert got[1, -1] == EOS and got[0, 8] == PAD  # the long one is truncated to 255 + </s>


def test_matches_sentencepiece(tok, tok_json):
    """sentencepiece on spiece.model; typed specials are text there (parse_special=False)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_json.parent / "spiece.model"))
    texts = corpus() + ["a</s>b", "<extra_id_0> <pad>"]
    bad = [t for t in texts if tok.encode(t, parse_special=False) != sp.encode(t) + [EOS]]
    assert not bad, f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"


def test_normalizer_is_not_plain_nfkc(tok):
    """sentencepiece's map, not NFKC: zero-width characters become spaces, controls vanish."""
    for text, want in [("a\u200bb", "▁a▁b"), ("a\ufeffb", "▁a▁b"), ("a\x07b", "▁ab")]:
        assert unicodedata.normalize("NFKC", text) == text and tok.normalize(text) == want
    assert tok.normalize("  ｆｕｌｌ\t\u3000x  ") == "▁full▁x"


def test_missing_vocab_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLOOM_T5_TOKENIZER", str(tmp_path / "nope.json"))
    with pytest.raises(T5TokenizerNotFound, match="SDLOOM_T5_TOKENIZER"):
        find_tokenizer_json()


# ------------------------------------------------------------------ the encoder

TINY = T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, vocab_size=100)


def hf_config(cfg: T5Config) -> transformers.T5Config:
    return transformers.T5Config(
        d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, vocab_size=cfg.vocab_size, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_and_ours():
    """transformers' T5EncoderModel with every parameter random (norms too) and ours loaded
    strictly from its state dict, key names unchanged."""
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(hf_config(TINY)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(hf.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    sd = hf.state_dict()
    ours = T5Encoder(TINY).eval()
    ours.load_state_dict(sd, strict=True)  # shared.weight and the tied encoder.embed_tokens copy
    return hf, ours, sd


def ids_batch(length: int = 200) -> torch.Tensor:
    # 200 > max_distance 128, so the far, log-spaced and clipped buckets are all used
    return torch.randint(0, TINY.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


def test_encoder_matches_transformers(hf_and_ours):
    hf, ours, _ = hf_and_ours
    ids = ids_batch()
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        got = ours(ids)
        mask = torch.ones_like(ids)
        mask[1, 150:] = 0
        want_masked = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got_masked = ours(ids, attention_mask=mask)
    assert got.shape == (2, 200, TINY.d_model)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_masked, want_masked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got_masked[1], got[1], atol=1e-3)  # the mask changed something


def test_state_dict_keys_are_transformers_keys(hf_and_ours):
    _, ours, sd = hf_and_ours
    assert set(ours.state_dict()) == set(sd) - {"encoder.embed_tokens.weight"}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in sd
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in sd
    # SD3 files keep only one of the tied embedding copies: either name loads
    only_alias = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in sd.items()
                  if k != "encoder.embed_tokens.weight"}
    model = T5Encoder(T5Config.detect({k: tuple(v.shape) for k, v in only_alias.items()}))
    model.load_state_dict(only_alias)  # strict: the alias is read as `shared`
    assert model.cfg == TINY and torch.equal(model.shared.weight, sd["shared.weight"])


def test_permuted_relative_bias_changes_the_output(hf_and_ours):
    """Negative control: the test above sees the position bias (rows permuted → different)."""
    _, ours, sd = hf_and_ours
    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    bad = dict(sd)
    bad[key] = sd[key].roll(1, dims=0)
    wrong = T5Encoder(TINY).eval()
    wrong.load_state_dict(bad)
    ids = ids_batch()
    with torch.no_grad():
        assert (wrong(ids) - ours(ids)).abs().max() > 1e-2


def test_bucket_direction_matters(hf_and_ours, monkeypatch):
    """Negative control: buckets computed for i − j instead of j − i give other outputs."""
    hf, _, sd = hf_and_ours
    ids = ids_batch()
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        right = t5_module.relative_position_bucket
        monkeypatch.setattr(t5_module, "relative_position_bucket", lambda rel, n, d: right(-rel, n, d))
        flipped_model = T5Encoder(TINY).eval()
        flipped_model.load_state_dict(sd)
        flipped = flipped_model(ids)
    assert (flipped - want).abs().max() > 1e-2


def test_buckets_match_transformers():
    rel = torch.arange(-300, 301)
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128)
    got = t5_module.relative_position_bucket(rel, 32, 128)
    assert torch.equal(got, want) and got.min() == 0 and got.max() == 31
    assert got[300 + 3] == 16 + 3 and got[300 - 3] == 3  # exact near 0, the sign picks the half


def test_fp16_keeps_wo_in_fp32():
    """wo outputs past the fp16 range: ours in fp16 stays finite and close to fp32."""
    cfg = T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=100)
    torch.manual_seed(0)
    model = T5Encoder(cfg).eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wi_1.weight.mul_(10.0)
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)  # still in fp16's range
    ids = ids_batch(16)
    with torch.no_grad():
        ref = model(ids)
        ff = model.encoder.block[0].layer[1].DenseReluDense
        x = model.encoder.block[0].layer[1].layer_norm(model.shared(ids))
        assert ff(x).abs().max() > 65504  # would overflow fp16
        half = model.half()
        out = half(ids)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_detect_tiny_and_xxl(hf_and_ours):
    _, _, sd = hf_and_ours
    assert T5Config.detect({k: tuple(v.shape) for k, v in sd.items()}) == TINY
    xxl = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
    with torch.device("meta"):
        hf = transformers.T5EncoderModel(hf_config(xxl))
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert T5Config.detect(shapes) == xxl == T5Config()
    with torch.device("meta"):  # d_kv is not d_model / heads in general (T5-XL-like: 32 heads × 64)
        odd = T5Config(d_model=48, d_kv=6, d_ff=40, num_layers=2, num_heads=5, vocab_size=64)
        hf = transformers.T5EncoderModel(hf_config(odd))
    assert T5Config.detect({k: tuple(v.shape) for k, v in hf.state_dict().items()}) == odd


def test_detection_of_a_broken_state_dict_is_one_line(hf_and_ours):
    # (files that do not fit the detected model are refused by the generic loader, which
    # lists missing, unexpected and mis-shaped keys: tests/test_errors_models.py)
    with pytest.raises(ModelFileError, match="missing key 'encoder.block.0.layer.0") as e:
        T5Config.detect({"shared.weight": (100, 32)})
    assert "\n" not in str(e.value)


def test_fp16_matches_transformers_with_wo_in_fp32(hf_and_ours):
    """transformers' fp16 recipe (_keep_in_fp32_modules = ["wo"]) and ours on a half() model."""
    hf, ours, _ = hf_and_ours
    hf16, ours16 = copy.deepcopy(hf).half(), copy.deepcopy(ours).half()
    for block in hf16.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    ids = ids_batch(40)
    with torch.no_grad():
        want, got, ref = hf16(input_ids=ids).last_hidden_state, ours16(ids), ours(ids)
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=3e-2, rtol=1e-2)  # SDPA vs eager fp16 rounding
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)
