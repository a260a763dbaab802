"""The T5 v1.1 SentencePiece Unigram tokenizer (Kudo 2018): 32,100 ids, exact to HF's fast tokenizer.

The data is T5's `tokenizer.json` (Apache-2.0): piece scores and sentencepiece's precompiled
`nmt_nfkc` normalization map. It ships in the `diffsynth==1.1.9` wheel (installed `--no-deps`,
found without importing the package) or is named by $SDLOOM_T5_TOKENIZER. The code is ours and
follows `tokenizers` (what diffusers, ComfyUI and SD3's reference code run): typed specials split
out, the map applied per grapheme cluster, spaces → "▁" with a "▁" prefix, Viterbi over piece
scores, unknown characters → <unk> (runs fused), </s>. sentencepiece itself applies the map by
longest match over the text; the two differ only on odd combining-mark sequences.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import re
import struct
from pathlib import Path

import regex
import torch

from .errors import SdloomError

TOKENIZER_ENV = "SDLOOM_T5_TOKENIZER"
# where diffsynth 1.x keeps T5's files (SD3's tokenizer_3 and Flux's tokenizer_2 hold the same vocab)
_DIFFSYNTH_DIRS = ("tokenizer_configs/stable_diffusion_3/tokenizer_3", "tokenizer_configs/flux/tokenizer_2")
PAD, EOS, UNK = 0, 1, 2
SD3_LENGTH = 256  # diffusers' StableDiffusion3Pipeline max_sequence_length
SPACE = "▁"  # U+2581, sentencepiece's whitespace symbol
UNK_PENALTY = 10.0  # unknown-character score = lowest piece score − 10 (sentencepiece, tokenizers)
_GRAPHEME = regex.compile(r"\X")  # extended grapheme clusters (UAX #29), as unicode-segmentation
_SPACE_RUN = re.compile(" {2,}")


class T5TokenizerNotFound(SdloomError):
    """T5's tokenizer.json is not installed."""


def find_tokenizer_json() -> Path:
    """Path of T5's tokenizer.json: $SDLOOM_T5_TOKENIZER, else inside the diffsynth package."""
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        path = Path(env)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise T5TokenizerNotFound(f"{TOKENIZER_ENV} points to a missing file: {env}")
        return path
    try:
        # find_spec locates the package without running its __init__ (which imports torchvision etc.)
        spec = importlib.util.find_spec("diffsynth")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for sub in _DIFFSYNTH_DIRS:
            path = Path(loc) / sub / "tokenizer.json"
            if path.is_file():
                return path
    raise T5TokenizerNotFound("T5 tokenizer.json not found: run `pip install --no-deps "
                              f"diffsynth==1.1.9`, or set {TOKENIZER_ENV} to the file")


class CharsMap:
    """sentencepiece's precompiled normalization map: a darts-clone double-array trie over UTF-8
    bytes whose values index NUL-terminated replacement strings (normalizer.cc)."""

    def __init__(self, blob: bytes):
        (trie_size,) = struct.unpack_from("<I", blob, 0)
        self.units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self.strings = blob[4 + trie_size:]

    def lookup(self, data: bytes) -> str | None:
        """Replacement of the shortest key that prefixes data (the first hit of darts' common-prefix
        search, as tokenizers' Precompiled takes it), or None."""
        units = self.units
        pos = (units[0] >> 10) << ((units[0] & 0x200) >> 6)  # root's offset
        for c in data:
            pos ^= c
            if pos >= len(units):
                return None
            unit = units[pos]
            if unit & 0x800000FF != c:  # label check: no edge with this byte
                return None
            pos ^= (unit >> 10) << ((unit & 0x200) >> 6)
            if unit >> 8 & 1:  # a key ends here: its value is in the leaf unit
                value = units[pos] & 0x7FFFFFFF
                return self.strings[value:self.strings.index(0, value)].decode("utf-8")
        return None


class T5Tokenizer:
    """encode(text) → ids ending in </s>; encode_padded for SD3's 256-token T5 input."""

    def __init__(self, path: str | os.PathLike | None = None):
        data = json.loads(Path(path or find_tokenizer_json()).read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "Unigram":
            raise SdloomError(f"not a Unigram tokenizer.json: model type {model.get('type')!r}")
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        vocab = model["vocab"]
        self.vocab_size = len(vocab)
        # specials (<pad>, </s>, <unk>, <extra_id_N>) are never matched inside text, as in sentencepiece
        self.pieces = {p: (i, s) for i, (p, s) in enumerate(vocab) if p not in specials}
        self.max_piece = max(map(len, self.pieces))
        self.unk_score = min(s for _, s in self.pieces.values()) - UNK_PENALTY
        self.specials = specials
        # HF's fast tokenizer (what diffusers, ComfyUI and SD3's reference code run) splits typed
        # special tokens out of the text before normalizing; sentencepiece itself does not
        self._special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
        charsmap = None
        norms = data.get("normalizer") or {}
        for norm in norms.get("normalizers", [norms]):
            if norm.get("type") == "Precompiled":
                charsmap = CharsMap(base64.b64decode(norm["precompiled_charsmap"]))
        if charsmap is None:
            raise SdloomError("tokenizer.json has no precompiled normalization map")
        self.charsmap = charsmap
        self._word = functools.lru_cache(maxsize=65536)(self._viterbi)

    def normalize(self, text: str) -> str:
        """tokenizers' T5 normalizer: the charsmap on each grapheme cluster under 6 bytes (else on
        each character), right strip, space runs → one "▁", a "▁" prefix (Metaspace, "always")."""
        out = []
        for g in _GRAPHEME.findall(text):
            rep = self.charsmap.lookup(g.encode("utf-8")) if len(g.encode("utf-8")) < 6 else None
            if rep is not None:
                out.append(rep)
                continue
            for c in g:
                rep = self.charsmap.lookup(c.encode("utf-8"))
                out.append(c if rep is None else rep)  # "" is a replacement: the map drops controls
        text = _SPACE_RUN.sub(SPACE, "".join(out).rstrip()).replace(" ", SPACE)
        return text if not text or text.startswith(SPACE) else SPACE + text

    def _viterbi(self, word: str) -> tuple[int, ...]:
        """Best segmentation of one "▁"-word by summed piece log-probabilities; unknown chars → <unk>."""
        n = len(word)
        best: list[tuple[float, int, int] | None] = [None] * (n + 1)  # (score, start, id) ending at i
        best[0] = (0.0, 0, -1)
        pieces, max_piece = self.pieces, self.max_piece
        for start in range(n):
            base = best[start][0]
            single = False
            for end in range(start + 1, min(n, start + max_piece) + 1):
                hit = pieces.get(word[start:end])
                if hit is None:
                    continue
                single |= end == start + 1
                score = base + hit[1]
                if best[end] is None or score > best[end][0]:
                    best[end] = (score, start, hit[0])
            if not single:  # no one-character piece here: an unknown node (sentencepiece's rule)
                score = base + self.unk_score
                if best[start + 1] is None or score > best[start + 1][0]:
                    best[start + 1] = (score, start, UNK)
        ids, end = [], n
        while end > 0:
            _, start, id_ = best[end]
            if not (id_ == UNK and ids and ids[-1] == UNK):  # a run of unknowns is one <unk>
                ids.append(id_)
            end = start
        return tuple(reversed(ids))

    def _encode_text(self, text: str) -> list[int]:
        norm = self.normalize(text)
        ids: list[int] = []
        # no piece has "▁" after its first character, so words segment independently
        for word in norm.split(SPACE)[1:]:
            for id_ in self._word(SPACE + word):
                if not (id_ == UNK and ids and ids[-1] == UNK):
                    ids.append(id_)
        return ids

    def encode(self, text: str, *, parse_special: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of text, </s> appended. parse_special: typed `</s>`, `<extra_id_0>` … are
        their ids, as in HF's fast tokenizer; False treats them as text, as sentencepiece does."""
        if not parse_special:
            ids = self._encode_text(text)
        else:
            ids, pos = [], 0
            for m in self._special_re.finditer(text):
                ids += self._encode_text(text[pos:m.start()])
                ids.append(self.specials[m.group()])
                pos = m.end()
            ids += self._encode_text(text[pos:])
        return ids + [EOS] if add_eos else ids

    def encode_padded(self, text: str, length: int = SD3_LENGTH) -> list[int]:
        """SD3's T5 input (diffusers: padding="max_length", truncation=True, add_special_tokens):
        at most length−1 text ids, then </s>, then <pad> (0) to length."""
        ids = self.encode(text, add_eos=False)[:length - 1] + [EOS]
        return ids + [PAD] * (length - len(ids))

    def __call__(self, texts: str | list[str], length: int = SD3_LENGTH) -> torch.Tensor:
        """Padded ids of one or more prompts as a LongTensor [B, length]."""
        texts = [texts] if isinstance(texts, str) else texts
        return torch.tensor([self.encode_padded(t, length) for t in texts], dtype=torch.long)

