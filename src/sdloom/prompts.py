"""A1111 prompt syntax → weighted 77-token chunks → conditioning tensors.

Emphasis `(x)`, `(x:1.3)`, `[x]`, escapes, `BREAK`; prompt editing `[a:b:N]`, `[a:N]`, `[a::N]`,
alternation `[a|b]`; prompts over 75 tokens in 77-token chunks, concatenated; textual inversion
embeddings; "Original" emphasis normalisation. Semantics follow A1111's prompt_parser and
sd_hijack_clip (reference/a1111.md); the code is our own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SdloomError

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK = 75
COMMA_BACKTRACK = 20  # A1111 "comma_padding_backtrack"
_ATTN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; ("BREAK", -1) marks a forced chunk break."""
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for r in res[start:]:
            r[1] *= by

    for m in _ATTN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
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
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for pos in rounds:  # unclosed brackets still apply to the rest of the prompt
        scale(pos, ROUND)
    for pos in squares:
        scale(pos, SQUARE)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for r in res[1:]:
        if r[1] == merged[-1][1]:
            merged[-1][0] += r[0]
        else:
            merged.append(r)
    return [(t, w) for t, w in merged]


# ------------------------------------------------------------------ prompt editing

class _Parser:
    """Recursive descent over A1111's editing grammar; emphasis brackets stay as text."""

    def __init__(self, text: str, steps: int):
        self.s, self.i, self.steps = text, 0, steps

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def seq(self, stops: str) -> list:
        out: list = []
        buf = ""
        while self.i < len(self.s) and self.peek() not in stops:
            c = self.peek()
            if c == "\\" and self.i + 1 < len(self.s):
                buf += self.s[self.i:self.i + 2]
                self.i += 2
            elif c == "[":
                node = self.bracket()
                if isinstance(node, str):
                    buf += node
                else:
                    out.append(buf)
                    buf = ""
                    out.append(node)
            elif c == "(":  # emphasis: keep brackets, parse inside for nested editing
                self.i += 1
                inner = self.seq(")")
                close = ")" if self.peek() == ")" else ""
                self.i += len(close)
                out += [buf, "(", *inner, close]
                buf = ""
            else:
                buf += c
                self.i += 1
        out.append(buf)
        return out

    def bracket(self):
        start = self.i
        self.i += 1
        parts = [self.seq(":|]")]
        seps = []
        while self.peek() in (":", "|"):
            seps.append(self.peek())
            self.i += 1
            parts.append(self.seq(":|]"))
        if self.peek() != "]":  # unterminated: literal text
            self.i = start + 1
            return "["
        self.i += 1
        if seps and all(s == "|" for s in seps):
            return ("alt", parts)
        if seps and all(s == ":" for s in seps) and len(parts) in (2, 3):
            when = "".join(x for x in parts[-1] if isinstance(x, str)).strip()
            try:
                n = float(when)
            except ValueError:
                n = None
            if n is not None:
                n = n * self.steps if n < 1 else n
                if len(parts) == 2:  # [a:N] adds a after N
                    return ("sched", [], parts[0], n)
                return ("sched", parts[0], parts[1], n)
        # plain emphasis bracket ([x]) or a non-numeric [a:b]: literal text, nested edits kept
        items: list = ["["] + parts[0]
        for sep, part in zip(seps, parts[1:]):
            items += [sep] + part
        return ("lit", items + ["]"])


def _render(nodes: list, step: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif n[0] == "lit":
            out.append(_render(n[1], step))
        elif n[0] == "alt":
            out.append(_render(n[1][(step - 1) % len(n[1])], step))
        else:
            _, before, after, when = n
            out.append(_render(before if step <= when else after, step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_at_step, text)]: the prompt text in force up to each (1-based) step, as A1111."""
    nodes = _Parser(prompt, steps).seq("")
    out: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        text = _render(nodes, step)
        if out and out[-1][1] == text:
            out[-1] = (step, text)
        else:
            out.append((step, text))
    return out or [(steps, prompt)]


# ------------------------------------------------------------------ embeddings

@dataclass
class Embedding:
    name: str
    vectors: list[torch.Tensor]  # one [n, D] tensor per text-encoder width

    def for_width(self, width: int) -> torch.Tensor:
        for v in self.vectors:
            if v.shape[-1] == width:
                return v
        raise SdloomError(f"embedding {self.name!r} has no vectors of width {width}")

    @property
    def count(self) -> int:
        return self.vectors[0].shape[0]


def load_embedding(path: str | Path) -> Embedding:
    """A1111 textual-inversion file: .pt (`string_to_param`) or .safetensors (`emb_params`,
    or SDXL's `clip_l` + `clip_g`)."""
    from .checkpoints.load import open_file
    path = Path(path)
    src = open_file(path) if path.suffix == ".safetensors" else None
    if src is not None:
        d = {k: src.get(k) for k in src.shapes}
    else:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SdloomError(f"cannot read embedding {path}: {e}") from None
        if isinstance(d, dict) and "string_to_param" in d:
            d = {"emb_params": next(iter(d["string_to_param"].values()))}
    vecs = [d[k] for k in ("clip_l", "clip_g") if k in d] or \
        [v for k, v in d.items() if isinstance(v, torch.Tensor)][:1]
    if not vecs:
        raise SdloomError(f"{path}: no embedding vectors found")
    return Embedding(path.stem, [v.detach().float().reshape(-1, v.shape[-1]) for v in vecs])


class EmbeddingDB:
    """Embeddings by name; a prompt word equal to a name is replaced by its vectors."""

    def __init__(self):
        self.by_name: dict[str, Embedding] = {}
        self._ids: dict[str, list[int]] = {}

    def add(self, emb: Embedding) -> None:
        self.by_name[emb.name] = emb
        self._ids.clear()

    def load_dir(self, folder: str | Path) -> None:
        for p in sorted(Path(folder).iterdir()):
            if p.suffix in (".pt", ".safetensors", ".bin"):
                self.add(load_embedding(p))

    def find(self, tokens: list[int], pos: int, tokenizer) -> tuple[Embedding, int] | None:
        """The longest embedding whose name's tokens start at `pos`."""
        if not self.by_name:
            return None
        if not self._ids:
            self._ids = {n: tokenizer.encode(n) for n in self.by_name}
        best = None
        for name, ids in self._ids.items():
            if ids and tokens[pos:pos + len(ids)] == ids and (best is None or len(ids) > best[1]):
                best = (self.by_name[name], len(ids))
        return best


# ------------------------------------------------------------------ chunks

@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


def tokenize_prompt(text: str, tokenizer, db: EmbeddingDB | None = None) -> list[Chunk]:
    """A1111's chunking: 75 tokens per chunk (+BOS/EOS), BREAK, comma backtracking."""
    comma = tokenizer.encode(",")[0]
    chunks: list[Chunk] = []
    cur = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        pad = CHUNK - len(cur.tokens)
        cur.tokens = [tokenizer.bos] + cur.tokens + [tokenizer.eos] * pad + [tokenizer.eos]
        cur.weights = [1.0] + cur.weights + [1.0] * pad + [1.0]
        chunks.append(cur)
        cur, last_comma = Chunk(), -1

    for frag, weight in parse_prompt_attention(text):
        if frag == "BREAK" and weight == -1:
            close()
            continue
        toks = tokenizer.encode(frag)
        pos = 0
        while pos < len(toks):
            tok = toks[pos]
            if tok == comma:
                last_comma = len(cur.tokens)
            elif (len(cur.tokens) == CHUNK and last_comma != -1
                  and len(cur.tokens) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1  # move the words after the last comma to the next chunk
                moved_t, moved_w = cur.tokens[cut:], cur.weights[cut:]
                cur.tokens, cur.weights = cur.tokens[:cut], cur.weights[:cut]
                close()
                cur.tokens, cur.weights = moved_t, moved_w
            if len(cur.tokens) == CHUNK:
                close()
            found = db.find(toks, pos, tokenizer) if db else None
            if found is None:
                cur.tokens.append(tok)
                cur.weights.append(weight)
                pos += 1
                continue
            emb, n_ids = found
            if len(cur.tokens) + emb.count > CHUNK:
                close()
            cur.fixes.append((len(cur.tokens), emb))
            cur.tokens += [0] * emb.count
            cur.weights += [weight] * emb.count
            pos += n_ids
    if cur.tokens or not chunks:
        close()
    return chunks


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, 77·k, D]
    pooled: torch.Tensor | None = None  # [B, P]

    @property
    def chunks(self) -> int:
        return self.context.shape[1] // 77


class PromptEncoder:
    """Prompts → Conditioning through one or more text encoders (SDXL: concatenated)."""

    def __init__(self, tokenizer, text_encoders: list, configs: list, embeddings=None):
        self.tokenizer = tokenizer
        self.encoders = text_encoders
        self.configs = configs
        self.db = embeddings

    def _empty(self) -> Chunk:
        return tokenize_prompt("", self.tokenizer)[0]

    @torch.no_grad()
    def encode_chunks(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk per batch item → (z [B,77,D], pooled [B,P] or None), weights applied."""
        zs, pooled = [], None
        for enc, cfg in zip(self.encoders, self.configs):
            dev = next(enc.parameters()).device
            ids = torch.tensor([c.tokens for c in chunks], device=dev)
            # after the first EOS, OpenCLIP encoders see their own pad token
            ids_in = ids.clone()
            if cfg.pad_token != self.tokenizer.eos:
                for b in range(len(chunks)):
                    first = _first_eos(ids[b], self.tokenizer.eos)
                    ids_in[b, first + 1:] = cfg.pad_token
            embeds = None
            if any(c.fixes for c in chunks):
                embeds = enc.token_embedding(ids_in).clone()
                for b, c in enumerate(chunks):
                    for off, emb in c.fixes:
                        v = emb.for_width(cfg.width).to(embeds)
                        embeds[b, 1 + off:1 + off + v.shape[0]] = v
            h, p = enc(ids_in, clip_skip=self._clip_skip, inputs_embeds=embeds)
            zs.append(h.float())
            if cfg.pooled:
                pooled = p.float()
        z = torch.cat(zs, dim=-1)
        w = torch.tensor([c.weights for c in chunks], device=z.device, dtype=z.dtype)
        before = z.mean()
        z = z * w[..., None]
        # "Original" emphasis: weighting must not change the overall mean
        z = z * (before / z.mean())
        return z, pooled

    def __call__(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        self._clip_skip = clip_skip
        per = [tokenize_prompt(p, self.tokenizer, self.db) for p in prompts]
        n = max(len(c) for c in per)
        zs, pooled = [], None
        for i in range(n):
            batch = [c[i] if i < len(c) else self._empty() for c in per]
            z, p = self.encode_chunks(batch)
            zs.append(z)
            if i == 0:
                pooled = p
        return Conditioning(torch.cat(zs, dim=1), pooled)


def _first_eos(ids: torch.Tensor, eos: int) -> int:
    hits = (ids == eos).nonzero()
    return int(hits[0]) if len(hits) else len(ids) - 1
