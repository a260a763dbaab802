"""Atomic file output: write a temp file in the target's folder, then rename it over the target.

A reader (or a crash) never sees a half-written image or checkpoint: the rename is atomic on
POSIX and on Windows within one volume, which is why the temp file lives in the same folder.

Safe pickle input: `load_torch_weights` reads .ckpt/.pt/.bin files (models, LoRAs, embeddings,
training state) with weights only, and explains a refusal in one line.
"""
from __future__ import annotations

import os
import pickle
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_name(path: Path) -> Path:
    # keep the real suffix last so writers that infer a format from the name (PIL, torch) work
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it to `path`, on error delete it.

    durable=True fsyncs the data before the rename, so a power cut leaves the old file or the
    new one, never an empty one (the rename can reach the disk before the data otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            # O_EXCL: two writers never share a temp file; mode 0o666 so the umask applies
            # (tempfile.mkstemp would leave every output readable by its owner only)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; return the path."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 `text` to `path` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


# ---------------------------------------------------------------- safe pickle input

def display_name(path: str | Path) -> str:
    """How messages name a file: its name only, never the folders of a server's models dir."""
    return Path(path).name or str(path)


def one_line(e: BaseException, path: str | Path | None = None) -> str:
    """An exception as one short line, without the folders of `path`."""
    text = " ".join(str(e).split()) or type(e).__name__
    if path is not None:
        text = text.replace(str(path), display_name(path))
    return (text[:240] + " …") if len(text) > 240 else text


# globals whose only use in a pickle is to run code: no advice to convert, the file is hostile
CODE_GLOBALS = re.compile(r"^(builtins\.(exec|eval|compile|__import__|open|getattr|setattr)"
                          r"|(os|posix|nt|subprocess|shutil|runpy|importlib|sys|socket)\.)")


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """The globals a weights_only load refused (first the one it stopped at), read without
    running anything."""
    import torch
    m = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    first = [] if not m else [m.group(1) if "." in m.group(1) else "builtins." + m.group(1)]
    try:  # zip checkpoints: torch lists every unsafe global from the pickle opcodes
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy format: torch's own message names the first one
        found = []
    return first + [g for g in found if g not in first]


def _pickle_refusal(path: Path, err: Exception):
    """One line: what was refused, that sdloom never runs checkpoint code, what to do."""
    from .errors import ModelFileError
    name = display_name(path)
    found = _refused_globals(path, err)
    if not found:  # not a refusal: a damaged or foreign file
        m = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        detail = m.group(1) if m else one_line(err, path)
        return ModelFileError(f"cannot read checkpoint {name}: {detail[:200]}; the file is "
                              "damaged or not a checkpoint: download or export it again")
    glob = next((g for g in found if CODE_GLOBALS.match(g) or not _PLAIN.match(g)), found[0])
    shown = glob if _PLAIN.match(glob) else repr(glob[:80])
    head = f"{name}: refused to load: its pickle asks for `{shown}`, and sdloom never runs " \
           "code from a checkpoint (.ckpt/.pt files are read with weights only)"
    if CODE_GLOBALS.match(glob) or not _PLAIN.match(glob):
        return ModelFileError(f"{head}; `{shown}` runs code, so this file is not plain weights "
                              "and may be malicious: delete it, do not load it anywhere")
    mod = glob.rpartition(".")[0]
    if mod == "__main__" or any(g.startswith("__main__.") for g in found):
        return ModelFileError(f"{head}; `{glob}` is a class of the script that saved it: if you "
                              "trust the file, save its tensors from that script with "
                              "safetensors.torch.save_file(state_dict, 'model.safetensors')")
    if not re.fullmatch(r"[\w.+-]+", name):  # never paste a hostile name into a command
        name = "model" + Path(name).suffix if re.fullmatch(r"\.\w+", Path(name).suffix) \
            else "model.ckpt"
    out = Path(name).with_suffix(".safetensors").name
    allow = ", ".join(f"getattr(importlib.import_module('{g.rpartition('.')[0]}'), "
                      f"'{g.rpartition('.')[2]}')" for g in found)
    one_liner = (
        f"python -c \"import importlib, torch; from safetensors.torch import save_file; "
        f"torch.serialization.add_safe_globals([{allow}]); "
        f"sd = torch.load('{name}', map_location='cpu', weights_only=True); "
        f"sd = sd.get('state_dict', sd); save_file({{k: v.contiguous() for k, v in sd.items() "
        f"if isinstance(v, torch.Tensor)}}, '{out}')\"")
    return ModelFileError(f"{head}; if you trust the file, convert it to .safetensors in your "
                          f"own Python environment, allowing only "
                          f"{'that name' if len(found) == 1 else 'those names'}: {one_liner}")


def load_torch_weights(path: str | Path) -> object:
    """torch.load with weights only (memory-mapped when the file is a zip checkpoint).

    A pickle that asks for anything but tensors and plain containers raises ModelFileError in
    one line naming the global it asked for; nothing in the file is ever run.
    """
    import torch
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _pickle_refusal(path, e) from None
