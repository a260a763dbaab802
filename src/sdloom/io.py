"""Atomic file output: write a temp file in the target's folder, then rename it over the target.

A reader (or a crash) never sees a half-written image or checkpoint: the rename is atomic on
POSIX and on Windows within one volume, which is why the temp file lives in the same folder.
"""
from __future__ import annotations

import os
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
