"""Training saves under kills: a process killed at any file operation of a save (or right after
it resumed) resumes to the same bits as an uninterrupted run and leaves no temp files; a failed
run never overwrites another run's files.

A kill is `os._exit` in a forked child at the n-th filesystem operation on the output folder:
like SIGKILL, no `finally`, no `except` clean-up and no buffer flush runs. `rmtree` is killed
half-way (all but its last file deleted), `torch.save`/`save_file` after half the bytes.
"""
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdloom.checkpoints.save import save_model
from sdloom.errors import SdloomError
from sdloom.training.config import TrainConfig
from sdloom.training.train import Trainee, main, train

from test_training import make_shapes
from tiny import TINY_SD1, tiny_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="kills via fork, fd paths via /proc")
KILLED = 137


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # bit-equal runs need one thread count throughout (the reduction order depends on it),
    # and one thread keeps fork() safe (no OpenMP pool in the parent)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_shapes(root / "data")
    init = root / "init.safetensors"
    save_model(tiny_model(), TINY_SD1, init)
    return data, init


def config(init, **kw) -> TrainConfig:
    base = dict(what="unet", model=str(init), resolution=32, batch_size=4, lr=2e-3, warmup=1,
                steps=3, save_every=1, log_every=1, caption_dropout=0.0, seed=3, ema_decay=0.9)
    return TrainConfig().override({**base, **kw})


def _path(arg) -> str:
    if isinstance(arg, int):  # fsync(fd)
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return ""
    return os.fspath(arg)


def _half_rmtree(path) -> None:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    for p in files[:-1]:
        p.unlink()


def _truncate(path) -> None:
    p = Path(path)
    if p.exists():
        os.truncate(p, p.stat().st_size // 2)


class Killer:
    """Counts file operations on paths under `root` (optionally of one kind, optionally only
    calls that satisfy `when`) and dies at the n-th; n=0 only counts."""
    OPS = [(os, "replace"), (os, "rename"), (os, "fsync"), (shutil, "rmtree"),
           (torch, "save"), (safetensors.torch, "save_file")]

    def __init__(self, root: Path, n: int, op: str | None = None, when=None):
        self.root, self.n, self.op, self.when, self.count = str(root), n, op, when, 0

    def install(self) -> None:
        for mod, name in self.OPS:
            setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, orig):
        def op(*a, **kw):
            target = a[1] if name in ("save", "save_file") else a[0]
            if (_path(target).startswith(self.root) and self.op in (None, name)
                    and (self.when is None or self.when(name, a))):
                self.count += 1
                if self.count == self.n:
                    if name == "rmtree":
                        _half_rmtree(a[0])
                    elif name in ("save", "save_file"):
                        orig(*a, **kw)
                        _truncate(target)
                    os._exit(KILLED)
            return orig(*a, **kw)
        return op


def in_child(fn, killer: Killer | None = None, count_file: Path | None = None) -> int:
    """Run `fn` in a forked child; its exit code (KILLED when the killer fired)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if killer is not None:
                killer.install()
            fn()
            if count_file is not None:
                count_file.write_text(str(killer.count))
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def finish(c: TrainConfig, data, out: Path) -> None:
    """What a user does after a crash: --resume, or start again when nothing was saved."""
    try:
        train(c, data, out, resume=True, progress=False)
    except SdloomError as e:
        if "no training state" not in str(e):
            raise
        train(c, data, out, progress=False)


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if "tmp" in p.name or ".old-" in p.name or ".del-" in p.name)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "model.safetensors"))


def losses(out: Path) -> dict[int, float]:
    """Loss per step, the last row of each step (as documented for metrics.jsonl readers)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_counted(fn, out: Path) -> int:
    """Run `fn` in a child; how many file operations on `out` it made."""
    count = out.parent / f"{out.name}.count"
    assert in_child(fn, Killer(out, 0), count) == 0
    return int(count.read_text())


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run of `config`."""
    data, init = setup
    out = tmp_path_factory.mktemp("ref") / "out"
    train(config(init), data, out, progress=False)
    return out


def test_kill_at_every_file_operation_of_a_save_then_resume(setup, tmp_path):
    """Kills at each file operation of a save that replaces an older state (and at the first
    operation of the run), each followed by a resume."""
    data, init = setup
    c = config(init, steps=2)
    ref = tmp_path / "ref"
    total = run_counted(lambda: train(c, data, ref, progress=False), ref)
    first = tmp_path / "first"
    before = run_counted(lambda: train(c, data, first, progress=False, stop_after=1), first)
    assert total - before >= 8  # the last save writes, syncs, publishes and retires
    bad = []
    for k in [1, *range(before + 1, total + 1)]:
        out = tmp_path / f"k{k}"
        code = in_child(lambda: train(c, data, out, progress=False), Killer(out, k))
        assert code == KILLED, (k, code)
        if (out / "model.safetensors").exists():
            weights(out)  # whatever model file a kill leaves is a whole one
        try:
            finish(c, data, out)
        except Exception as e:  # noqa: BLE001 (collected, so every kill point is reported)
            bad.append((k, f"resume failed: {type(e).__name__}: {e}"))
            continue
        if leftovers(out):
            bad.append((k, f"leftovers {leftovers(out)}"))
        if not same_weights(weights(out), weights(ref)):
            bad.append((k, "final weights differ"))
        if losses(out) != losses(ref):
            bad.append((k, "logged losses differ"))
    assert not bad, "\n".join(map(str, bad))


def _is_state_dir(name, a) -> bool:
    return Path(a[0]).is_dir() and any(Path(a[0]).rglob("trainer.pt"))


def test_kill_in_old_state_cleanup_then_kill_in_next_save(setup, reference, tmp_path):
    """The reported sequence: a kill half-way through deleting the previous state, then, after
    a resume, a kill between the renames of the next save."""
    data, init = setup
    ref = reference
    c, out = config(init), tmp_path / "out"
    # save 2 deletes save 1's state: die with it half-deleted
    assert in_child(lambda: train(c, data, out, progress=False),
                    Killer(out, 1, "rmtree", _is_state_dir)) == KILLED
    # the next save: die between its two renames of state folders
    dir_renames = lambda name, a: name in ("replace", "rename") and Path(a[0]).is_dir()  # noqa
    assert in_child(lambda: train(c, data, out, resume=True, progress=False),
                    Killer(out, 2, when=dir_renames)) == KILLED
    train(c, data, out, resume=True, progress=False)
    assert leftovers(out) == []
    assert same_weights(weights(out), weights(ref))
    assert losses(out) == losses(ref)


def test_crashed_saves_are_cleaned_before_training_starts(setup, reference, tmp_path):
    """Temp files of killed saves (a model file, a state) are gone before the first new save,
    so that on a full disk they cannot block the resume."""
    data, init = setup
    ref = reference
    c, out = config(init), tmp_path / "out"
    # die half-way through save 2's trainer state, then, resumed, in the model file of save 2
    assert in_child(lambda: train(c, data, out, progress=False), Killer(out, 2, "save")) \
        == KILLED
    assert leftovers(out)
    assert in_child(lambda: train(c, data, out, resume=True, progress=False),
                    Killer(out, 1, "fsync", lambda name, a: ".model." in _path(a[0]))) == KILLED
    assert any(".model." in p for p in leftovers(out))
    seen = []
    forward = Trainee.forward

    def spy(self, *a):
        if not seen:
            seen.append(leftovers(out))
        return forward(self, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainee, "forward", spy)
        train(c, data, out, resume=True, progress=False)
    assert seen == [[]]
    assert leftovers(out) == []
    assert same_weights(weights(out), weights(ref))


def test_kill_right_after_resume_keeps_the_log(setup, reference, tmp_path):
    data, init = setup
    ref = reference
    c, out = config(init), tmp_path / "out"
    train(c, data, out, progress=False, stop_after=2)
    before = (out / "metrics.jsonl").read_bytes()
    assert len(before.splitlines()) == 2

    def killed_on_first_step():
        Trainee.forward = lambda *a: os._exit(KILLED)
        train(c, data, out, resume=True, progress=False)

    assert in_child(killed_on_first_step) == KILLED
    assert (out / "metrics.jsonl").read_bytes() == before
    train(c, data, out, resume=True, progress=False)
    assert losses(out) == losses(ref)
    assert same_weights(weights(out), weights(ref))


def test_a_failed_run_never_overwrites_another_run(setup, tmp_path, capsys):
    data, init = setup
    out = tmp_path / "out"
    train(config(init, steps=2), data, out, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = config(init, steps=2, lr=1e-4)
    with pytest.raises(SdloomError):  # a run that fails (no such data)
        train(other, tmp_path / "missing", out, progress=False)
    with pytest.raises(SdloomError, match="--resume"):  # a different run into the same folder
        train(other, data, out, progress=False)
    args = ["--data", str(data), "--output", str(out), "--model", str(init), "--no-progress",
            "--steps", "2", "--resolution", "32", "--batch-size", "4"]
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # resuming it is this run: its config may change (here: train on to step 3)
    train(config(init, steps=3), data, out, resume=True, progress=False)
    assert json.loads((out / "config.json").read_text())["steps"] == 3
