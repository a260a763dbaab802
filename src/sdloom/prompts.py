"""A1111 prompt syntax → weighted 77-token chunks → conditioning tensors.

Emphasis `(x)`, `(x:1.3)`, `[x]`, escapes and `BREAK`; composable `a AND b:0.5`; prompt editing
`[a:b:N]`, `[a:N]`, `[a::N]` and alternation `[a|b]`; prompts longer than 75 tokens as several 77-token chunks encoded apart
and concatenated; textual-inversion embeddings; "Original" emphasis (weights, then the mean
restored). Semantics follow A1111's prompt_parser.py, sd_hijack_clip.py, sd_emphasis.py and
textual_inversion.py (docs/a1111.md); the code is our own.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelFileError, SdloomError
from .io import load_torch_weights, one_line

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK = 75  # prompt tokens per chunk; +BOS +EOS = 77
COMMA_BACKTRACK = 20  # A1111 "comma_padding_backtrack" default
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
BREAK = ("BREAK", -1.0)

# ------------------------------------------------------------------ emphasis

# one token per alternative: escapes, brackets, a `:weight)` closer, text runs, a lone colon
_ATTN = re.compile(r"""
    \\[()\[\]\\] | \\ | \( | \[
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)
  | \) | ] | [^\\()\[\]:]+ | :""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111 emphasis: [(text, weight)] runs, equal neighbours merged; BREAK gives ("BREAK", -1)."""
    res: list[list] = []  # [text, weight, is_break]
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for r in res[start:]:
            # deliberately unlike A1111, whose scaling of BREAK's -1 marker inside brackets
            # turns it into the word "break" with a negative weight
            if not r[2]:
                r[1] *= by

    for m in _ATTN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):  # an escape; a lone backslash is dropped, as in A1111
            res.append([tok[1:], 1.0, False])
        elif tok == "(":
            rounds.append(len(res))
        elif tok == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif tok == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif tok == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:  # plain text, an unmatched closer or a stray ":"
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append([*BREAK, True])
                res.append([part, 1.0, False])
    # brackets never closed still apply to everything after them
    for pos in rounds:
        scale(pos, ROUND)
    for pos in squares:
        scale(pos, SQUARE)
    merged: list[list] = []
    for r in res:
        if merged and not r[2] and not merged[-1][2] and merged[-1][1] == r[1]:
            merged[-1][0] += r[0]
        else:
            merged.append(r)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


# ------------------------------------------------------------------ prompt editing

@dataclass
class _Sched:
    before: list | None  # None for `[a:N]` (nothing before N)
    after: list
    number: str  # as written: "10", "0.5", ".25"


@dataclass
class _Alt:
    options: list[list]


class _NoParse(Exception):
    """The text is not a well-formed edit construct (A1111: a lark parse error)."""


_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^(.*?)\s*:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion (Liu et al. 2022) in A1111's syntax: `a AND b:0.5` → [("a", 1.0),
    ("b", 0.5)]. Each part is a prompt of its own; guidance sums the parts' directions,
    u + scale·Σ wᵢ·(cᵢ − u). As in A1111, a trailing `:N` is a part's weight even without AND
    (`(x:1.2)` is emphasis, not a weight); negative prompts are never split."""
    out = []
    for part in _AND.split(prompt):
        m = _AND_WEIGHT.match(part)
        out.append((m.group(1), float(m.group(2))) if m else (part.rstrip(), 1.0))
    return out


# lark's SIGNED_NUMBER, with the optional whitespace A1111 allows around it
_NUMBER = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*")


class _EditParser:
    """Recursive descent over A1111's prompt-editing grammar (its lark grammar, by hand)."""
    # Inside brackets everything must be well-formed. At the top level a bracket or colon that
    # starts nothing usable is plain text. A `|` outside an alternation, or a `\` with nothing
    # after it, is a parse error, and A1111 then uses the whole prompt as plain text.

    def __init__(self, text: str):
        self.s = text

    def top(self) -> list:
        s, out, i = self.s, [], 0
        while i < len(s):
            c = s[i]
            if c in "[(":
                try:
                    node, i = self.construct(i)
                except _NoParse:
                    node, i = c, i + 1
                out.append(node)
            elif c in "]):":
                out.append(c)
                i += 1
            else:
                text, i = self.plain(i)
                out.append(text)
        return out

    def plain(self, i: int) -> tuple[str, int]:
        """A run of text with its `\\x` escapes kept (parse_prompt_attention reads them later)."""
        s, start = self.s, i
        while i < len(s) and s[i] not in "[]():|":
            if s[i] == "\\":
                if i + 1 >= len(s) or s[i + 1] == "\n":
                    raise _NoParse
                i += 1
            i += 1
        if i == start:  # "|" where no alternation is open
            raise _NoParse
        return s[start:i], i

    def prompt(self, i: int) -> tuple[list, int]:
        out: list = []
        while i < len(self.s) and self.s[i] not in "]):|":
            if self.s[i] in "[(":
                node, i = self.construct(i)
            else:
                node, i = self.plain(i)
            out.append(node)
        return out, i

    def construct(self, i: int) -> tuple[object, int]:
        s = self.s
        opener = s[i]
        closer = "]" if opener == "[" else ")"
        parts: list[tuple[list, int, int]] = []  # (nodes, start, end)
        seps: list[str] = []
        j = i + 1
        while True:
            nodes, end = self.prompt(j)
            parts.append((nodes, j, end))
            if end >= len(s) or s[end] not in closer + ":|":
                raise _NoParse
            if s[end] == closer:
                j = end + 1
                break
            seps.append(s[end])
            j = end + 1
        if not seps:  # emphasis: kept as written
            return [opener, *parts[0][0], closer], j
        if opener == "(":
            if seps != [":"]:
                raise _NoParse
            return ["(", *parts[0][0], ":", *parts[1][0], ")"], j
        if set(seps) == {"|"}:
            return _Alt([p[0] for p in parts]), j
        if set(seps) == {":"} and len(parts) in (2, 3):
            _, start, end = parts[-1]
            m = _NUMBER.fullmatch(s, start, end)
            if m:
                before = parts[0][0] if len(parts) == 3 else None
                return _Sched(before, parts[-2][0], m.group(1)), j
        raise _NoParse


def _walk(nodes: list) -> Iterable[_Sched | _Alt]:
    for n in nodes:
        if isinstance(n, list):
            yield from _walk(n)
        elif isinstance(n, _Sched):
            yield n
            yield from _walk([n.before or [], n.after])
        elif isinstance(n, _Alt):
            yield n
            yield from _walk(n.options)


def _render(nodes: list, step: int, when: Callable[[str], int]) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, list):
            out.append(_render(n, step, when))
        elif isinstance(n, _Sched):
            out.append(_render((n.before or []) if step <= when(n.number) else n.after, step, when))
        else:
            out.append(_render(n.options[(step - 1) % len(n.options)], step, when))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    old_scheduling: bool = False) -> list[tuple[int, str]]:
    """A1111's prompt-editing timeline [(end_at_step, text)], steps counted from 1."""
    # `[a:b:N]` shows a up to step N, then b; `[a:N]` adds a after N; `[a::N]` removes it after
    # N; `[a|b]` alternates every step. N with a decimal point is a fraction of the steps, else a
    # step number (A1111 ≥ 1.6; `old_scheduling`: N < 1 is a fraction). For a hires pass,
    # `hires_steps` counts N on from the first pass: integers from `steps`, fractions from 1.0.
    if hires_steps is None or old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _EditParser(prompt).top()
    except (_NoParse, RecursionError):
        return [(total, prompt)]

    def when(number: str) -> int:
        v = float(number)
        if old_scheduling:
            v = v * total if v < 1 else v
        elif "." in number:
            v = (v - frac_offset) * total
        else:
            v = v - int_offset
        return int(max(-1.0, min(float(total), v)))  # clamped first: "1e999" is inf

    ends = {total}
    for n in _walk(nodes):
        if isinstance(n, _Alt):
            ends.update(range(1, total + 1))
        elif when(n.number) >= 1:
            ends.add(when(n.number))
    return [(t, _render(nodes, t, when)) for t in sorted(ends)]


# ------------------------------------------------------------------ textual inversion

def _ti_key(cfg) -> str:
    """A1111's per-encoder key in SDXL embedding files (SD1/SD2 files hold one tensor)."""
    if cfg.layout == "hf":
        return "clip_l"
    return "clip_g" if cfg.pooled else "clip_h"


@dataclass(eq=False)
class Embedding:
    """A textual-inversion embedding: n vectors per text encoder, used where its name is typed."""
    name: str
    # "*" for single-tensor files (SD1/SD2); "clip_l" and "clip_g" for SDXL files
    vectors: dict[str, torch.Tensor]
    path: Path | None = None

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @functools.cached_property
    def shorthash(self) -> str | None:
        """First 12 hex digits of the file's sha256, as A1111's "TI hashes" infotext."""
        if self.path is None or not self.path.is_file():
            return None
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]

    def for_encoder(self, cfg) -> torch.Tensor | None:
        """[n, width] vectors for a text encoder config, or None if this file has none."""
        v = self.vectors.get(_ti_key(cfg), self.vectors.get("*"))
        return v if v is not None and v.shape[-1] == cfg.width else None

    def usable_with(self, configs: list) -> bool:
        """Whether the file fits the model exactly, as A1111 checks (else it is "skipped")."""
        if "*" in self.vectors:
            return len(configs) == 1 and self.for_encoder(configs[0]) is not None
        return (set(self.vectors) == {_ti_key(c) for c in configs}
                and all(self.for_encoder(c) is not None for c in configs))


def load_embedding(path: str | Path) -> Embedding:
    """Read an A1111 textual-inversion file (.pt, .bin, .safetensors); its name is the stem."""
    # .pt: {"string_to_param": {"*": [n, D]}}; .safetensors: {"emb_params": [n, D]} or SDXL's
    # {"clip_l": [n, 768], "clip_g": [n, 1280]}; diffusers concepts: {"<token>": [D]}
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        try:
            data = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' own errors: a damaged or foreign file
            raise ModelFileError(f"cannot read embedding {path.name}: {one_line(e, path)}"
                                 ) from None
    else:  # pickles only through the weights-only unpickler: no code runs from the file
        try:
            data = load_torch_weights(path)
        except SdloomError:
            raise
        except Exception as e:
            raise ModelFileError(f"cannot read embedding {path.name}: {one_line(e, path)}"
                                 ) from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name}: not a textual-inversion embedding")
    if "string_to_param" in data:  # A1111 .pt: {"string_to_param": {"*": [n, D]}, "name": …}
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise SdloomError(f"{path}: embedding file must hold exactly one term")
        vectors = {"*": next(iter(params.values()))}
    elif "clip_l" in data and "clip_g" in data:  # SDXL
        vectors = {k: data[k] for k in ("clip_l", "clip_g")}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = {"*": next(iter(data.values()))}  # "emb_params", or a diffusers concept
    else:
        raise SdloomError(f"{path}: not a textual-inversion embedding "
                          f"(keys: {', '.join(map(str, list(data)[:8]))})")
    out: dict[str, torch.Tensor] = {}
    for k, v in vectors.items():
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or v.numel() == 0:
            raise SdloomError(f"{path}: embedding {k!r} is not a [n, width] tensor")
        out[k] = v.detach().to(torch.float32).reshape(-1, v.shape[-1])
    if len({v.shape[0] for v in out.values()}) != 1:
        raise SdloomError(f"{path}: clip_l and clip_g have different vector counts")
    if next(iter(out.values())).shape[0] > CHUNK:
        raise SdloomError(f"{path}: more than {CHUNK} vectors cannot fit in a prompt chunk")
    return Embedding(path.stem, out, path)


class EmbeddingDB:
    """Textual-inversion embeddings by name (later additions replace earlier ones)."""
    EXTENSIONS = (".pt", ".bin", ".safetensors")

    def __init__(self, embeddings: Iterable[Embedding] = ()):
        self.embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}  # file → why it was not loaded
        self.version = 0  # bumped on change, so encoders know to rebuild their lookups
        for e in embeddings:
            self.add(e)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __contains__(self, name: str) -> bool:
        return name in self.embeddings

    def __iter__(self):
        return iter(self.embeddings.values())

    def add(self, emb: Embedding) -> None:
        self.embeddings[emb.name] = emb
        self.version += 1

    def load(self, path: str | Path) -> Embedding:
        emb = load_embedding(path)
        self.add(emb)
        return emb

    def load_dir(self, folder: str | Path) -> None:
        """Every embedding file under `folder`; unreadable ones are listed in `errors`."""
        for p in sorted(Path(folder).rglob("*")):
            if p.suffix.lower() in self.EXTENSIONS and p.is_file():
                if not p.stat().st_size:
                    self.errors[str(p)] = f"{p.name}: empty file"
                    continue
                try:
                    self.load(p)
                except SdloomError as e:  # one bad download must not stop generation
                    self.errors[str(p)] = str(e)

    def lookup(self, tokenizer, usable: Callable[[Embedding], bool] | None = None
               ) -> dict[int, list[tuple[list[int], Embedding]]]:
        """First token id → [(name ids, embedding)], longest name first (A1111's ids_lookup)."""
        table: dict[int, list[tuple[list[int], Embedding]]] = {}
        for emb in self.embeddings.values():
            ids = tokenizer.encode(emb.name)
            if ids and (usable is None or usable(emb)):
                table.setdefault(ids[0], []).append((ids, emb))
        for entries in table.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)
        return table


# ------------------------------------------------------------------ chunks

@dataclass
class Chunk:
    """One 77-token window: ids (BOS … EOS, EOS-padded), per-token weights, embedding slots."""
    tokens: list[int]
    weights: list[float]
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (index in tokens, emb)


def tokenize_prompt(text: str, tokenizer, embeddings: EmbeddingDB | dict | None = None,
                    emphasis: str = "Original", comma_backtrack: int = COMMA_BACKTRACK
                    ) -> list[Chunk]:
    """A prompt's 77-token chunks, as A1111's tokenize_line."""
    # 75 prompt tokens per chunk; BREAK starts a new chunk; a chunk that overflows is cut after
    # its last comma when that comma is within `comma_backtrack` tokens of the end.
    # `embeddings` is a DB or an `EmbeddingDB.lookup` table.
    if isinstance(embeddings, EmbeddingDB):
        embeddings = embeddings.lookup(tokenizer)
    lookup = embeddings or {}
    # "None" emphasis reads the prompt verbatim: brackets are text and BREAK is a word
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    toks: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Embedding]] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, weights, fixes, last_comma
        pad = CHUNK - len(toks)
        chunks.append(Chunk([tokenizer.bos, *toks, *[tokenizer.eos] * (pad + 1)],
                            [1.0, *weights, *[1.0] * (pad + 1)], fixes))
        toks, weights, fixes, last_comma = [], [], [], -1

    for frag, weight in parsed:
        if (frag, weight) == BREAK:
            close()
            continue
        ids = tokenizer.encode(frag)
        pos = 0
        while pos < len(ids):
            tok = ids[pos]
            if tok == comma:
                last_comma = len(toks)
            elif (comma_backtrack and len(toks) == CHUNK and last_comma != -1
                  and len(toks) - last_comma <= comma_backtrack):
                # move the words after the last comma into the next chunk, so a phrase
                # is not split across two independently encoded windows; embedding slots
                # move with their words (A1111 leaves them behind in the old chunk)
                cut = last_comma + 1
                moved = toks[cut:], weights[cut:], [(p - cut, e) for p, e in fixes if p > cut]
                toks, weights = toks[:cut], weights[:cut]
                fixes = [(p, e) for p, e in fixes if p <= cut]
                close()
                toks, weights, fixes = moved
            if len(toks) == CHUNK:
                close()
            emb, n_ids = _find_embedding(lookup, ids, pos)
            if emb is None:
                toks.append(tok)
                weights.append(weight)
                pos += 1
                continue
            if len(toks) + emb.count > CHUNK:
                close()
            fixes.append((len(toks) + 1, emb))  # +1: BOS comes first
            toks += [0] * emb.count  # placeholder ids; the vectors replace their embeddings
            weights += [weight] * emb.count
            pos += n_ids
    if toks or not chunks:
        close()
    return chunks


def _find_embedding(lookup: dict, ids: list[int], pos: int) -> tuple[Embedding | None, int]:
    for name_ids, emb in lookup.get(ids[pos], ()):
        if ids[pos:pos + len(name_ids)] == name_ids:
            return emb, len(name_ids)
    return None, 0


def chunk_ids(chunks: list[Chunk], eos: int, pad_token: int) -> torch.Tensor:
    """[N, 77] ids, with `pad_token` after the first EOS (OpenCLIP pads with 0), as A1111."""
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
    if pad_token != eos:
        for row, c in enumerate(chunks):
            ids[row, c.tokens.index(eos) + 1:] = pad_token
    return ids


def chunk_embeds(encoder: nn.Module, ids: torch.Tensor, chunks: list[Chunk],
                 vectors: Callable[[Embedding], torch.Tensor]) -> torch.Tensor | None:
    """The encoder's token embeddings of `ids` with each textual-inversion embedding's vectors
    in its slots, or None when no chunk uses one (the encoder then embeds the ids itself)."""
    if not any(c.fixes for c in chunks):
        return None
    embeds = encoder.token_embedding(ids).clone()
    for row, c in enumerate(chunks):
        for pos, emb in c.fixes:
            v = vectors(emb).to(embeds)
            embeds[row, pos:pos + v.shape[0]] = v
    return embeds


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str = "Original"
                   ) -> torch.Tensor:
    """Weight hidden states [N,77,D] per token (A1111 sd_emphasis); "Original" keeps the mean."""
    # "Original" rescales each chunk of each prompt so its mean equals the unweighted mean.
    # A1111 takes that mean over the whole batch it encodes, which is one prompt except for
    # prompt-editing texts; per prompt keeps a prompt's encoding independent of its neighbours.
    if mode in ("Ignore", "None") or bool((weights == 1).all()):
        return z
    scaled = z * weights[..., None].to(z)
    if mode == "No norm":
        return scaled
    before = z.mean(dim=(1, 2), keepdim=True)
    return scaled * (before / scaled.mean(dim=(1, 2), keepdim=True))


# ------------------------------------------------------------------ conditioning

@dataclass
class Conditioning:
    """Text conditioning for a batch: cross-attention context and (SDXL) the pooled vector."""
    context: torch.Tensor  # [B, 77·k, sum of encoder widths]
    pooled: torch.Tensor | None = None  # [B, P]

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // 77

    def to(self, device=None, dtype=None) -> Conditioning:
        return Conditioning(self.context.to(device, dtype),
                            None if self.pooled is None else self.pooled.to(device, dtype))

    def pad_chunks(self, k: int, empty: Conditioning) -> Conditioning:
        """Append chunks of the empty prompt's encoding until there are `k`."""
        if k < self.chunks:
            raise ValueError(f"cannot pad {self.chunks} chunks down to {k}")
        if k == self.chunks:
            return self
        pad = empty.context[:1, :77].to(self.context).expand(self.context.shape[0], -1, -1)
        return Conditioning(torch.cat([self.context, pad.repeat(1, k - self.chunks, 1)], 1),
                            self.pooled)


def stack_conds(conds: list[Conditioning]) -> Conditioning:
    """One conditioning per image → a batch; shorter ones are padded by repeating their last
    token vector, as A1111's prompt_parser.stack_conds does for prompts of different lengths."""
    n_tok = max(c.context.shape[1] for c in conds)
    ctx = [c.context if c.context.shape[1] == n_tok else torch.cat(
        [c.context, c.context[:, -1:].expand(-1, n_tok - c.context.shape[1], -1)], 1)
        for c in conds]
    pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
    return Conditioning(torch.cat(ctx), pooled)


def cond_at_step(schedule: list[tuple[int, Conditioning]], step: int) -> Conditioning:
    """The entry in force at a 0-based sampling step: the first with step <= end (A1111)."""
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[-1][1]


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class PromptEncoder:
    """Prompts → Conditioning through one or more text encoders (SDXL: CLIP-L ⊕ bigG)."""
    # Hidden states are concatenated on the feature axis; the pooled vector comes from the
    # encoder whose config says `pooled`, taken at the first chunk, as A1111.

    def __init__(self, tokenizer, text_encoders: list[nn.Module], configs: list,
                 embeddings: EmbeddingDB | None = None, emphasis: str = "Original",
                 comma_backtrack: int = COMMA_BACKTRACK):
        if len(text_encoders) != len(configs):
            raise ValueError(f"{len(text_encoders)} text encoders but {len(configs)} configs")
        if emphasis not in EMPHASIS_MODES:
            raise SdloomError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}")
        self.tokenizer = tokenizer
        self.encoders = list(text_encoders)
        self.configs = list(configs)
        self.embeddings = embeddings if embeddings is not None else EmbeddingDB()
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        self._lookup: dict | None = None
        self._lookup_version = -1
        self._chunk_cache: dict[str, list[Chunk]] = {}

    # ---------------------------------------------------------------- tokens
    @property
    def skipped_embeddings(self) -> list[str]:
        """Names of loaded embeddings made for another model family (A1111 "skipped")."""
        return [e.name for e in self.embeddings if not e.usable_with(self.configs)]

    def _embedding_lookup(self) -> dict:
        if self._lookup is None or self._lookup_version != self.embeddings.version:
            self._lookup = self.embeddings.lookup(
                self.tokenizer, lambda e: e.usable_with(self.configs))
            self._lookup_version = self.embeddings.version
            self._chunk_cache.clear()
        return self._lookup

    def tokenize(self, text: str) -> list[Chunk]:
        """The prompt's 77-token chunks (cached per text)."""
        lookup = self._embedding_lookup()
        if text not in self._chunk_cache:
            if len(self._chunk_cache) > 1024:
                self._chunk_cache.clear()
            self._chunk_cache[text] = tokenize_prompt(text, self.tokenizer, lookup,
                                                      self.emphasis, self.comma_backtrack)
        return self._chunk_cache[text]

    def used_embeddings(self, texts: list[str]) -> dict[str, Embedding]:
        """The embeddings these prompt texts use, by name (for A1111's "TI hashes")."""
        return {e.name: e for t in texts for c in self.tokenize(t) for _, e in c.fixes}

    # ---------------------------------------------------------------- tensors
    @torch.no_grad()
    def encode_chunks(self, chunks: list[Chunk], clip_skip: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunks → (weighted hidden [N,77,ΣD] float32, pooled [N,P] or None)."""
        zs: list[torch.Tensor] = []
        pooled = None
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
        for enc, cfg in zip(self.encoders, self.configs):
            dev = _device(enc)
            ids = chunk_ids(chunks, self.tokenizer.eos, cfg.pad_token).to(dev)
            embeds = chunk_embeds(enc, ids, chunks, lambda e, cfg=cfg: e.for_encoder(cfg))
            hidden, p = enc(ids, clip_skip=clip_skip, inputs_embeds=embeds)
            # emphasis per encoder, as A1111 wraps each SDXL encoder separately
            zs.append(apply_emphasis(hidden.float(), weights.to(dev), self.emphasis))
            if cfg.pooled:
                pooled = None if p is None else p.float()
        if len({z.device for z in zs}) > 1:
            zs = [z.to(zs[0].device) for z in zs]
        return torch.cat(zs, dim=-1), pooled

    def encode(self, texts: list[str], clip_skip: int = 1) -> list[Conditioning]:
        """One [1, 77·k, D] Conditioning per text (k its own chunk count), all chunks in one
        forward per encoder."""
        if not texts:
            raise ValueError("no prompts to encode")
        per = [self.tokenize(t) for t in texts]
        z, pooled = self.encode_chunks([c for cs in per for c in cs], clip_skip)
        out, start = [], 0
        for cs in per:
            n = len(cs)
            out.append(Conditioning(z[start:start + n].reshape(1, n * 77, z.shape[-1]),
                                    None if pooled is None else pooled[start:start + 1]))
            start += n
        return out

    def encode_scheduled(self, prompts: list[str], steps: int, clip_skip: int = 1,
                         hires_steps: int | None = None
                         ) -> list[list[tuple[int, Conditioning]]]:
        """Per prompt, its editing timeline [(end_at_step, Conditioning [1,77·k,D])]."""
        # each distinct text of all the timelines is encoded once, in one batch; a timeline's
        # texts are padded to its longest with empty-prompt chunks, as A1111 encodes them
        # together (sd_hijack_clip pads a batch's chunk counts with empty chunks)
        scheds = [prompt_schedule(p, steps, hires_steps) for p in prompts]
        texts = list(dict.fromkeys(t for s in scheds for _, t in s))
        conds = dict(zip(texts, self.encode(texts, clip_skip)))
        empty = None
        out = []
        for s in scheds:
            k = max(conds[t].chunks for _, t in s)
            if empty is None and any(conds[t].chunks < k for _, t in s):
                empty = self.encode([""], clip_skip)[0]
            out.append([(end, conds[t].pad_chunks(k, empty)) for end, t in s])
        return out
