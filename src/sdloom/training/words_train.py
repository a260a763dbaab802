"""`sdloom train --what words`: teach a trained SD1/SD2 model words its captions never used.

The data set's metadata.jsonl `variants` column (emoji_data: the short name, each alias and,
built with --keywords, CLDR keywords) holds other prompts for each image. A variant made of
caption words only is already understood as well as its words are; one with a word that no
caption holds ("yacht" for the sailboat) reaches the U-Net as an untrained token. This run fits
the text encoder's output for the variant to its output for the caption (MSE over all the
positions the U-Net's cross-attention reads, both put into the same caption template), and
trains nothing but the token-table rows of the words no caption or template holds. So every
caption encodes bit for bit as before, the U-Net is untouched, and what the model drew for its
captions it still draws; a new word borrows its caption's meaning.

Textual inversion (Gal et al. 2022) learns a new token through the denoising loss; here the
target is an encoding the model already has, which costs two text-encoder passes per prompt
and no U-Net. Resumable and DDP-ready as the other runs; the prompts drawn are a function of
the seed and the step.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.save import save_model
from ..errors import SdloomError
from ..families import family_of
from ..io import atomic_write_text
from ..tokenizer import BOS, EOS, get_tokenizer
from .config import TrainConfig
from .data import read_items
from .distributed import Dist, wrap_ddp
from .ema import EMA
from .state import claim_output, clean_leftovers, publish_state
from .train import (DTYPES, build_model, gather_rng, load_checkpoint, one_network_loop,
                    trainer_state)


def token_table(encoder: nn.Module) -> nn.Embedding:
    """The text encoder's token table (vocab_size rows; the position table is not one)."""
    tables = [m for m in encoder.modules()
              if isinstance(m, nn.Embedding) and m.num_embeddings == encoder.config.vocab_size]
    if len(tables) != 1:
        raise SdloomError("what=words: cannot find the text encoder's token table")
    return tables[0]


class NewWords(nn.Module):
    """A frozen text encoder whose token rows `ids` are the trainable `rows`: the only
    parameter, so optimizer, weight decay, EMA and DDP touch nothing else."""

    def __init__(self, encoder: nn.Module, ids: list[int]):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        table = token_table(encoder)
        self.table_name = next(n for n, m in encoder.named_modules() if m is table) + ".weight"
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(table.weight.detach()[self.ids].float().clone())

    def table(self) -> torch.Tensor:
        """The whole token table with the trained rows in place."""
        w = self.encoder.get_parameter(self.table_name)
        return w.index_put((self.ids,), self.rows.to(w.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The context [B, 77, width] the U-Net reads, as TokenConditioning computes it."""
        return torch.func.functional_call(self.encoder, {self.table_name: self.table()},
                                          (tokens,))[0]

    @torch.no_grad()
    def write(self) -> None:
        """Put the trained rows into the encoder's own table (before saving the model)."""
        self.encoder.get_parameter(self.table_name).copy_(self.table())


def caption_tokens(texts, templates: tuple[str, ...]) -> set[int]:
    """Every token id of the captions and of the templates' own words, with BOS and EOS (and
    so SD1's padding): the rows a words run keeps."""
    tok = get_tokenizer()
    out = {BOS, EOS}
    for t in list(texts) + [t.replace("{}", " ") for t in templates]:
        out.update(tok.encode(t))
    return out


def word_pairs(data: Path, cfg: TrainConfig) -> tuple[list[tuple[str, str]], list[int]]:
    """(variant, caption) pairs whose variant holds a word that no caption of the data set
    (held-out rows included) holds, and those words' token ids, sorted."""
    tok = get_tokenizer()
    keep = caption_tokens((it.text for it in read_items(data, True)), cfg.caption_templates)
    pairs, new = [], set()
    for it in read_items(data, cfg.include_holdout):
        for v in it.variants:
            ids = set(tok.encode(v)) - keep
            if ids:
                pairs.append((v, it.text))
                new |= ids
    if not pairs:
        raise SdloomError(f"what=words: no variant in {data.name}/metadata.jsonl holds a word "
                          "its captions lack: nothing to teach (emoji_data --keywords adds "
                          "CLDR keywords to the variants)")
    return pairs, sorted(new)


def train_words(cfg: TrainConfig, data: Path, out: Path, resume: bool, progress: bool,
                stop_after: int | None, d: Dist, device: torch.device) -> dict:
    """The loop of train.train for what=words; returns the same dict."""
    out.mkdir(parents=True, exist_ok=True)
    state = claim_output(out, cfg, resume)
    if d.main:
        clean_leftovers(out)
    pairs, ids = word_pairs(data, cfg)
    model = build_model(cfg, device)
    if not family_of(model.config).trains_text_encoder(model):
        raise SdloomError("what=words needs a model with one CLIP text encoder (SD1/SD2)")
    words = NewWords(model.text_encoders[0], ids).to(device)
    pad = model.config.text_encoders[0].pad_token
    tok = get_tokenizer()
    opt = torch.optim.AdamW([words.rows], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.adam_betas))
    ema = EMA(words, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)  # prompts and templates
    step = 0
    if state is not None:
        step = load_checkpoint(state, cfg, words, opt, ema, scaler, None, None, gen, d)
    module = wrap_ddp(words, d, device)
    templates = cfg.caption_templates or ("{}",)
    if d.main:
        atomic_write_text(out / "config.json", cfg.to_json())
        print(f"sdloom: what=words: {len(pairs)} prompts with {len(ids)} new tokens",
              flush=True)

    def micro() -> tuple[torch.Tensor, int]:
        pick = torch.randint(len(pairs), (cfg.batch_size,), generator=gen).tolist()
        tpl = torch.randint(len(templates), (cfg.batch_size,), generator=gen).tolist()
        batch = [(templates[t].replace("{}", pairs[i][0]),
                  templates[t].replace("{}", pairs[i][1])) for i, t in zip(pick, tpl)]
        student = tok([s for s, _ in batch], pad_token=pad).to(device)
        teacher = tok([c for _, c in batch], pad_token=pad).to(device)
        with torch.no_grad():  # the caption: no trained row in it
            target = words.encoder(teacher)[0]
        return F.mse_loss(module(student).float(), target.float()), len(batch)

    res = one_network_loop(cfg, out, d, device, step=step, stop_after=stop_after,
                           progress=progress, desc="train words", unit="prompts",
                           module=module, trained=words, opt=opt, ema=ema, scaler=scaler,
                           micro=micro, save=lambda n: _save(out, cfg, model, words, opt, ema,
                                                             scaler, gen, n, d))
    return {**res, "model": model}


def _save(out: Path, cfg: TrainConfig, model: nn.Module, words: NewWords, opt,
          ema: EMA | None, scaler, gen: torch.Generator, step: int, d: Dist) -> None:
    """model.safetensors (the whole model with the trained rows, EMA's when EMA is on)
    atomically, then the training state (the rows only)."""
    rngs = gather_rng(gen, d)
    if not d.main:
        return
    backup = ema.copy_to(words) if ema is not None else None
    try:  # the encoder's own rows only ever differ where NewWords puts `rows` anyway
        words.write()
        save_model(model, model.config, out / "model.safetensors",
                   dtype=DTYPES[cfg.save_dtype],
                   extra_metadata={"sdloom_step": str(step), "sdloom_train": cfg.to_json()})
    finally:
        if backup is not None:
            ema.restore(words, backup)
    publish_state(out, step, {"rows": words.rows}, trainer_state(step, d, opt, rngs, ema,
                                                                 scaler), cfg)
