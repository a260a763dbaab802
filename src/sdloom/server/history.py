"""The outputs folder as a history the web page browses across reloads (A1111's image
browser over `outputs/`): `GET /sdloom/v1/outputs` lists the images saved under outdir,
newest first, a page at a time, each with its infotext; `GET /sdloom/v1/outputs/{folder}/{name}`
serves one. Not an A1111 route: A1111's own UI reads the folder through Gradio.

Only image files directly inside the folders the server writes (A1111's names) are listed or
served: no other path under outdir, no symbolic link, no file still being written (the empty
file unique_output_path reserves).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from PIL import Image

from ..errors import NotFoundError
from ..infotext import infotext_of

FOLDERS = ("txt2img-images", "img2img-images", "txt2img-grids", "img2img-grids",
           "extras-images")
SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".webp": "image/webp"}
PAGE_MAX = 100
ROUTE = "/sdloom/v1/outputs"


def output_files(outdir: Path) -> list[tuple[float, str, str]]:
    """(mtime, folder, name) of every listed image, newest first."""
    found = []
    for folder in FOLDERS:
        d = outdir / folder
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if Path(e.name).suffix.lower() not in SUFFIXES:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                found.append((st.st_mtime, folder, e.name))
    found.sort(key=lambda t: (t[0], t[2]), reverse=True)
    return found


def describe(outdir: Path, mtime: float, folder: str, name: str) -> dict[str, Any]:
    """One listed image: its URL, size and infotext (read from the file's header only)."""
    item: dict[str, Any] = {"name": f"{folder}/{name}", "folder": folder,
                            "url": f"{ROUTE}/{folder}/{name}", "mtime": mtime,
                            "width": None, "height": None, "infotext": None}
    try:
        with Image.open(outdir / folder / name) as im:
            item["width"], item["height"] = im.size
            item["infotext"] = infotext_of(im)
    except Exception:  # a broken file is listed without its details, never a failed page
        pass
    return item


def history_router(server) -> APIRouter:
    router = APIRouter()

    @router.get(ROUTE)
    def outputs(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=PAGE_MAX)
                ) -> dict[str, Any]:
        """A page of the saved images, newest first: {total, offset, limit, items}."""
        files = output_files(server.outdir)
        page = files[offset:offset + limit]
        return {"total": len(files), "offset": offset, "limit": limit,
                "items": [describe(server.outdir, *f) for f in page]}

    @router.get(ROUTE + "/{folder}/{name}")
    def output_file(folder: str, name: str) -> FileResponse:
        path = server.outdir / folder / name
        ok = folder in FOLDERS and name not in (".", "..") and "/" not in name \
            and "\\" not in name and Path(name).suffix.lower() in SUFFIXES
        try:
            ok = ok and stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            ok = False
        if not ok:
            raise NotFoundError(f"no saved image {folder}/{name}")
        return FileResponse(path, media_type=SUFFIXES[Path(name).suffix.lower()],
                            headers={"cache-control": "no-cache"})

    return router
