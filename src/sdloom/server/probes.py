"""The listing and start-up probe routes of A1111's API that clients call to fill their menus
(samplers, schedulers, upscalers, sd-models, sd-vae, loras, embeddings, prompt-styles, scripts,
cmd-flags, memory, …) and the refresh/unload/reload routes: each answers from what sdloom has;
the model ones queue a job as app.py's generation routes do."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request

from ..infotext import known_sha256
from ..pipelines.engine import Engine
from ..pipelines.generate import LATENT_UPSCALERS
from ..sampling.samplers import SAMPLERS
from ..sampling.schedules import LABELS
from .xyz import SCRIPT_TITLE, xyz_script_info

LATENT_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")
assert {m.lower() for m in LATENT_MODES} == set(LATENT_UPSCALERS)
XYZ_NAME = SCRIPT_TITLE.lower()


# ---------------------------------------------------------------------- memory
def ram_stats() -> dict[str, Any]:
    """A1111's /memory `ram`: this process's resident memory as `used`, the machine's total,
    and `free` = total − used (A1111's own definition); {error} when unreadable."""
    import os
    try:
        try:
            import psutil
            used = psutil.Process(os.getpid()).memory_info().rss
            total = psutil.virtual_memory().total
        except ImportError:
            fields = {}
            for name in ("/proc/meminfo", "/proc/self/status"):
                with open(name) as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        fields[k] = v.split()
            total = int(fields["MemTotal"][0]) * 1024
            used = int(fields["VmRSS"][0]) * 1024
        return {"free": total - used, "used": used, "total": total}
    except Exception as e:
        return {"error": f"{type(e).__name__}"}


def cuda_stats(engine: Engine | None) -> dict[str, Any]:
    """A1111's /memory `cuda`: system free/used/total from mem_get_info and the caching
    allocator's current/peak bytes; {"error": "unavailable"} without CUDA."""
    try:
        if not torch.cuda.is_available():
            return {"error": "unavailable"}
        dev = engine.device if engine is not None and engine.device.type == "cuda" else \
            torch.device("cuda")
        free, total = torch.cuda.mem_get_info(dev)
        s = torch.cuda.memory_stats(dev)

        def cp(key: str) -> dict[str, int]:
            return {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}
        return {"system": {"free": free, "used": total - free, "total": total},
                "active": cp("active_bytes"), "allocated": cp("allocated_bytes"),
                "reserved": cp("reserved_bytes"), "inactive": cp("inactive_split_bytes"),
                "events": {"retries": s.get("num_alloc_retries", 0),
                           "oom": s.get("num_ooms", 0)}}
    except Exception as e:
        return {"error": f"{type(e).__name__}"}


# ---------------------------------------------------------------------- the routes
def probes_router(server, wait) -> APIRouter:
    """The listing and probe routes; `wait` awaits a job for a request."""
    router = APIRouter()

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}}
                for s in SAMPLERS.values()]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": k, "label": v, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for k, v in LABELS.items()]

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """None, Lanczos, Nearest, the embedded upscalers, then upscaler_dir's models with
        their detected factor and kind (A1111 lists 4 for the built-ins; model_path is the
        file name, never the folder)."""
        from ..upscalers import available
        return [{"name": u.name, "model_name": ("LDSR" if u.ldsr else "SD x4" if u.x4
                                                else "ESRGAN" if u.is_model else None),
                 "model_path": u.path.name if u.path else None, "model_url": None,
                 "scale": u.scale if u.is_model else 4}
                for u in available(server.upscaler_dir)]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": n} for n in LATENT_MODES]

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        out = []
        for p in server.models():
            loaded = server.is_loaded(p)
            sha = known_sha256(p) if p.is_file() else None  # hashed before: A1111 shows it
            out.append({"title": server.title(p), "model_name": p.stem,
                        "hash": server.loaded_hash() if loaded else (sha or "")[:10] or None,
                        "sha256": sha, "filename": str(p), "config": None})
        return out

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, str]]:
        """The VAE files of --vae-dir as A1111 lists them (names only inside the folder)."""
        return [{"model_name": name, "filename": str(path)}
                for name, path in server.vaes().items()]

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        d = Path(server.lora_dir) if server.lora_dir else None
        files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".pt", ".ckpt")) \
            if d and d.is_dir() else []
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                for p in files]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        return {}  # the list is read from models_dir on every request

    # ------------------------------------------------------------------ start-up probes
    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, str]]:
        return server.styles.list()

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return server.cmd_flags()

    @router.get("/embeddings")
    def embeddings() -> dict[str, dict[str, Any]]:
        return server.embeddings()

    @router.get("/hypernetworks")
    def hypernetworks() -> list:
        return []  # sdloom has no hypernetworks

    @router.get("/face-restorers")
    def face_restorers() -> list:
        return []  # nor face restoration (restore_faces is refused)

    @router.get("/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [XYZ_NAME], "img2img": [XYZ_NAME]}  # A1111 lists titles lowercased

    @router.get("/script-info")
    def script_info() -> list[dict[str, Any]]:
        """The scripts requests may name: ControlNet in alwayson_scripts (A1111 lists an
        extension's script once per tab; sdloom describes no args), the X/Y/Z plot in
        script_name with its script_args."""
        return [{"name": "controlnet", "is_alwayson": True, "is_img2img": tab, "args": []}
                for tab in (False, True)] + xyz_script_info()

    @router.get("/extensions")
    def extensions() -> list:
        return []  # ControlNet and LoRA are built in, not extensions

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return {"ram": ram_stats(), "cuda": cuda_stats(server._engine)}

    @router.post("/unload-checkpoint")
    async def unload_checkpoint(request: Request) -> dict[str, Any]:
        await wait(server.unload_job(), request)
        return {}

    @router.post("/reload-checkpoint")
    async def reload_checkpoint(request: Request) -> dict[str, Any]:
        await wait(server.reload_job(), request)
        return {}

    @router.post("/refresh-embeddings")
    async def refresh_embeddings(request: Request) -> dict[str, Any]:
        await wait(server.refresh_embeddings_job(), request)
        return {}

    @router.post("/refresh-loras")
    def refresh_loras() -> dict[str, Any]:
        return {}  # lora_dir is read on every request and every prompt

    @router.post("/refresh-vae")
    def refresh_vae() -> dict[str, Any]:
        return {}  # no VAE list to read (sd-vae lists none)

    return router
