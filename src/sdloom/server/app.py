"""`sdloom serve`: A1111's HTTP API (`/sdapi/v1/…`) over one Engine, and a small web page over
that API at `/`. Routes validate, queue a job (jobs.py) and wait for its result.

Request and response fields are A1111's (docs/a1111.md), so its clients work unchanged.
Differences, each deliberate: width/height default to the model's own size (A1111: 512 for
every model); face restoration, tiling and scripts are refused with a 422 naming the
field rather than ignored (the scripts served are ControlNet, always on, controlnet_api.py,
and the X/Y/Z plot, xyz.py); image URLs are refused (only base64 and data URLs are read);
/skip drops the batch in progress (A1111 keeps its partial image); every error, validation
errors included, has A1111's error body (`error`, `detail`, `body`, `errors`).
Prompt styles (`--styles-file`, styles.py) apply as A1111's, unknown names ignored as A1111
does. The start-up probes clients call (cmd-flags, embeddings, memory, scripts, …) answer
from what sdloom has; unload-checkpoint frees the model and the next job loads it again.

What one request may do is bounded (SECURITY.md): the body and images are measured before
they are read, per-request settings last one job, names resolve only inside their folders,
and /progress, /interrupt and /skip never wait for a job. A txt2img/img2img request becomes
GenerationParams, and the job's result its response, in generation.py; the listing and
start-up probe routes are probes.py; the web page's image browser of outdir is history.py;
the extras routes (upscalers) are extras.py.
"""
from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import SdloomError
from ..infotext import parse_infotext
from ..limits import DEFAULT_LIMITS, Limits
from ..pipelines.engine import EMBEDDED_MODEL, Engine
from ..pipelines.params import GenerationParams
from ..seeds import all_seeds, fix_seed
from ..styles import StyleDB
from .controlnet_api import add_controlnet_routes
from .generation import decode_image, response_body, to_params
from .guard import BodyTooLarge, Guard, error_body, log, parse_users
from .extras import extras_router
from .history import history_router
from .jobs import (PREVIEW_EVERY, Cancelled, Generated, Job, JobQueue, QueueFull, _accepts,
                   run_batches)
from .options import check_options, devices_of, list_vaes
from .probes import probes_router
from .schema import Body, Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from .xyz import is_xyz, xyz_job

MODEL_SUFFIXES = (".safetensors", ".ckpt")
WEB = Path(__file__).parent / "web"  # the page: index.html, app.js, style.css


class OptionsRequest(Body):
    """POST /options: any A1111 option names; the ones sdloom has are checked (OPTIONS)."""


class InternalProgressRequest(Body):
    """A1111's ProgressRequest (POST /internal/progress)."""
    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


# A1111's shared.state.dict() when no job runs
IDLE_STATE = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
              "sampling_steps": 0}


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class Unloaded:
    """What the routes still need to know of a model unloaded by /unload-checkpoint."""
    path: Path | None
    hash: str | None
    config: Any


class Server:
    """The loaded model, the options and the job queue shared by the routes."""

    def __init__(self, model: str | None = None, *, models_dir: str | None = None,
                 device: str = "auto", precision: str = "auto", lora_dir: str | None = None,
                 embeddings_dir: str | None = None, outdir: str = "outputs",
                 limits: Limits = DEFAULT_LIMITS, max_queue: int = 8,
                 loader: Callable[..., Engine] = Engine.load, upscaler_dir: str | None = None,
                 controlnet_dir: str | None = None,
                 styles_file: str | list[str] | None = None,
                 flags: dict[str, Any] | None = None,
                 engine_options: dict[str, Any] | None = None, vae_dir: str | None = None,
                 clip_vision_dir: str | None = None):
        # the styles file is read first: a broken one fails before the model loads
        self.styles_files = [styles_file] if isinstance(styles_file, str) else \
            list(styles_file or [])
        self.styles = StyleDB.load(self.styles_files)
        self.flags = dict(flags or {})  # the serve options, for /cmd-flags
        self.models_dir = Path(models_dir) if models_dir else None
        self.upscaler_dir = Path(upscaler_dir) if upscaler_dir else None
        self.controlnet_dir = Path(controlnet_dir) if controlnet_dir else None
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self.clip_vision_dir = Path(clip_vision_dir) if clip_vision_dir else None
        self.device, self.precision = device, precision
        self.devices = devices_of(device)  # one worker and one engine per device
        # Engine options of every model loaded: offload, compile, cuda_graphs
        self.engine_options = dict(engine_options or {})
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.outdir = Path(outdir)  # where save_images writes, as A1111's outdir_*_samples
        self.limits, self.max_queue = limits, max_queue
        self.loader = loader
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png",
                                        "eta_noise_seed_delta": 0, "sd_vae": "Automatic",
                                        "show_progress_every_n_steps": PREVIEW_EVERY,
                                        "show_progress_type": "Approx cheap",
                                        "live_previews_image_format": "png"}
        self._engine: Engine | None = None
        self._unloaded: Unloaded | None = None
        self._engine_lock = threading.Lock()
        self.engine = self._load(model)
        # the other devices' engines (worker index → engine), loaded on their first job
        self._more: dict[int, Engine] = {}
        # a worker per device: each engine is used by one job at a time
        self.jobs = JobQueue(max_queue, workers=len(self.devices))

    # ------------------------------------------------------------------ models
    @property
    def engine(self) -> Engine:
        """The loaded model; after /unload-checkpoint it is loaded again here, on first use
        (by the next job, so a generation after an unload just works)."""
        eng = self._engine
        if eng is None:
            with self._engine_lock:
                if self._engine is None:
                    path = self._unloaded.path if self._unloaded else None
                    self._engine = self._load(path)
                    self._unloaded = None
                eng = self._engine
        return eng

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine, self._unloaded = engine, None

    def loaded_path(self) -> Path | None:
        """The model's file, loaded or unloaded (never loads it)."""
        if self._engine is not None:
            return Path(self._engine.path) if self._engine.path else None
        return self._unloaded.path if self._unloaded else None

    def loaded_hash(self) -> str | None:
        if self._engine is not None:
            return self._engine.hash
        return self._unloaded.hash if self._unloaded else None

    def loaded_config(self):
        if self._engine is not None:
            return self._engine.config
        return self._unloaded.config if self._unloaded else self.engine.config

    def unload(self) -> None:
        """Drop the model (A1111's unload_model_weights); the routes that only list or
        name it keep answering, and the next job loads it again."""
        with self._engine_lock:
            eng = self._engine
            if eng is None:
                return
            self._unloaded = Unloaded(Path(eng.path) if eng.path else None, eng.hash,
                                      eng.config)
            self._engine = None
            self._more.clear()
            del eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unload_job(self) -> Job:
        return self.jobs.submit(Job("unload", lambda job: self.unload(),
                                    keep_on_disconnect=True))

    def reload_job(self) -> Job:
        """A1111's reload-checkpoint: the model back on its device (loaded if unloaded)."""
        return self.jobs.submit(Job("reload", lambda job: self.engine is None,
                                    keep_on_disconnect=True))

    def refresh_embeddings_job(self) -> Job:
        """Re-read the embeddings folder into the loaded model's EmbeddingDB (in the queue, so
        no job sees a half-read folder). An unloaded model reads it when it loads again."""
        def work(job: Job) -> None:
            for eng in [self._engine, *self._more.values()]:
                if eng is None:
                    continue
                db = eng.prompt_encoder.embeddings
                db.embeddings.clear()
                db.errors.clear()
                if self.embeddings_dir and Path(self.embeddings_dir).is_dir():
                    db.load_dir(self.embeddings_dir)
                db.version += 1  # always a new version: encoders rebuild their lookup tables
                for why in db.errors.values():
                    log.warning("embedding not loaded: %s", why)
        return self.jobs.submit(Job("refresh-embeddings", work, keep_on_disconnect=True))

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """A1111's EmbeddingsResponse: {loaded, skipped}, each {name: EmbeddingItem}; empty
        while the model is unloaded. sdloom's files carry no training step or checkpoint."""
        eng = self._engine
        if eng is None:
            return {"loaded": {}, "skipped": {}}
        enc = eng.prompt_encoder
        skipped = set(enc.skipped_embeddings)
        out: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
        for e in list(enc.embeddings):
            vecs = list(e.vectors.values())
            # as A1111: SDXL files ({clip_l, clip_g}) count vectors and widths over both
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": sum(int(v.shape[-1]) for v in vecs),
                    "vectors": sum(int(v.shape[0]) for v in vecs)}
            out["skipped" if e.name in skipped else "loaded"][e.name] = item
        return out

    def cmd_flags(self) -> dict[str, Any]:
        """The serve options under A1111's names where it has them (`ckpt`, `ckpt_dir`,
        `lora_dir`, …), sdloom's own under theirs; the --api-auth value is never shown."""
        f = self.flags
        auth = f.get("api_auth")
        host = f.get("host", "127.0.0.1")
        return {
            "api": True, "nowebui": False, "listen": host == "0.0.0.0",
            "server_name": host, "port": f.get("port", 7860),
            "api_auth": "*****" if auth else None,  # A1111 shows it; a secret stays here
            "allowed_hosts": f.get("allowed_hosts"),
            "ckpt": str(self.loaded_path()) if self.loaded_path() else None,
            "ckpt_dir": str(self.models_dir) if self.models_dir else None,
            "lora_dir": str(self.lora_dir) if self.lora_dir else None,
            "embeddings_dir": str(self.embeddings_dir) if self.embeddings_dir else None,
            "esrgan_models_path": str(self.upscaler_dir) if self.upscaler_dir else None,
            "vae_dir": str(self.vae_dir) if self.vae_dir else None,
            "controlnet_dir": str(self.controlnet_dir) if self.controlnet_dir else None,
            "styles_file": [str(p) for p in self.styles_files],
            "outdir": str(self.outdir),
            "device": self.device, "precision": self.precision,
            "no_half": self.precision == "fp32",
            "medvram": self.engine_options.get("offload") == "model",
            "lowvram": self.engine_options.get("offload") == "blocks",
            "max_queue": self.max_queue, "limit": list(f.get("limit") or []),
        }

    def _load(self, model: str | Path | None, device: str | None = None) -> Engine:
        return self.loader(str(model) if model else None, device=device or self.devices[0],
                           precision=self.precision, lora_dir=self.lora_dir,
                           embeddings_dir=self.embeddings_dir, upscaler_dir=self.upscaler_dir,
                           **self.engine_options)

    def clip_vision(self, name: str, where: str) -> Path:
        """The CLIP vision encoder an IP-Adapter preprocessor names (clip_h: ViT-H/14, clip_g:
        ViT-bigG/14) in --clip-vision-dir: name.pth/.safetensors/.bin (the extension's
        annotator/downloads/clip_vision files) or a transformers folder `name/`."""
        folder = self.clip_vision_dir
        if folder is not None and folder.is_dir():
            for cand in [folder / name, *(folder / (name + s) for s in
                                          (".safetensors", ".pth", ".bin"))]:
                if cand.exists() and cand.resolve().parent == folder.resolve():
                    return cand
        raise SdloomError(f"{where}: needs the CLIP vision encoder {name}.pth "
                          f"({'ViT-H/14' if name == 'clip_h' else 'ViT-bigG/14'}, the IP-Adapter "
                          "image_encoder) in --clip-vision-dir"
                          + ("" if folder else ", which is not set"))

    def vaes(self) -> dict[str, Path]:
        return list_vaes(self.vae_dir)

    def vae_path(self, opts: dict[str, Any]) -> Path | None:
        """The VAE file the job's sd_vae names; None: the model's own."""
        name = opts.get("sd_vae", "Automatic")
        if name in ("Automatic", "None"):
            return None
        found = self.vaes().get(name)
        if found is None:
            raise SdloomError(f"sd_vae: VAE not found: {name!r}; GET /sdapi/v1/sd-vae lists "
                              "them")
        return found

    def models(self) -> list[Path]:
        """The embedded model, the loaded one, and the files and diffusers folders in
        models_dir."""
        found = [EMBEDDED_MODEL]
        if self.models_dir and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.suffix.lower() in MODEL_SUFFIXES or (p / "model_index.json").exists():
                    found.append(p)
        loaded = self.loaded_path()
        if loaded and loaded not in found:
            found.append(loaded)
        return found

    def title(self, path: Path) -> str:
        h = self.loaded_hash() if self.loaded_path() == path else None
        return f"{path.name} [{h}]" if h else path.name

    def find_model(self, name: Any) -> Path:
        """The listed model whose title, file name or stem is `name` (A1111's
        sd_model_checkpoint); only listed models are found, never a path."""
        if not isinstance(name, str):
            raise SdloomError("sd_model_checkpoint must be a model name")
        for p in self.models():
            if name in (self.title(p), p.name, p.stem, str(p)) or name.split(" [")[0] == p.name:
                return p
        # an option value sdloom cannot honour: a 422 naming it (the rule for options)
        raise SdloomError(f"sd_model_checkpoint: model not found: {name!r}; "
                          "GET /sdapi/v1/sd-models lists them")

    def is_loaded(self, path: Path) -> bool:
        return self.loaded_path() is not None and self.loaded_path() == path

    def select_model_job(self, name: Any) -> Job | None:
        """A job switching to a listed model (POST /options sd_model_checkpoint), queued with
        the generation jobs so no job sees the switch half-way; a model that fails to load
        leaves the current one in place. None when it is loaded already."""
        p = self.find_model(name)
        if self.is_loaded(p):
            return None

        def load(job: Job) -> None:
            if not self.is_loaded(p):
                self.engine = self._load(p)
        return self.jobs.submit(Job("load", load, keep_on_disconnect=True))

    def scrub(self, message: str) -> str:
        """An error message with the server's folders replaced by their role, so clients
        never learn the server's file layout."""
        dirs = [(self.models_dir, "models_dir"), (self.lora_dir, "lora_dir"),
                (self.upscaler_dir, "upscaler_dir"), (self.controlnet_dir, "controlnet_dir"),
                (self.embeddings_dir, "embeddings"), (self.outdir, "outdir"),
                (EMBEDDED_MODEL.parent, "assets"), (Path.cwd(), "."), (Path.home(), "~")]
        if self.engine_path_dir():
            dirs.append((self.engine_path_dir(), "models"))
        pairs = []
        for d, label in dirs:
            if d:
                for form in {str(d), str(Path(d).resolve())}:
                    if len(form) > 1:
                        pairs.append((form, label))
        for form, label in sorted(pairs, key=lambda x: -len(x[0])):
            message = message.replace(form, label)
        return message

    def engine_path_dir(self) -> Path | None:
        if "_engine" not in self.__dict__:  # an error while the first model loads
            return None
        path = self.loaded_path()
        return path.parent if path else None

    # ------------------------------------------------------------------ progress
    def progress(self, id_task: str | None = None, skip_current_image: bool = False
                 ) -> dict[str, Any]:
        """A1111's ProgressResponse for job `id_task`, default the running one. A waiting job
        reports its place in the queue in textinfo (as A1111's /internal/progress), an
        unknown one "Waiting..."; a finished one progress 1."""
        running = self.jobs.running()
        job = self.jobs.find(id_task) if id_task else (running[0] if running else None)
        out: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": IDLE_STATE,
                               "current_image": None, "textinfo": None,
                               "current_task": running[0].id if running else None}
        if job is None:
            if id_task:
                out["textinfo"] = "Waiting..."
            return out
        out["progress"], out["eta_relative"] = job.progress()
        out["state"] = job.state()
        place = self.jobs.position(job)
        if place is not None:
            out["textinfo"] = f"In queue: {place[0]}/{place[1]}"
        if not skip_current_image and job.status == "running":
            out["current_image"] = job.preview_png()
        return out

    # ------------------------------------------------------------------ generation
    def validate(self, params: GenerationParams, config) -> None:
        if _accepts(params.validate, "limits"):
            params.validate(config.default_size, self.limits)
        else:
            params.validate(config.default_size)

    def submit(self, params: GenerationParams, kind: str, model: Path | None = None,
               keep_model: bool = False, *, opts: dict[str, Any] | None = None,
               task_id: str | None = None, save: bool = False) -> Job:
        """Queue a generation job (n_iter batches of batch_size) and return it; its result is
        (engine, Generated). `model` runs the job on another listed model
        (override_settings), kept afterwards only with keep_model; `save` writes the images
        under outdir (save_images) whether or not the client waits for them."""
        self.validate(params, self.loaded_config())  # a bad request fails before it waits
        seed = fix_seed(params.seed)
        subseed = fix_seed(params.subseed) if params.subseed_strength else -1
        seeds, subseeds = all_seeds(seed, params.batch_size * params.n_iter, subseed,
                                    params.subseed_strength)
        opts = opts or self.options
        every = opts.get("show_progress_every_n_steps", PREVIEW_EVERY)
        vae = self.vae_path(opts)

        def work(job: Job) -> tuple[Engine, Generated]:
            job.preview_format = opts.get("live_previews_image_format", "png")
            engine, out = self.with_engine(model, keep_model, lambda eng: run_batches(
                job, eng, params, seeds, subseeds, limits=self.limits, preview_every=every,
                preview=opts.get("show_progress_type", "Approx cheap")),
                worker=job.worker, vae=vae)
            if save:
                self.save(out.images, out.infotexts, out.seeds, kind == "img2img",
                          opts["samples_format"])
            return engine, out

        return self.jobs.submit(Job(kind, work, id=task_id, keep_on_disconnect=save))

    def engine_for(self, worker: int | None) -> Engine:
        """The engine of a worker: worker 0's is `engine`; another device's is a copy of the
        loaded model on that device, loaded on its first job and again after a switch."""
        primary = self.engine
        if not worker:
            return primary
        eng = self._more.get(worker)
        if eng is None or eng.path != primary.path:
            self._more.pop(worker, None)  # the old copy goes before the new one loads
            eng = self._more[worker] = self._load(primary.path, self.devices[worker])
        return eng

    def with_engine(self, model: Path | None, keep_model: bool,
                    run: Callable[[Engine], Any], worker: int | None = None,
                    vae: Path | None = None) -> tuple[Engine, Any]:
        """run(engine) on the loaded model (on `worker`'s device), or on `model` (loaded for
        this job, kept only with keep_model: then every device switches, each on its next
        job), then the engine restored to its state as loaded (on a worker thread)."""
        engine = self.engine_for(worker)
        if model is not None and not self.is_loaded(model):
            engine = self._load(model, self.devices[worker or 0])
            if keep_model:
                if worker:
                    self._more[worker] = engine
                    self.engine = self._load(model)
                else:
                    self.engine = engine
        try:
            engine.set_vae(vae)  # the job's sd_vae (the model's own without one)
            return engine, run(engine)
        finally:
            self._restore(engine)

    def _restore(self, engine: Engine) -> None:
        """Undo the job's per-request state (prompt LoRAs), after success or failure alike,
        so the next job starts from the model as loaded."""
        try:
            engine.set_loras([])
        except Exception:
            log.exception("could not unmerge LoRAs; reloading the model")
            if engine is self._engine:
                self.engine = self._load(engine.path)
            return
        manager = getattr(engine, "loras", None)
        if manager is not None and getattr(manager, "backup", None):
            manager.clear()  # a merge that failed half way (older Engine.set_loras)

    # ------------------------------------------------------------------ saving
    def save(self, images: list, infos: list[str], seeds: list[int], img2img: bool,
             fmt: str, grid: bool = False) -> None:
        """save_images: atomic writes under outdir (A1111's outdir_{txt2img,img2img}_samples,
        or _grids); a failed write leaves no empty file."""
        from ..images import unique_output_path
        from ..infotext import save_image
        folder = self.outdir / (("img2img" if img2img else "txt2img")
                                + ("-grids" if grid else "-images"))
        ext = ".jpg" if fmt == "jpeg" else "." + fmt
        for im, t, sd in zip(images, infos, seeds):
            path = None
            try:
                path = unique_output_path(folder, suffix=f"-{sd}", ext=ext)
                save_image(im, path, t)
            except OSError as e:
                if path is not None and path.exists() and path.stat().st_size == 0:
                    path.unlink()
                log.error("save_images failed: %s", e)
                raise HTTPException(500, f"cannot save the image under outdir: "
                                         f"{e.strerror or type(e).__name__}") from None


# ---------------------------------------------------------------------- the app
def create_app(server: Server, api_auth: str | None = None, *,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI application. `api_auth` "u1:p1,u2:p2" requires HTTP basic auth on every
    route (API, web page, /docs, /openapi.json); `allowed_hosts` limits the Host header."""
    app = FastAPI(title="sdloom", version=__version__)
    app.add_middleware(Guard, max_body=server.limits.max_body_bytes,
                       users=parse_users(api_auth) if api_auth is not None else None,
                       allowed_hosts=allowed_hosts)
    # Pillow's own bomb check agrees with the limit (it warns above, refuses at twice)
    Image.MAX_IMAGE_PIXELS = max(server.limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or 0)

    @app.exception_handler(SdloomError)
    async def sdloom_error(_r: Request, e: SdloomError) -> JSONResponse:
        return JSONResponse(error_body(type(e).__name__, server.scrub(str(e))),
                            status_code=e.http_status)

    @app.exception_handler(QueueFull)
    async def queue_full(_r: Request, e: QueueFull) -> JSONResponse:
        return JSONResponse(error_body("QueueFull", str(e)), status_code=503,
                            headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        name = "LimitError" if isinstance(e, BodyTooLarge) else "HTTPException"
        return JSONResponse(error_body(name, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:8]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = str(err.get("msg", "invalid"))
            parts.append(f"{loc}: {msg}" if loc else msg)
        return JSONResponse(error_body("ValidationError", "; ".join(parts) or "invalid request"),
                            status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_r: Request, e: Exception) -> JSONResponse:  # behind Guard
        log.error("unexpected error: %r", e)
        return JSONResponse(error_body("InternalError", "internal server error; the server "
                                       "log has the details"), status_code=500)

    api = "/sdapi/v1"

    async def wait(job: Job, request: Request) -> Any:
        """The job's result, awaited on the event loop (no thread held while it waits). A
        client that goes away cancels its job (unless the job must finish without it, as
        save_images): a waiting job leaves the queue, a running one stops at its next step."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        job.add_done_callback(lambda: loop.call_soon_threadsafe(done.set))
        cancelled = False
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except asyncio.TimeoutError:
                if not cancelled and not job.keep_on_disconnect \
                        and await request.is_disconnected():
                    log.info("client of %s went away; cancelling it", job.id)
                    server.jobs.cancel(job)
                    cancelled = True
        return job.outcome()

    async def respond(req: Txt2ImgRequest, request: Request, img2img: bool) -> dict[str, Any]:
        kind = "img2img" if img2img else "txt2img"
        if is_xyz(req.script_name):
            job, p, opts = await run_in_threadpool(xyz_job, server, req, img2img, to_params)
        else:
            p, opts, model = await run_in_threadpool(to_params, req, server, img2img)
            job = server.submit(p, kind, model,
                                keep_model=not req.override_settings_restore_afterwards,
                                opts=opts, task_id=req.force_task_id, save=req.save_images)
        try:
            eng, out = await wait(job, request)
        except Cancelled:  # interrupted while it waited: no images, as an early interrupt
            eng, out = server.engine, Generated([], [], [], [])
        return await run_in_threadpool(response_body, req, p, opts, eng, out, img2img)

    @app.post(f"{api}/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        return await respond(req, request, img2img=False)

    @app.post(f"{api}/img2img")
    async def img2img(req: Img2ImgRequest, request: Request) -> dict[str, Any]:
        return await respond(req, request, img2img=True)

    @app.post(f"{api}/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        img = decode_image(req.image, "image", server.limits)
        items = {k: v for k, v in img.info.items() if isinstance(v, str)}
        text = items.pop("parameters", None)
        if text is None:
            from ..infotext import infotext_of
            text = infotext_of(img)
        return {"info": text or "", "items": items,
                "parameters": parse_infotext(text) if text else {}}

    # control routes are coroutines on the event loop: they take no worker thread and never
    # wait for a job, so they answer at once however many jobs run or wait. id_task (sdloom's
    # extension; A1111 has one global state) names a job; the default is the running one.
    def target(id_task: str | None) -> list[Job]:
        if id_task:
            job = server.jobs.find(id_task)
            return [job] if job is not None and not job.done else []
        return server.jobs.running()

    @app.get(f"{api}/progress")
    async def progress(skip_current_image: bool = False, id_task: str | None = None
                       ) -> dict[str, Any]:
        return server.progress(id_task, skip_current_image)

    @app.post(f"{api}/interrupt")
    async def interrupt(id_task: str | None = None) -> dict[str, Any]:
        for job in target(id_task):
            server.jobs.cancel(job)
        return {}

    @app.post(f"{api}/skip")
    async def skip(id_task: str | None = None) -> dict[str, Any]:
        for job in target(id_task):
            job.skip()
        return {}

    @app.get("/internal/ping")
    async def ping() -> dict[str, Any]:
        return {}

    @app.get("/internal/pending-tasks")
    async def pending_tasks() -> dict[str, Any]:
        """A1111's queue view: the ids of the jobs waiting for a worker, first first."""
        ids = [j.id for j in server.jobs.pending()]
        return {"size": len(ids), "tasks": ids}

    @app.post("/internal/progress")
    async def internal_progress(body: InternalProgressRequest) -> dict[str, Any]:
        """A1111's web UI progress (modules/progress.py progressapi) for one task."""
        job = server.jobs.find(body.id_task) if body.id_task else None
        place = server.jobs.position(job) if job is not None else None
        active = job is not None and job.status == "running"
        out: dict[str, Any] = {"active": active, "queued": place is not None,
                               "completed": job is not None and job.done,
                               "progress": None, "eta": None, "live_preview": None,
                               "id_live_preview": -1, "textinfo": None}
        if not active:
            out["textinfo"] = f"In queue: {place[0]}/{place[1]}" if place else "Waiting..."
            return out
        out["progress"], out["eta"] = job.progress()
        out["id_live_preview"] = body.id_live_preview
        if body.live_preview and job.preview_id != body.id_live_preview:
            data = job.preview_png()
            if data is not None:
                out["live_preview"] = "data:image/png;base64," + data
                out["id_live_preview"] = job.preview_id
        return out

    @app.get(f"{api}/options")
    def get_options() -> dict[str, Any]:
        path = server.loaded_path() or EMBEDDED_MODEL
        return {**server.options, "sd_model_checkpoint": server.title(path),
                "sd_checkpoint_hash": server.loaded_hash()}

    @app.post(f"{api}/options")
    async def set_options(body: OptionsRequest, request: Request) -> dict[str, Any]:
        """sd_model_checkpoint switches the model (a job in the queue); the options in OPTIONS
        are checked, then kept; other keys are ignored (options sdloom does not have).
        Nothing is stored unless every value is valid and the model loaded."""
        values = dict(body.model_extra or {})
        checked = check_options(values, server.vaes())
        if "sd_model_checkpoint" in values:
            job = server.select_model_job(values["sd_model_checkpoint"])
            if job is not None:
                await wait(job, request)
        server.options.update(checked)
        return {}

    app.include_router(probes_router(server, wait), prefix=api)
    app.include_router(extras_router(server, wait, decode_image), prefix=api)

    add_controlnet_routes(app, server, decode_image)
    app.include_router(history_router(server))  # the web page's image browser of outdir

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/web/{name}", include_in_schema=False)
    def web(name: str) -> FileResponse:
        if name not in {p.name for p in WEB.iterdir()}:
            raise HTTPException(404, "not found")
        return FileResponse(WEB / name)

    return app
