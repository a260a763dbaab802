"""The training run on disk: who owns an output folder, and crash-safe training states.

OUT/config.json          the run's TrainConfig (written once the run is known to be this one)
OUT/model.safetensors    the exported model (or lora.safetensors), written atomically
OUT/metrics.jsonl        one JSON row per logged step, appended
OUT/states/step-NNNNNNN/ raw.safetensors (trained weights), trainer.pt (optimizer, EMA, RNGs),
                         config.json — one complete state per folder

A state is written into `states/.tmp-…`, its files and the folder are fsynced, and ONE rename
publishes it as `states/step-NNNNNNN`; only then are older states retired (renamed to
`states/.del-…`, then deleted). So at every instant the newest `step-*` folder is complete,
and a kill anywhere leaves at most temp folders and temp files, which the next start deletes.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from ..errors import SdloomError
from ..io import atomic_write_text, load_torch_weights
from .config import TrainConfig

STATE_FILES = ("raw.safetensors", "trainer.pt", "config.json")
_STEP = re.compile(r"step-(\d+)")
# the temp files of sdloom.io's atomic writers: `.{stem}.{8 hex}.tmp{suffix}`
_ATOMIC_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp(\.[^.]+)?")
# what only a run leaves in its folder
RUN_FILES = ("config.json", "states", "metrics.jsonl", "model.safetensors", "lora.safetensors")


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames in it), to the disk."""
    if path.is_dir() and os.name == "nt":
        return  # Windows cannot open a folder; NTFS journals its renames
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def states(out: Path) -> list[tuple[int, Path]]:
    """The complete states in `out`, oldest first (a folder lacking a file is skipped)."""
    found = []
    folder = out / "states"
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _STEP.fullmatch(p.name)
        if m and all((p / f).is_file() for f in STATE_FILES):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_state(out: Path) -> Path | None:
    """The newest complete training state, or None."""
    found = states(out)
    return found[-1][1] if found else None


def claim_output(out: Path, cfg: TrainConfig, resume: bool) -> Path | None:
    """Check that `out` is new or this run's own; return the state to resume from.

    Without `resume`, a folder holding any run file is refused, unless it is this very
    config's run that never saved a state (a restart of a run that died early): a failed or
    mistaken run must never overwrite another run's model, log or config."""
    state = find_state(out)
    if resume:
        if state is None:
            raise SdloomError(f"--resume: no training state in {out / 'states'}")
        return state
    if state is not None:
        raise SdloomError(f"{out} holds a training run (saved at step "
                          f"{int(_STEP.fullmatch(state.name).group(1))}): continue it with "
                          "--resume, or choose a new --output")
    conf = out / "config.json"
    same = conf.is_file() and conf.read_text(encoding="utf-8") == cfg.to_json()
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held and not same:
        raise SdloomError(f"{out} holds another run ({', '.join(held)}): choose a new --output "
                          "(or --resume to continue that run)")
    return None


def clean_leftovers(out: Path) -> list[Path]:
    """Delete what killed saves leave: temp and retired state folders, atomic writers' temp
    files in `out` and `out/samples`. Returns what was deleted."""
    gone = []
    folder = out / "states"
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    for d in (out, out / "samples"):
        for p in d.iterdir() if d.is_dir() else ():
            if p.is_file() and _ATOMIC_TEMP.fullmatch(p.name):
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def _retire(p: Path) -> None:
    """Rename a state out of the `step-*` names first, so a kill mid-delete leaves no
    half-deleted folder that looks like a state."""
    dead = p.with_name(f".del-{p.name}-{secrets.token_hex(4)}")
    os.rename(p, dead)
    shutil.rmtree(dead, ignore_errors=True)


def publish_state(out: Path, step: int, raw: dict[str, torch.Tensor], trainer: dict,
                  cfg: TrainConfig) -> Path:
    """Write a complete state for `step` and publish it with one rename; then retire the
    older ones. Returns the state's folder."""
    from safetensors.torch import save_file
    folder = out / "states"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in raw.items()},
              str(tmp / "raw.safetensors"), {"sdloom_step": str(step)})
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    for f in STATE_FILES:
        fsync(tmp / f)
    fsync(tmp)
    if final.exists():  # an incomplete folder of this step (a complete one would be resumed)
        _retire(final)
    os.rename(tmp, final)
    fsync(folder)
    for _, old in states(out):
        if old != final:
            _retire(old)
    return final


def load_state(state: Path, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(trained weights, trainer dict) of a state, checked to be a run of `cfg.what`."""
    from safetensors.torch import load_file
    saved = json.loads((state / "config.json").read_text(encoding="utf-8"))
    if saved.get("what") != cfg.what:
        raise SdloomError(f"--resume: {state} is a what={saved.get('what')} run, not {cfg.what}")
    try:
        raw = load_file(str(state / "raw.safetensors"))
        trainer = load_torch_weights(state / "trainer.pt")
    except Exception as e:  # only a damaged disk or a hand-edited state gets here
        raise SdloomError(f"--resume: cannot read {state}: {type(e).__name__}: {e}") from None
    return raw, trainer


def trim_log(path: Path, last_step: int) -> None:
    """Drop rows of steps after `last_step` (they will be run and logged again) and a torn
    last row, by an atomic rewrite, so that the log is never truncated by a kill; a log that
    needs no change is left alone."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [ln for ln in lines if ln.endswith("\n") and _row_step(ln) is not None
            and _row_step(ln) <= last_step]
    if keep != lines:
        atomic_write_text(path, "".join(keep))


def _row_step(line: str) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None
