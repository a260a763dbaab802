"""The CLIP tokenizer: golden ids, parity with transformers on the same vocabulary, padding."""
import gzip

import ftfy
import pytest
import torch

from sdloom.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode, find_vocab, get_tokenizer

TEXTS = ["a photo of a cat", "A PHOTO OF A CAT!!", "masterpiece, best quality, 1girl",
         "an astronaut riding a horse on mars, 4k, trending on artstation",
         "it's the dog's bone — don't you think?", "café naïve résumé", "🍎 red apple 🍏",
         "thumbs up: medium-dark skin tone", "1234567890 3.14159", "(word:1.3) [x] {y} <z>",
         "hello\nworld\ttabs", "&amp; &lt;html&gt;", "日本語のテキスト", "emoji 👩‍🔬 zwj",
         "   spaces   everywhere   ", "", "a" * 100, "x-ray, t-shirt, e-mail", "’curly’ quotes",
         "a_b_c snake_case", "@user #hashtag $100 50% off"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_golden_ids(tok):
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.vocab_size == 49408
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"


def test_matches_transformers_on_same_vocab(tok):
    transformers = pytest.importorskip("transformers")
    merges = gzip.open(find_vocab()).read().decode("utf-8").split("\n")[1:48895]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ref = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=pairs,
                                     model_max_length=77)
    for t in TEXTS:
        want = ref(ftfy.fix_text(t), truncation=True, max_length=77)["input_ids"]
        assert [BOS] + tok.encode(t)[:75] + [EOS] == want, t


def test_truncation_and_padding(tok):
    long = " ".join(["cat"] * 100)
    ids = tok([long, "cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS and ids[0, 76] == EOS and (ids[0, 1:76] == 2368).all()
    assert ids[1, :3].tolist() == [BOS, 2368, EOS] and (ids[1, 3:] == EOS).all()  # SD1 pads EOS
    sd2 = tok(["cat"], pad_token=0)
    assert sd2[0, :3].tolist() == [BOS, 2368, EOS] and (sd2[0, 3:] == 0).all()  # OpenCLIP pads 0


def test_missing_vocab_is_a_clear_error(monkeypatch, tmp_path):
    from sdloom.errors import SdloomError
    monkeypatch.setenv("SDLOOM_CLIP_VOCAB", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(SdloomError, match="SDLOOM_CLIP_VOCAB"):
        CLIPTokenizer()
