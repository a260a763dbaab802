"""The CLIP tokenizer: golden ids, parity with transformers on the same vocabulary, padding,
and how the vocabulary file is found."""
import gzip
import importlib.util
import shutil
import sys

import ftfy
import pytest

from sdloom.errors import SdloomError
from sdloom.tokenizer import (BOS, EOS, CLIPTokenizer, VocabNotFound, bytes_to_unicode,
                              find_vocab, get_tokenizer)

TEXTS = [
    "a photo of a cat", "A PHOTO OF A CAT!!", "masterpiece, best quality, 1girl",
    "an astronaut riding a horse on mars, 4k, trending on artstation",
    "it's the dog's bone — don't you think?", "they're we've I'm you'll he'd", "café naïve résumé",
    "🍎 red apple 🍏", "thumbs up: medium-dark skin tone", "1234567890 3.14159 -42 1e5",
    "(word:1.3) [x] {y} <z>", "hello\nworld\ttabs", "&amp; &lt;html&gt;", "日本語のテキスト",
    "emoji 👩‍🔬 zwj 🏳️‍🌈", "   spaces   everywhere   ", "", "a" * 100, "x-ray, t-shirt, e-mail",
    "’curly’ quotes and “doubles”", "a_b_c snake_case CamelCase", "@user #hashtag $100 50% off",
    "Ünïcödé ÀÉÎÕÜ straße", "Привет мир", "مرحبا بالعالم", "\u00a0non\u2009breaking\u3000spaces",
    "mixed123numbers456", "!!!???...,,,;;;", "ﬁ ligature and ½ fraction", "<|endoftext|> inside",
    "url https://example.com/path?q=1&b=2", " ".join(["long"] * 90),
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_golden_ids(tok):
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode(",") == [267]  # the comma A1111's chunking looks for
    assert tok.encode("<|endoftext|>") == [EOS]  # a special, not its letters
    assert tok.vocab_size == 49408 and (tok.bos, tok.eos) == (49406, 49407)
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"
    # "🍎," is one pre-token (a run of non-letters), so no space inside it
    assert tok.decode(tok.encode("Café 🍎, it's")) == "café 🍎, it 's"


def test_matches_transformers_on_same_vocab(tok):
    import transformers
    merges = gzip.open(find_vocab()).read().decode("utf-8").split("\n")[1:48895]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ref = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=pairs,
                                     model_max_length=77)
    # transformers 5 normalises without ftfy and html.unescape; give it text ftfy already fixed
    want = ref([ftfy.fix_text(t) for t in TEXTS], truncation=True, max_length=77)["input_ids"]
    got = tok(TEXTS)
    for t, w, g in zip(TEXTS, want, got):
        assert g[:len(w)].tolist() == w, t
        assert (g[len(w):] == EOS).all(), t


def test_truncation_and_padding(tok):
    long = " ".join(["cat"] * 100)
    ids = tok([long, "cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS and ids[0, 76] == EOS and (ids[0, 1:76] == 2368).all()
    assert ids[1, :3].tolist() == [BOS, 2368, EOS] and (ids[1, 3:] == EOS).all()  # SD1 pads EOS
    sd2 = tok(["cat"], pad_token=0)
    assert sd2[0, :3].tolist() == [BOS, 2368, EOS] and (sd2[0, 3:] == 0).all()  # OpenCLIP pads 0
    short = tok("cat cat cat", max_length=4)  # a plain str is one row
    assert short.tolist() == [[BOS, 2368, 2368, EOS]]


def test_vocab_found_without_importing_clip(monkeypatch):
    monkeypatch.delitem(sys.modules, "clip", raising=False)
    path = find_vocab()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz"
    assert "clip" not in sys.modules  # clip/__init__ imports torchvision, which may be broken


def test_vocab_env_override(monkeypatch, tmp_path):
    copy = tmp_path / "vocab.txt.gz"
    shutil.copy(find_vocab(), copy)
    monkeypatch.setenv("SDLOOM_CLIP_VOCAB", str(copy))
    assert find_vocab() == copy
    assert CLIPTokenizer().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_missing_vocab_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLOOM_CLIP_VOCAB", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(SdloomError, match="SDLOOM_CLIP_VOCAB"):
        CLIPTokenizer()
    monkeypatch.delenv("SDLOOM_CLIP_VOCAB")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VocabNotFound, match="pip install --no-deps clip-anytorch"):
        find_vocab()
