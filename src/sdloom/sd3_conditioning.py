"""SD3 / SD3.5 text conditioning (Esser et al. 2024): CLIP-L ⊕ CLIP-G ‖ T5-XXL, A1111 semantics.

Follows the facts of A1111 1.10's modules/models/sd3/sd3_cond.py (the code is our own):
- CLIP-L and CLIP-G read A1111 prompt syntax in 77-token chunks (emphasis, BREAK, embeddings),
  each the penultimate hidden state without the final LayerNorm; their features are concatenated
  (768 + 1280) and zero-padded to 4096. "Original" emphasis restores the mean of that joint
  L ‖ G tensor (A1111 runs one emphasis over both, unlike SDXL's one per encoder).
- pooled = CLIP-L's final-normed EOS token, NOT projected (A1111 return_projected_pooled=False)
  ‖ CLIP-G's projected one → 2048, taken at the first chunk.
- T5 sees the prompt with the emphasis syntax removed (weights ignored, BREAK dropped), then
  </s>, then <pad> up to 77·k tokens (k = CLIP chunks), or cut to 77·k; its part is zeros when
  there is no T5 or it is disabled (A1111 `sd3_enable_t5` off).
- context = [CLIP part ; T5 part] on the token axis: [1, 2·77·k, 4096].
- clip skip does not apply (A1111's SD3 path ignores it).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig
from .errors import ModelFileError, SdloomError
from .models.t5 import T5Config, T5Encoder
from .models.text_encoders import FrozenCLIPEmbedder
from .prompts import (BREAK, COMMA_BACKTRACK, Chunk, Conditioning, Embedding, EmbeddingDB,
                      PromptEncoder, _device, apply_emphasis, chunk_embeds, chunk_ids,
                      parse_prompt_attention, prompt_schedule)
from .t5_tokenizer import EOS, PAD, T5Tokenizer

PREFIX = "text_encoders."  # where SD3 single files keep the three encoders
T5_ALIAS = "t5xxl.transformer.encoder.embed_tokens.weight"  # transformers' tied copy of `shared`
CONTEXT_DIM = 4096  # MMDiT joint_attention_dim = T5-XXL width
HEAD_DIM = 64  # CLIP-L (12 × 64) and CLIP-G (20 × 64); not readable from shapes
TI_KEYS = ("clip_l", "clip_g")  # SDXL embedding files' keys, as A1111's textual_inversion_key

CLIP_L_SD3 = TextEncoderConfig(layout="hf", width=768, layers=12, heads=12, act="quick_gelu",
                               hidden_layer=-2, final_norm_on_hidden=False, pad_token=49407,
                               pooled=True)
CLIP_G_SD3 = TextEncoderConfig(layout="hf", width=1280, layers=32, heads=20, act="gelu",
                               projection_dim=1280, hidden_layer=-2, final_norm_on_hidden=False,
                               pad_token=0, pooled=True)
_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}
_PAD = {"clip_l": 49407, "clip_g": 0}  # A1111: CLIP-L pads with EOS, CLIP-G with 0 after EOS


def detect_clip(shapes: dict[str, tuple], name: str) -> TextEncoderConfig:
    """Config of `clip_l` / `clip_g` from shapes keyed without `text_encoders.`."""
    pre = f"{name}.transformer."

    def need(key: str) -> tuple:
        if pre + key not in shapes:
            raise ModelFileError(f"SD3 text encoder {name}: missing key {PREFIX}{pre}{key}")
        return tuple(shapes[pre + key])

    vocab, width = need("text_model.embeddings.token_embedding.weight")
    positions = need("text_model.embeddings.position_embedding.weight")[0]
    hidden = need("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    layers = len({m.group(1) for k in shapes
                  if (m := re.match(re.escape(pre) + r"text_model\.encoder\.layers\.(\d+)\.", k))})
    if width % HEAD_DIM or hidden % width:
        raise ModelFileError(f"SD3 text encoder {name}: width {width}, MLP {hidden} is not CLIP")
    proj = shapes.get(pre + "text_projection.weight")
    if name == "clip_g" and proj is None:
        need("text_projection.weight")
    return TextEncoderConfig(layout="hf", vocab_size=vocab, max_positions=positions, width=width,
                             layers=layers, heads=width // HEAD_DIM, mlp_ratio=hidden // width,
                             act=_ACT[name], projection_dim=proj[0] if proj else None,
                             hidden_layer=-2, final_norm_on_hidden=False, pad_token=_PAD[name],
                             pooled=True)


class T5XXL(nn.Module):
    """Holds the T5 encoder under `.transformer`, as the single file's `t5xxl.transformer.*`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.transformer = T5Encoder(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)


class SD3TextEncoders(nn.Module):
    """SD3's three text encoders; state_dict keys = single-file keys minus `text_encoders.`."""

    def __init__(self, clip_l: TextEncoderConfig = CLIP_L_SD3,
                 clip_g: TextEncoderConfig = CLIP_G_SD3, t5: T5Config | None = T5Config()):
        super().__init__()
        self.clip_l = FrozenCLIPEmbedder(clip_l)
        self.clip_g = FrozenCLIPEmbedder(clip_g)
        self.t5xxl = T5XXL(t5) if t5 is not None else None

    @staticmethod
    def detect(shapes: dict[str, tuple], use_t5: bool = True
               ) -> tuple[TextEncoderConfig, TextEncoderConfig, T5Config | None]:
        """Configs from shapes keyed without `text_encoders.`; T5 None when absent or unwanted."""
        t5pre = "t5xxl.transformer."
        t5 = None
        if use_t5 and any(k.startswith(t5pre) for k in shapes):
            t5 = T5Config.detect({k[len(t5pre):]: v for k, v in shapes.items()
                                  if k.startswith(t5pre)})
        return detect_clip(shapes, "clip_l"), detect_clip(shapes, "clip_g"), t5


class SD3PromptEncoder(PromptEncoder):
    """Prompts → SD3 Conditioning: context [1, 2·77·k, 4096] (CLIP chunks, then T5 tokens) and
    pooled [1, 2048]; the same interface as PromptEncoder."""

    def __init__(self, tokenizer, encoders: SD3TextEncoders,
                 t5_tokenizer: T5Tokenizer | None = None, embeddings: EmbeddingDB | None = None,
                 emphasis: str = "Original",
                 comma_backtrack: int = COMMA_BACKTRACK, use_t5: bool = True,
                 context_dim: int = CONTEXT_DIM):
        super().__init__(tokenizer, [encoders.clip_l, encoders.clip_g],
                         [encoders.clip_l.config, encoders.clip_g.config], embeddings, emphasis,
                         comma_backtrack)
        self.context_dim = context_dim
        if sum(c.width for c in self.configs) > context_dim:
            raise SdloomError(f"CLIP widths {[c.width for c in self.configs]} exceed the "
                              f"context width {context_dim}")
        self.t5 = encoders.t5xxl if use_t5 else None
        if self.t5 is not None:
            if self.t5.transformer.cfg.d_model != context_dim:
                raise SdloomError(f"T5 width {self.t5.transformer.cfg.d_model} is not the "
                                  f"context width {context_dim}")
            self.t5_tokenizer = t5_tokenizer or T5Tokenizer()

    # ---------------------------------------------------------------- embeddings
    def _usable(self, emb: Embedding) -> bool:
        """SDXL embedding files ({clip_l, clip_g}) fit SD3's two CLIPs (A1111's keys)."""
        return (set(emb.vectors) == set(TI_KEYS) and
                all(emb.vectors[k].shape[-1] == c.width for k, c in zip(TI_KEYS, self.configs)))

    @property
    def skipped_embeddings(self) -> list[str]:
        return [e.name for e in self.embeddings if not self._usable(e)]

    def _embedding_lookup(self) -> dict:
        if self._lookup is None or self._lookup_version != self.embeddings.version:
            self._lookup = self.embeddings.lookup(self.tokenizer, self._usable)
            self._lookup_version = self.embeddings.version
            self._chunk_cache.clear()
        return self._lookup

    # ---------------------------------------------------------------- CLIP part
    @torch.no_grad()
    def encode_chunks(self, chunks: list[Chunk], clip_skip: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks → (weighted CLIP-L ‖ CLIP-G hidden [N,77,768+1280], pooled [N,2048]) float32.
        `clip_skip` is ignored, as in A1111's SD3 path."""
        zs, pools = [], []
        for enc, cfg, key in zip(self.encoders, self.configs, TI_KEYS):
            dev = _device(enc)
            ids = chunk_ids(chunks, self.tokenizer.eos, cfg.pad_token).to(dev)
            embeds = chunk_embeds(enc, ids, chunks, lambda e, key=key: e.vectors[key])
            # CLIP-L's pooled token is used unprojected, CLIP-G's projected (A1111)
            hidden, pooled = enc(ids, inputs_embeds=embeds, project_pooled=key == "clip_g")
            zs.append(hidden.float())
            pools.append(pooled.float())
        out = zs[0].device
        z = torch.cat([z.to(out) for z in zs], dim=-1)
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=out)
        # one emphasis over L ‖ G: A1111 restores the mean of the joint (zero-padded) tensor;
        # the zero padding scales both means alike, so it does not change the ratio
        return apply_emphasis(z, weights, self.emphasis), torch.cat([p.to(out) for p in pools], -1)

    # ---------------------------------------------------------------- T5 part
    def t5_ids(self, text: str, length: int) -> list[int]:
        """A1111's T5 tokens: emphasis syntax parsed and its weights dropped, BREAK skipped,
        fragments tokenized apart and joined, </s>, then <pad> to `length` (or cut to it)."""
        parsed = parse_prompt_attention(text) if self.emphasis != "None" else [(text, 1.0)]
        ids = [i for frag, w in parsed if (frag, w) != BREAK
               for i in self.t5_tokenizer.encode(frag, add_eos=False)]
        ids.append(EOS)
        return ids[:length] + [PAD] * (length - len(ids))

    @torch.no_grad()
    def _t5_part(self, texts: list[str], lengths: list[int], device) -> list[torch.Tensor]:
        """[1, length, context_dim] per text: T5's last hidden state, or zeros without T5."""
        if self.t5 is None:
            return [torch.zeros(1, n, self.context_dim, device=device) for n in lengths]
        out: list[torch.Tensor | None] = [None] * len(texts)
        dev = _device(self.t5)
        for n in dict.fromkeys(lengths):  # one forward per length (pads are attended: exact)
            rows = [i for i, m in enumerate(lengths) if m == n]
            ids = torch.tensor([self.t5_ids(texts[i], n) for i in rows], device=dev)
            h = self.t5(ids).float().to(device)
            for j, i in enumerate(rows):
                out[i] = h[j:j + 1]
        return out

    # ---------------------------------------------------------------- conditioning
    def _encode(self, texts: list[str], counts: list[int]) -> list[Conditioning]:
        """Each text at `counts[i]` chunks: CLIP padded with empty chunks, T5 at 77·k tokens."""
        empty = self.tokenize("")[0]
        per = [self.tokenize(t) + [empty] * (k - len(self.tokenize(t)))
               for t, k in zip(texts, counts)]
        z, pooled = self.encode_chunks([c for cs in per for c in cs])
        z = F.pad(z, (0, self.context_dim - z.shape[-1]))
        t5 = self._t5_part(texts, [77 * k for k in counts], z.device)
        out, start = [], 0
        for cs, t in zip(per, t5):
            n = len(cs)
            clip = z[start:start + n].reshape(1, n * 77, self.context_dim)
            out.append(Conditioning(torch.cat([clip, t], dim=1), pooled[start:start + 1]))
            start += n
        return out

    def encode(self, texts: list[str], clip_skip: int = 1) -> list[Conditioning]:
        """One Conditioning per text: context [1, 2·77·k, 4096] (k its own chunk count) and
        pooled [1, 2048]. `clip_skip` is ignored, as in A1111's SD3 path."""
        if not texts:
            raise ValueError("no prompts to encode")
        return self._encode(texts, [len(self.tokenize(t)) for t in texts])

    def encode_scheduled(self, prompts: list[str], steps: int, clip_skip: int = 1,
                         hires_steps: int | None = None
                         ) -> list[list[tuple[int, Conditioning]]]:
        """Per prompt, its editing timeline [(end_at_step, Conditioning)]. A timeline's texts
        share its largest chunk count k (A1111 encodes them as one batch): CLIP padded with
        empty chunks, T5 at 77·k tokens, so the T5 part stays after all CLIP chunks."""
        scheds = [prompt_schedule(p, steps, hires_steps) for p in prompts]
        ks = [max(len(self.tokenize(t)) for _, t in s) for s in scheds]
        pairs = list(dict.fromkeys((t, k) for s, k in zip(scheds, ks) for _, t in s))
        conds = dict(zip(pairs, self._encode([t for t, _ in pairs], [k for _, k in pairs])))
        return [[(end, conds[t, k]) for end, t in s] for s, k in zip(scheds, ks)]
