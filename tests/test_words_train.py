"""`sdloom train --what words` (training/words_train.py): which prompts and token rows it trains
(the rule written out here, not read from the module), that nothing else in the file changes
and every caption encodes bit for bit as before, that a new word comes to encode like its
caption, exact resume, and the preset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sdloom.checkpoints.load import load_model
from sdloom.checkpoints.save import save_model
from sdloom.cli import main as cli_main
from sdloom.errors import SdloomError
from sdloom.tokenizer import BOS, EOS, get_tokenizer
from sdloom.training.config import PRESETS, TrainConfig
from sdloom.training.train import train
from sdloom.training.words_train import word_pairs

from tiny import TINY_SD1, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
TEMPLATES = ("{}", "a {}", "{} emoji")
ROWS = [  # caption, variants, held out
    ("red apple", ["apple", "crimson apple"], False),  # "apple" is a caption word
    ("two-hump camel", ["camel", "bactrian"], False),
    ("sailboat", ["yacht", "zebra"], False),  # "zebra" is a held-out caption's word
    ("thumbs up, thumbs", ["thumbs up", "thumbs"], False),
    ("zebra crossing", ["pedestrian"], True),  # held out: not taught, but its words are kept
]


def make_words_set(root: Path, rows=ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for i, (text, variants, held) in enumerate(rows):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "text": text, "variants": variants,
                     "holdout": held})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_words_set(tmp_path_factory.mktemp("words"))


@pytest.fixture(scope="module")
def init_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wordsinit") / "init.safetensors"
    save_model(tiny_model(), TINY_SD1, path)
    return path


def cfg_for(init: Path, **kw) -> TrainConfig:
    base = dict(what="words", model=str(init), batch_size=8, lr=0.05, warmup=0,
                schedule="constant", steps=4, weight_decay=0.0, ema_decay=0.0, log_every=1,
                save_every=2, save_dtype="fp32", caption_templates=TEMPLATES, seed=1)
    return TrainConfig(**{**base, **kw})


def new_word_ids() -> set[int]:
    """The rule: tokens of the training rows' variants that no caption (held-out ones too),
    no template word and neither BOS nor EOS is made of."""
    tok = get_tokenizer()
    kept = {BOS, EOS} | {i for t in ("a", "emoji") for i in tok.encode(t)}
    for text, _, _ in ROWS:
        kept |= set(tok.encode(text))
    return {i for _, vs, held in ROWS if not held for v in vs for i in tok.encode(v)} - kept


def encode(model, texts: list[str]) -> torch.Tensor:
    ids = get_tokenizer()(texts, pad_token=model.config.text_encoders[0].pad_token)
    with torch.no_grad():
        return model.text_encoders[0](ids)[0]


def test_the_prompts_and_rows_it_teaches(data):
    pairs, ids = word_pairs(data, cfg_for(Path("unused")))
    assert pairs == [("crimson apple", "red apple"), ("bactrian", "two-hump camel"),
                     ("yacht", "sailboat")]
    assert set(ids) == new_word_ids() and ids == sorted(ids) and len(ids) >= 4
    with pytest.raises(SdloomError, match="nothing to teach"):
        word_pairs(make_words_set(data.parent / "known", ROWS[3:4]), cfg_for(Path("unused")))


def test_only_the_new_words_rows_change_and_they_come_to_mean_their_caption(data, init_file,
                                                                          tmp_path):
    res = train(cfg_for(init_file, steps=40), data, tmp_path / "run", progress=False,
                device="cpu")
    assert res["step"] == 40 and res["unit"] == "prompts"
    before, after = load_file(str(init_file)), load_file(str(tmp_path / "run/model.safetensors"))
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [TABLE]
    changed = (before[TABLE] != after[TABLE]).any(1).nonzero().flatten().tolist()
    assert set(changed) == new_word_ids()
    old, new = load_model(init_file).model, load_model(tmp_path / "run/model.safetensors").model
    captions = [t.replace("{}", c) for t in TEMPLATES for c, _, _ in ROWS]
    assert torch.equal(encode(old, captions), encode(new, captions))  # bit for bit
    taught = [("crimson apple", "red apple"), ("bactrian", "two-hump camel"),
              ("yacht", "sailboat")]

    def gap(m):
        return F.mse_loss(encode(m, [v for v, _ in taught]), encode(m, [c for _, c in taught]))
    assert gap(new) < 0.5 * gap(old)
    losses = res["losses"]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_resume_continues_the_exact_run(data, init_file, tmp_path):
    whole = train(cfg_for(init_file), data, tmp_path / "whole", progress=False, device="cpu")
    cut = tmp_path / "cut"
    train(cfg_for(init_file), data, cut, progress=False, device="cpu", stop_after=2)
    again = train(cfg_for(init_file), data, cut, resume=True, progress=False, device="cpu")
    assert again["step"] == whole["step"] == 4
    a = load_file(str(tmp_path / "whole/model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[TABLE], load_file(str(init_file))[TABLE])


def test_ema_rows_are_what_is_saved(data, init_file, tmp_path):
    res = train(cfg_for(init_file, ema_decay=0.9, ema_warmup=False), data, tmp_path / "ema",
                progress=False, device="cpu")
    plain = train(cfg_for(init_file), data, tmp_path / "plain", progress=False, device="cpu")
    saved = load_file(str(tmp_path / "ema/model.safetensors"))[TABLE]
    init = load_file(str(init_file))[TABLE]
    raw = load_file(str(tmp_path / "plain/model.safetensors"))[TABLE]
    ids = sorted(new_word_ids())
    # four EMA updates at 0.9 keep 0.9⁴ of the start: the average lags the raw rows
    assert (saved[ids] - init[ids]).norm() < 0.6 * (raw[ids] - init[ids]).norm()
    assert res["step"] == plain["step"] == 4


def test_preset_and_command_line(data, init_file, tmp_path, capsys):
    p = PRESETS["emoji-words"]
    assert p["what"] == "words" and p["model"] == "embedded" and p["weight_decay"] == 0
    TrainConfig().override(p).validate()
    assert cli_main(["train", "--preset", "emoji-words", "--data", str(data), "--output",
                     str(tmp_path / "cli"), "--set", f"model={init_file}", "--steps", "2",
                     "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "prompts/s" in err and (tmp_path / "cli/model.safetensors").exists()
    assert cli_main(["train", "--what", "words", "--data", str(data), "--output",
                     str(tmp_path / "bad"), "--model", "tiny-nothing", "--device", "cpu"]) == 1
    assert "need the trained model" in capsys.readouterr().err
