"""T5: the Unigram tokenizer against HF's fast tokenizer and sentencepiece on the same files, and
the v1.1 encoder against transformers' T5EncoderModel on random weights (strict load, same keys)."""
import random
import unicodedata

import pytest
import torch

from sdloom.t5_tokenizer import EOS, PAD, T5Tokenizer, T5TokenizerNotFound, find_tokenizer_json

try:
    TOKENIZER_JSON = find_tokenizer_json()
except T5TokenizerNotFound:
    TOKENIZER_JSON = None
needs_vocab = pytest.mark.skipif(TOKENIZER_JSON is None, reason="pip install --no-deps diffsynth==1.1.9")

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
    names from the `emoji` package when installed), CJK and other scripts, long prompts."""
    rng = random.Random(0)
    emojis, names = ["😀", "🍎", "👩‍🔬", "🏳️‍🌈", "👍🏽", "🇫🇷", "❤️", "🐱"], []
    try:
        import emoji
        data = sorted(emoji.EMOJI_DATA.items())
        emojis += [e for e, _ in rng.sample(data, 300)]
        names += [d["en"] for _, d in rng.sample(data, 300)]
    except ImportError:
        pass
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
        if r < 0.93 and names:
            return rng.choice(names)
        return rng.choice(EXOTIC)
    seps = [" ", ", ", ",", "  ", " , ", "\n", ". ", "; ", "|"]
    texts = list(EXOTIC) + [" ".join(WORDS), ", ".join(WORDS * 5)]
    while len(texts) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 30, 90])
        texts.append("".join(piece() + rng.choice(seps) for _ in range(k)).strip(rng.choice(["", " ,"])))
    return texts


@pytest.fixture(scope="module")
def tok():
    if TOKENIZER_JSON is None:
        pytest.skip("T5 tokenizer.json not installed (pip install --no-deps diffsynth==1.1.9)")
    return T5Tokenizer(TOKENIZER_JSON)


@needs_vocab
def test_golden_ids(tok):
    assert tok.encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert tok.encode("") == [EOS]
    assert tok.encode("😀 🐱🐱") == [3, 2, 3, 2, EOS]  # unknown characters, a run fused into one <unk>
    assert tok.vocab_size == 32100


@needs_vocab
def test_matches_hf_fast_tokenizer(tok):
    """Same ids as tokenizers' Tokenizer on the same tokenizer.json (what diffusers runs)."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(TOKENIZER_JSON))
    texts = corpus() + ["a</s>b", "<extra_id_0> x <pad><unk>", "x </s> ", "</s>"]
    assert len(texts) >= 500
    bad = [t for t in texts if tok.encode(t) != hf.encode(t).ids]
    assert not bad, f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"


@needs_vocab
def test_matches_auto_tokenizer_and_sd3_padding(tok):
    """transformers' AutoTokenizer on the folder, called as diffusers' SD3 pipeline calls it:
    max_length 256, padding, truncation keeping </s>."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_JSON.parent))
    texts = ["a photo of a cat", ", ".join(WORDS * 8), "", "猫 😀 (x:1.2)"]
    want = hf(texts, padding="max_length", max_length=256, truncation=True,
              add_special_tokens=True, return_tensors="pt").input_ids
    got = tok(texts)
    assert got.shape == (4, 256) and torch.equal(got, want)
    assert got[1, -1] == EOS and got[0, 8] == PAD  # the long one is truncated to 255 + </s>


@needs_vocab
def test_matches_sentencepiece(tok):
    """sentencepiece on spiece.model; typed specials are text there (parse_special=False)."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_JSON.parent / "spiece.model"))
    texts = corpus() + ["a</s>b", "<extra_id_0> <pad>"]
    bad = [t for t in texts if tok.encode(t, parse_special=False) != sp.encode(t) + [EOS]]
    assert not bad, f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"


@needs_vocab
def test_normalizer_is_not_plain_nfkc(tok):
    """sentencepiece's map, not NFKC: zero-width characters become spaces, controls vanish."""
    for text, want in [("a\u200bb", "▁a▁b"), ("a\ufeffb", "▁a▁b"), ("a\x07b", "▁ab")]:
        assert unicodedata.normalize("NFKC", text) == text and tok.normalize(text) == want
    assert tok.normalize("  ｆｕｌｌ\t\u3000x  ") == "▁full▁x"


def test_missing_vocab_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLOOM_T5_TOKENIZER", str(tmp_path / "nope.json"))
    with pytest.raises(T5TokenizerNotFound, match="SDLOOM_T5_TOKENIZER"):
        find_tokenizer_json()
