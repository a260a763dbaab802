"""The CLIP byte-level BPE tokenizer (Radford et al. 2021): 49408 tokens, ids exact to OpenAI's.

The vocabulary `bpe_simple_vocab_16e6.txt.gz` is read from an installed registry package
(clip-anytorch or open_clip_torch) without importing it, or from $SDLOOM_CLIP_VOCAB.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from pathlib import Path

import regex
import torch

from .errors import SdloomError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = 49406, 49407
# OpenAI CLIP's pre-tokenizer: specials, contractions, letter runs, single digits, other runs
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def find_vocab() -> Path:
    env = os.environ.get("SDLOOM_CLIP_VOCAB")
    if env:
        if not Path(env).is_file():
            raise SdloomError(f"SDLOOM_CLIP_VOCAB points to a missing file: {env}")
        return Path(env)
    for pkg in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(pkg)  # locates the package without running it
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            p = Path(loc) / VOCAB_NAME
            if p.is_file():
                return p
    raise SdloomError("CLIP vocabulary not found: run `pip install --no-deps clip-anytorch` "
                      f"(it ships {VOCAB_NAME}) or set SDLOOM_CLIP_VOCAB")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def clean(text: str) -> str:
    import ftfy
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Text → CLIP token ids; `__call__` gives padded 77-token windows."""
    bos = BOS
    eos = EOS

    def __init__(self, vocab_path: Path | None = None):
        path = vocab_path or find_vocab()
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        pairs = [tuple(m.split()) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(p) for p in pairs]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {p: i for i, p in enumerate(pairs)}
        self.vocab_size = len(vocab)
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            out: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        for tok in PATTERN.findall(clean(text)):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(tok))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (BOS, EOS))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: list[str], pad_token: int = EOS, max_length: int = 77
                 ) -> torch.Tensor:
        """[B, max_length] ids: BOS, up to max_length-2 tokens (truncated), EOS, padding."""
        out = torch.full((len(texts), max_length), pad_token, dtype=torch.long)
        for b, t in enumerate(texts):
            ids = [BOS] + self.encode(t)[:max_length - 2] + [EOS]
            out[b, :len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()
