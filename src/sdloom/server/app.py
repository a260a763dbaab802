"""`sdloom serve`: A1111's HTTP API (`/sdapi/v1/…`) over one Engine, one job at a time, and a
small web page over that API at `/`.

Request and response fields are A1111's (reference/a1111.md), so its clients work unchanged.
Differences, each deliberate: width/height default to the model's own size (A1111: 512 for
every model); face restoration, tiling, styles and scripts are refused with a 422 naming the
field rather than ignored; image URLs are refused (only base64 and data URLs are read);
/interrupt keeps the batches already finished and drops the one in progress.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from .. import __version__
from ..errors import SdloomError
from ..infotext import encode_image, parse_infotext
from ..pipelines.engine import EMBEDDED_MODEL, Engine
from ..pipelines.generate import LATENT_UPSCALERS, generate
from ..pipelines.params import GenerationParams
from ..sampling.samplers import SAMPLERS
from ..sampling.schedules import LABELS
from ..seeds import all_seeds, fix_seed

MODEL_SUFFIXES = (".safetensors", ".ckpt")
WEB = Path(__file__).parent / "web"  # the page: index.html, app.js, style.css
LATENT_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")
assert {m.lower() for m in LATENT_MODES} == set(LATENT_UPSCALERS)


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img fields (all optional); unknown fields are
    accepted and ignored, as A1111 clients send many."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    s_noise: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    override_settings: dict[str, Any] | None = None
    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionProcessingImg2Img fields (its API defaults)."""
    init_images: list[str] | None = None
    mask: str | None = None
    include_init_images: bool = False
    resize_mode: int = 0
    mask_blur: int | None = None
    mask_blur_x: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0


class PngInfoRequest(BaseModel):
    image: str


class Stop(Exception):
    """Raised from the progress callback: the job was interrupted or its batch skipped."""


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 string or data URL → an image; anything else is a 422."""
    if data.startswith(("http://", "https://")):
        raise HTTPException(422, f"{what}: image URLs are not fetched; send base64")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        img.load()
        return img
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise HTTPException(422, f"{what}: not a base64-encoded image ({e})") from None


class Server:
    """The loaded model, the job lock and the progress state shared by the routes."""

    def __init__(self, model: str | None = None, *, models_dir: str | None = None,
                 device: str = "auto", precision: str = "auto", lora_dir: str | None = None,
                 embeddings_dir: str | None = None, outdir: str = "outputs",
                 loader: Callable[..., Engine] = Engine.load):
        self.models_dir = Path(models_dir) if models_dir else None
        self.device, self.precision = device, precision
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.outdir = Path(outdir)  # where save_images writes, as A1111's outdir_*_samples
        self.loader = loader
        self.lock = threading.Lock()  # one job at a time: the model is not re-entrant
        self.options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}
        self.state: dict[str, Any] = {}
        self.stop: str | None = None  # "interrupt" | "skip", read by the progress callback
        self.reset_state()
        self.engine = self._load(model)

    # ------------------------------------------------------------------ models
    def _load(self, model: str | None) -> Engine:
        return self.loader(model, device=self.device, precision=self.precision,
                           lora_dir=self.lora_dir, embeddings_dir=self.embeddings_dir)

    def models(self) -> list[Path]:
        """The embedded model, the loaded one, and the files and diffusers folders in
        models_dir."""
        found = [EMBEDDED_MODEL]
        if self.models_dir and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.suffix.lower() in MODEL_SUFFIXES or (p / "model_index.json").exists():
                    found.append(p)
        if self.engine.path and Path(self.engine.path) not in found:
            found.append(Path(self.engine.path))
        return found

    def title(self, path: Path) -> str:
        same = self.engine.path and Path(self.engine.path) == path
        return f"{path.name} [{self.engine.hash}]" if same and self.engine.hash else path.name

    def select_model(self, name: str) -> None:
        """Switch to the model whose title, file name or stem is `name` (A1111's
        sd_model_checkpoint)."""
        for p in self.models():
            if name in (self.title(p), p.name, p.stem, str(p)) or name.split(" [")[0] == p.name:
                if not (self.engine.path and Path(self.engine.path) == p):
                    with self.lock:
                        self.engine = self._load(str(p))
                return
        raise HTTPException(422, f"unknown model {name!r}; GET /sdapi/v1/sd-models lists them")

    # ------------------------------------------------------------------ progress
    def reset_state(self) -> None:
        self.state = {"skipped": False, "interrupted": False, "stopping_generation": False,
                      "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
                      "sampling_step": 0, "sampling_steps": 0}
        self.started = 0.0

    def progress(self) -> dict[str, Any]:
        s = dict(self.state)
        p = 0.0
        if s["job_count"] > 0:
            p = 0.01 + s["job_no"] / s["job_count"]
            if s["sampling_steps"] > 0:
                p += s["sampling_step"] / s["sampling_steps"] / s["job_count"]
        p = min(p, 1.0)
        elapsed = time.time() - self.started if self.started else 0.0
        eta = elapsed / p - elapsed if p > 0 else 0.0
        return {"progress": p, "eta_relative": eta, "state": s, "current_image": None,
                "textinfo": None}

    # ------------------------------------------------------------------ generation
    def run(self, params: GenerationParams, job: str) -> tuple[list, list[str], list[int],
                                                                 list[int]]:
        """Run a job batch by batch (n_iter batches of batch_size): /skip drops the batch in
        progress, /interrupt also the batches still to come."""
        params.validate(self.engine.config.default_size)  # a bad request fails before the lock
        seed = fix_seed(params.seed)
        subseed = fix_seed(params.subseed) if params.subseed_strength else -1
        bs, n = params.batch_size, params.n_iter
        seeds, subseeds = all_seeds(seed, bs * n, subseed, params.subseed_strength)
        images, infos, done_seeds, done_subseeds = [], [], [], []
        with self.lock:
            self.stop = None
            self.reset_state()
            self.started = time.time()
            self.state.update(job=job, job_count=n,
                              job_timestamp=time.strftime("%Y%m%d%H%M%S"))

            def callback(step: int, total: int, _x) -> None:
                self.state.update(sampling_step=step, sampling_steps=total)
                if self.stop:
                    raise Stop(self.stop)

            try:
                for k in range(n):
                    self.state.update(job_no=k, sampling_step=0)
                    if self.stop == "interrupt":
                        break
                    self.stop = None
                    one = GenerationParams(**{**params.__dict__, "n_iter": 1,
                                              "seed": seeds[k * bs],
                                              "subseed": subseeds[k * bs]})
                    if params.all_prompts is not None:
                        one.all_prompts = params.all_prompts[k * bs:(k + 1) * bs]
                    try:
                        res = generate(self.engine, one, callback)
                    except Stop:
                        if self.stop == "interrupt":
                            break
                        continue  # skipped: on to the next batch
                    images += res.images
                    infos += res.infotexts
                    done_seeds += res.seeds
                    done_subseeds += res.subseeds
            finally:
                self.stop = None
                self.reset_state()
        return images, infos, done_seeds, done_subseeds


def _clip_skip(v: Any) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise HTTPException(422, f"CLIP_stop_at_last_layers must be an integer ≥ 1, not {v!r}")
    return n


def to_params(req: Txt2ImgRequest, server: Server, img2img: bool) -> GenerationParams:
    """An A1111 request → GenerationParams, refusing what sdloom does not do."""
    unsupported = [name for name, on in (
        ("restore_faces", req.restore_faces), ("tiling", req.tiling), ("styles", req.styles),
        ("script_name", req.script_name), ("alwayson_scripts", req.alwayson_scripts),
        ("seed_resize_from_w/h", req.seed_resize_from_w > 0 or req.seed_resize_from_h > 0))
        if on]
    if unsupported:
        raise HTTPException(422, f"not supported by sdloom: {', '.join(unsupported)}")
    opts = {**server.options, **(req.override_settings or {})}
    clip_skip = _clip_skip(opts.get("CLIP_stop_at_last_layers", 1))
    p = GenerationParams(
        prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width,
        height=req.height, steps=req.steps, cfg_scale=req.cfg_scale,
        sampler_name=req.sampler_name or req.sampler_index or "Euler",
        scheduler=req.scheduler or "automatic", seed=req.seed, subseed=req.subseed,
        subseed_strength=req.subseed_strength, batch_size=req.batch_size, n_iter=req.n_iter,
        clip_skip=clip_skip, eta=req.eta,
        s_noise=req.s_noise)
    if not img2img:
        p.enable_hr = req.enable_hr
        p.hr_scale, p.hr_second_pass_steps = req.hr_scale, req.hr_second_pass_steps
        p.hr_resize_x, p.hr_resize_y = req.hr_resize_x, req.hr_resize_y
        p.hr_upscaler = req.hr_upscaler or "Latent"
        p.hr_sampler_name, p.hr_scheduler = req.hr_sampler_name or None, req.hr_scheduler or None
        p.hr_prompt, p.hr_negative_prompt = req.hr_prompt, req.hr_negative_prompt
        p.denoising_strength = 0.75 if req.denoising_strength is None else req.denoising_strength
        return p
    assert isinstance(req, Img2ImgRequest)
    if not req.init_images:
        raise HTTPException(404, "Init image not found")
    p.init_image = decode_image(req.init_images[0], "init_images[0]").convert("RGB")
    p.denoising_strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    p.resize_mode = req.resize_mode
    if p.width is None and p.height is None:  # keep the input's size, rounded down to 8
        p.width, p.height = p.init_image.width // 8 * 8, p.init_image.height // 8 * 8
    if req.mask:
        p.mask = decode_image(req.mask, "mask")
        p.mask_blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
        p.inpainting_fill = req.inpainting_fill
        p.inpaint_full_res = req.inpaint_full_res
        p.inpaint_full_res_padding = req.inpaint_full_res_padding
        p.inpainting_mask_invert = bool(req.inpainting_mask_invert)
    return p


def create_app(server: Server, api_auth: str | None = None) -> FastAPI:
    """The FastAPI application; `api_auth` "user:pass" requires HTTP basic auth everywhere."""
    app = FastAPI(title="sdloom", version=__version__)
    basic = HTTPBasic(auto_error=False)

    def check_auth(cred: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if api_auth is None:
            return
        user, _, pw = api_auth.partition(":")
        ok = cred is not None and secrets.compare_digest(cred.username, user) \
            and secrets.compare_digest(cred.password, pw)
        if not ok:
            raise HTTPException(401, "Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    @app.exception_handler(SdloomError)
    async def sdloom_error(_request: Request, e: SdloomError) -> JSONResponse:
        return JSONResponse({"error": "SdloomError", "detail": str(e)}, status_code=422)

    api = "/sdapi/v1"
    deps = [Depends(check_auth)]

    def respond(req: Txt2ImgRequest, img2img: bool) -> dict[str, Any]:
        p = to_params(req, server, img2img)
        fmt = str({**server.options, **(req.override_settings or {})}
                  .get("samples_format", "png"))
        images, infos, seeds, subseeds = server.run(p, "img2img" if img2img else "txt2img")
        eng = server.engine
        info = {
            "prompt": p.prompt, "all_prompts": [p.prompt] * len(images),
            "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * len(images),
            "seed": seeds[0] if seeds else None, "all_seeds": seeds,
            "subseed": subseeds[0] if subseeds else None, "all_subseeds": subseeds,
            "subseed_strength": p.subseed_strength, "width": p.width, "height": p.height,
            "sampler_name": p.sampler_name, "cfg_scale": p.cfg_scale, "steps": p.steps,
            "batch_size": p.batch_size,
            "denoising_strength": p.denoising_strength if img2img or p.enable_hr else None,
            "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": eng.name, "sd_model_hash": eng.hash, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infos,
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": p.clip_skip,
            "is_using_inpainting_conditioning": eng.config.is_inpaint,
            "version": f"sdloom {__version__}"}
        params = req.model_dump()
        if img2img and not params.get("include_init_images"):
            params["init_images"], params["mask"] = None, None
        if req.save_images:
            from ..images import unique_output_path
            from ..infotext import save_image
            folder = server.outdir / ("img2img-images" if img2img else "txt2img-images")
            ext = ".jpg" if fmt.lower() == "jpeg" else "." + fmt.lower()
            for im, t, sd in zip(images, infos, seeds):
                save_image(im, unique_output_path(folder, suffix=f"-{sd}", ext=ext), t)
        out = [base64.b64encode(encode_image(im, fmt, t)).decode("ascii")
               for im, t in zip(images, infos)] if req.send_images else []
        return {"images": out, "parameters": params, "info": json.dumps(info)}

    @app.post(f"{api}/txt2img", dependencies=deps)
    def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        return respond(req, img2img=False)

    @app.post(f"{api}/img2img", dependencies=deps)
    def img2img(req: Img2ImgRequest) -> dict[str, Any]:
        return respond(req, img2img=True)

    @app.post(f"{api}/png-info", dependencies=deps)
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        img = decode_image(req.image, "image")
        items = {k: v for k, v in img.info.items() if isinstance(v, str)}
        text = items.pop("parameters", None)
        if text is None:
            from ..infotext import infotext_of
            text = infotext_of(img)
        return {"info": text or "", "items": items,
                "parameters": parse_infotext(text) if text else {}}

    @app.get(f"{api}/progress", dependencies=deps)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return server.progress()

    @app.post(f"{api}/interrupt", dependencies=deps)
    def interrupt() -> dict[str, Any]:
        if server.state["job_count"]:
            server.stop = "interrupt"
            server.state.update(interrupted=True, stopping_generation=True)
        return {}

    @app.post(f"{api}/skip", dependencies=deps)
    def skip() -> dict[str, Any]:
        if server.state["job_count"] and server.stop is None:
            server.stop = "skip"
            server.state.update(skipped=True)
        return {}

    @app.get(f"{api}/options", dependencies=deps)
    def get_options() -> dict[str, Any]:
        path = Path(server.engine.path) if server.engine.path else EMBEDDED_MODEL
        return {**server.options, "sd_model_checkpoint": server.title(path),
                "sd_checkpoint_hash": server.engine.hash}

    @app.post(f"{api}/options", dependencies=deps)
    def set_options(body: dict[str, Any]) -> dict[str, Any]:
        """sd_model_checkpoint switches the model; CLIP_stop_at_last_layers and samples_format
        are kept; other keys are ignored (options sdloom does not have)."""
        if "samples_format" in body and str(body["samples_format"]).lower() not in (
                "png", "jpg", "jpeg", "webp"):
            raise HTTPException(422, "samples_format must be png, jpg or webp")
        if "CLIP_stop_at_last_layers" in body:
            body["CLIP_stop_at_last_layers"] = _clip_skip(body["CLIP_stop_at_last_layers"])
        if "sd_model_checkpoint" in body:
            server.select_model(str(body["sd_model_checkpoint"]))
        for k in ("CLIP_stop_at_last_layers", "samples_format"):
            if k in body:
                server.options[k] = body[k]
        return {}

    @app.get(f"{api}/samplers", dependencies=deps)
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}}
                for s in SAMPLERS.values()]

    @app.get(f"{api}/schedulers", dependencies=deps)
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": k, "label": v, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for k, v in LABELS.items()]

    @app.get(f"{api}/upscalers", dependencies=deps)
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None,
                 "scale": 4} for n in ("None", "Lanczos", "Nearest")]

    @app.get(f"{api}/latent-upscale-modes", dependencies=deps)
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": n} for n in LATENT_MODES]

    @app.get(f"{api}/sd-models", dependencies=deps)
    def sd_models() -> list[dict[str, Any]]:
        out = []
        for p in server.models():
            loaded = server.engine.path and Path(server.engine.path) == p
            out.append({"title": server.title(p), "model_name": p.stem,
                        "hash": server.engine.hash if loaded else None, "sha256": None,
                        "filename": str(p), "config": None})
        return out

    @app.get(f"{api}/sd-vae", dependencies=deps)
    def sd_vae() -> list:
        return []

    @app.get(f"{api}/loras", dependencies=deps)
    def loras() -> list[dict[str, Any]]:
        d = Path(server.lora_dir) if server.lora_dir else None
        files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".pt", ".ckpt")) \
            if d and d.is_dir() else []
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                for p in files]

    @app.get("/", dependencies=deps, include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/web/{name}", dependencies=deps, include_in_schema=False)
    def web(name: str) -> FileResponse:
        if name not in {p.name for p in WEB.iterdir()}:
            raise HTTPException(404, "not found")
        return FileResponse(WEB / name)

    @app.post(f"{api}/refresh-checkpoints", dependencies=deps)
    def refresh_checkpoints() -> dict[str, Any]:
        return {}  # the list is read from models_dir on every request

    return app
