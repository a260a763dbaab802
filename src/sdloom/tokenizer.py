"""The CLIP byte-level BPE tokenizer (Radford et al. 2021): 49408 tokens, ids exact to OpenAI's.

The vocabulary `bpe_simple_vocab_16e6.txt.gz` is read from an installed package (clip-anytorch
or open_clip_torch) found without importing it, or from the file named by $SDLOOM_CLIP_VOCAB.
SD1/SDXL CLIP-L and SD2/SDXL OpenCLIP share these ids; they differ only in the pad token.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
from collections.abc import Iterable
from pathlib import Path

import regex
import torch

from .errors import SdloomError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "SDLOOM_CLIP_VOCAB"
BOS, EOS = 49406, 49407
SPECIALS = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
N_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48894 merges of the file
# OpenAI CLIP's pre-tokenizer: specials, contractions, letter runs, single digits, other runs
PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
_SPACES = re.compile(r"\s+")


class VocabNotFound(SdloomError):
    """The CLIP BPE vocabulary file is not installed."""


def find_vocab() -> Path:
    """Path of the BPE vocabulary: $SDLOOM_CLIP_VOCAB, else inside clip-anytorch or open_clip."""
    env = os.environ.get(VOCAB_ENV)
    if env:
        if not Path(env).is_file():
            raise VocabNotFound(f"{VOCAB_ENV} points to a missing file: {env}")
        return Path(env)
    for pkg in ("clip", "open_clip"):
        try:
            # find_spec locates the package without running its __init__ (clip's imports
            # torchvision, which may be missing or built for another torch)
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            path = Path(loc) / VOCAB_NAME
            if path.is_file():
                return path
    raise VocabNotFound(f"CLIP tokenizer vocabulary {VOCAB_NAME} not found: run "
                        f"`pip install --no-deps clip-anytorch`, or set {VOCAB_ENV} to the file")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (Radford et al. 2019)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:  # unprintable bytes get characters above 255, in byte order
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clean(text: str) -> str:
    """OpenAI CLIP's text cleanup: ftfy, HTML unescape (twice), whitespace collapse, lowercase."""
    import ftfy  # imported on first use: it costs ~50 ms of CLI start-up
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _SPACES.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """Text → CLIP token ids; `__call__` gives BOS/EOS-framed, padded 77-token rows."""
    bos = BOS
    eos = EOS

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path else find_vocab()
        try:
            text = gzip.open(path).read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise VocabNotFound(f"cannot read the CLIP vocabulary {path}: {e}") from None
        # line 0 is a version header; the merges follow, one "a b" pair per line
        merges = text.split("\n", N_MERGES + 1)[1:N_MERGES + 1]
        if len(merges) != N_MERGES:
            raise VocabNotFound(f"{path} holds {len(merges)} merges, expected {N_MERGES}")
        self.byte_encoder = bytes_to_unicode()
        singles = list(self.byte_encoder.values())
        vocab = singles + [c + "</w>" for c in singles] + [m.replace(" ", "") for m in merges]
        vocab += list(SPECIALS)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.vocab_size = len(vocab)
        # keyed by "a b" strings, not tuples: building 48894 tuples is the slowest part of loading
        self.ranks = {m: i for i, m in enumerate(merges)}
        self._decoder: dict[int, str] | None = None
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_word)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (already byte-encoded): merge the lowest-ranked pair until none."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = -1, len(ranks)
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + " " + parts[i + 1], best_rank)
                if r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            first, second = parts[best], parts[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        enc = self.byte_encoder
        for tok in PATTERN.findall(clean(text)):
            if tok in SPECIALS:
                ids.append(SPECIALS[tok])
            else:
                ids.extend(self._bpe("".join(enc[b] for b in tok.encode("utf-8"))))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (BOS/EOS dropped); word ends become spaces."""
        if self._decoder is None:
            self._decoder = {i: t for t, i in self.encoder.items()}
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self._decoder[int(i)] for i in ids if int(i) not in (BOS, EOS))
        raw = bytearray(byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: list[str] | str, pad_token: int = EOS, max_length: int = 77
                 ) -> torch.Tensor:
        """LongTensor [B, max_length]: BOS, up to max_length-2 tokens (truncated), EOS, pad."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), max_length), pad_token, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS, *self.encode(text)[:max_length - 2], EOS]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


@functools.cache
def get_tokenizer() -> CLIPTokenizer:
    """The process-wide tokenizer (loaded once, on first use)."""
    return CLIPTokenizer()
