"""Jobs and their queue for `sdloom serve`: each request's work is a `Job` with its own id,
progress and cancel token, run in arrival order by one worker thread per engine.

A1111's semantics (modules/progress.py, shared_state.py, processing.py): task ids
`task(<kind>-XXXXXXX)` unless the client forces one (`force_task_id`); progress
0.01 + job_no/job_count + step/steps/job_count; /interrupt stops the job, which returns the
batches finished so far and the partly denoised batch in progress; /skip drops the batch in
progress; a live preview every `show_progress_every_n_steps` steps from the latest x̂0.

Differences, each deliberate: progress, interrupt and skip name a job (`id_task`), default
the running one, instead of one global state; at most `max_queue` jobs run or wait and more
get a 503 with Retry-After (A1111's queue is unbounded); a job whose client went away is
cancelled (unless it saves images), so it never holds up the jobs behind it.

Several devices: `JobQueue(workers=n)` starts n workers that take jobs from the same FIFO,
and a job knows which worker (`job.worker`) runs it; the Server (`--device cuda:0,cuda:1`
or `all`) gives worker i an engine on device i (`Server.engine_for`), so prompt LoRAs and
per-request models touch only that worker's engine, and a kept model switch reaches every
device on its next job.
"""
from __future__ import annotations

import base64
import inspect
import io
import secrets
import string
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..errors import SdloomError
from ..images import image_grid, to_pil
from ..infotext import format_infotext
from ..limits import DEFAULT_LIMITS, Limits
from ..pipelines.generate import generate
from ..pipelines.params import GenerationParams
from ..sampling.samplers import resolve_sampler
from ..sampling.schedules import scheduler_label

PREVIEW_EVERY = 10  # A1111's show_progress_every_n_steps default ("Live preview display period")
FINISHED_KEPT = 16  # A1111 remembers the last 16 finished task ids (progress.finished_tasks)


class Stop(Exception):
    """Raised from the progress callback: the job was interrupted or its batch skipped."""


class Cancelled(SdloomError):
    """The job was interrupted before it started."""
    http_status = 409


class QueueFull(SdloomError):
    """More than max_queue jobs would run or wait: a 503 with a Retry-After estimate."""
    http_status = 503

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def task_id(kind: str) -> str:
    """A1111's create_task_id: `task(<kind>-<7 of A-Z0-9>)`."""
    alphabet = string.ascii_uppercase + string.digits
    return f"task({kind}-{''.join(secrets.choice(alphabet) for _ in range(7))})"


class Job:
    """One request's work, its progress (A1111's state fields) and its cancel token."""

    def __init__(self, kind: str, work: Callable[[Job], Any], *, id: str | None = None,
                 keep_on_disconnect: bool = False):
        self.id = id or task_id(kind)
        self.kind, self.work = kind, work
        self.keep_on_disconnect = keep_on_disconnect  # e.g. save_images: finish without client
        self.status = "queued"  # queued | running | done | failed | cancelled
        self.created, self.started, self.finished = time.time(), 0.0, 0.0
        self.worker: int | None = None
        self.preview_format = "png"  # A1111's live_previews_image_format
        self.stop: str | None = None  # "interrupt" | "skip": read by the progress callback
        self.job_count = self.job_no = self.sampling_step = self.sampling_steps = 0
        self.job_timestamp = "0"
        self.skipped = self.interrupted = False
        self.preview: Image.Image | None = None
        self.preview_id = 0  # grows with each new preview (A1111 id_live_preview)
        self.preview_step = 0  # the step of this batch the preview was made at
        self._preview_b64: tuple[int, str] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control
    def interrupt(self) -> None:
        self.stop, self.interrupted = "interrupt", True

    def skip(self) -> None:
        if self.stop is None:
            self.stop, self.skipped = "skip", True

    def check(self) -> None:
        """Called between steps: raise Stop when interrupted or skipped."""
        if self.stop:
            raise Stop(self.stop)

    # ------------------------------------------------------------------ progress
    def begin(self, job_count: int) -> None:
        self.job_count, self.job_no = job_count, 0
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")

    def next_batch(self, job_no: int) -> None:
        """A1111's state.nextjob: a new batch starts at step 0 with its own preview period."""
        self.job_no, self.sampling_step, self.preview_step = job_no, 0, 0
        if self.stop == "skip":
            self.stop, self.skipped = None, False

    def set_preview(self, image: Image.Image, step: int) -> None:
        self.preview, self.preview_step = image, step
        self.preview_id += 1

    def preview_png(self) -> str | None:
        """The live preview as base64 (PNG, or the job's live_previews_image_format), encoded
        once per preview (on the caller's thread)."""
        img, pid = self.preview, self.preview_id
        if img is None:
            return None
        cached = self._preview_b64
        if cached is not None and cached[0] == pid:
            return cached[1]
        buf = io.BytesIO()
        fmt = {"jpeg": "JPEG", "webp": "WEBP"}.get(self.preview_format, "PNG")
        (img.convert("RGB") if fmt == "JPEG" else img).save(buf, format=fmt)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        self._preview_b64 = (pid, data)
        return data

    def state(self) -> dict[str, Any]:
        """A1111's shared.state.dict()."""
        return {"skipped": self.skipped, "interrupted": self.interrupted,
                "stopping_generation": self.interrupted, "job": self.kind,
                "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                "job_no": self.job_no, "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps}

    def progress(self) -> tuple[float, float]:
        """(progress, eta_relative) by A1111's formula (api.py progressapi): 0.01 + job_no /
        job_count + step / steps / job_count, capped at 1; the ETA from the uncapped value."""
        if self.status != "running" or self.job_count <= 0:
            return (1.0 if self.finished else 0.0), 0.0
        p = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            p += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.started
        return min(p, 1.0), elapsed / p - elapsed

    # ------------------------------------------------------------------ outcome
    def finish(self, result: Any = None, error: BaseException | None = None,
               status: str | None = None) -> None:
        self.result, self.error = result, error
        self.status = status or ("failed" if error is not None else "done")
        self.finished = time.time()
        self.preview = None  # previews are for running jobs
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call fn (from the worker thread) once the job has finished; at once if it has."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def outcome(self) -> Any:
        """The result of a finished job, or its error raised."""
        if self.error is not None:
            raise self.error
        return self.result

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still running")
        return self.outcome()


class JobQueue:
    """A bounded FIFO of jobs and the worker threads that run them, one job per worker at a
    time (an engine is not re-entrant). `max_queue` counts running and waiting jobs."""

    def __init__(self, max_queue: int = 8, workers: int = 1):
        if max_queue < 1 or workers < 1:
            raise ValueError("max_queue and workers must be ≥ 1")
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=16)
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                          name=f"sdloom-worker-{i}") for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, job: Job) -> Job:
        """Queue a job, or raise QueueFull (503) when max_queue jobs already run or wait."""
        with self._cond:
            if self._closed:
                raise QueueFull("server is shutting down", 5)
            busy = len(self._waiting) + len(self._running)
            if busy >= self.max_queue:
                raise QueueFull(f"server busy: {busy} jobs queued (--max-queue "
                                f"{self.max_queue}); retry later", self.retry_after())
            if self._find(job.id) is not None and not self._find(job.id).done:
                raise SdloomError(f"task id {job.id!r} is already queued or running")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean of recent job durations × the jobs
        ahead per worker, at least 1 (5 when no job has finished yet)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        ahead = max(1, len(self._waiting) + 1) / len(self._threads)
        return max(1, min(3600, round(mean * ahead)))

    # ------------------------------------------------------------------ looking up
    def _find(self, id: str) -> Job | None:
        for job in list(self._running.values()) + list(self._waiting):
            if job.id == id:
                return job
        return self._finished.get(id)

    def find(self, id: str) -> Job | None:
        with self._cond:
            return self._find(id)

    def running(self) -> list[Job]:
        with self._cond:
            return [self._running[k] for k in sorted(self._running)]

    def pending(self) -> list[Job]:
        """Jobs waiting for a worker, first to run first."""
        with self._cond:
            return list(self._waiting)

    def position(self, job: Job) -> tuple[int, int] | None:
        """(1-based place, number waiting) of a waiting job; None when it is not waiting."""
        with self._cond:
            for i, j in enumerate(self._waiting):
                if j is job:
                    return i + 1, len(self._waiting)
        return None

    def busy(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running)

    # ------------------------------------------------------------------ cancelling
    def cancel(self, job: Job) -> None:
        """Interrupt a job: a waiting one leaves the queue at once (Cancelled), a running one
        stops at its next step and returns what it has."""
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        job.interrupt()
        if waiting:
            self._retire(job, error=Cancelled(f"job {job.id} was interrupted before it ran"),
                         status="cancelled")

    # ------------------------------------------------------------------ workers
    def _work(self, index: int) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                job.worker, job.status, job.started = index, "running", time.time()
                self._running[index] = job
            result, error = None, None
            try:
                result = job.work(job)
            except BaseException as e:  # the job's error goes to its client; the worker lives on
                error = e
            with self._cond:
                self._running.pop(index, None)
                self._durations.append(time.time() - job.started)
            self._retire(job, result, error)

    def _retire(self, job: Job, result: Any = None, error: BaseException | None = None,
                status: str | None = None) -> None:
        with self._cond:
            self._finished[job.id] = job
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        job.finish(result, error, status)

    def close(self) -> None:
        """Stop the workers once their jobs end; waiting jobs are cancelled."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for job in waiting:
            job.interrupt()
            self._retire(job, error=Cancelled("server is shutting down"), status="cancelled")


# ---------------------------------------------------------------------- generation jobs
@dataclass
class Generated:
    """What a generation job returns: images and their infotexts and seeds, in order."""
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]


def approx_preview(x0: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor | None]
                   ) -> Image.Image:
    """A1111's "Approx cheap" preview of a batch's x̂0 [B, C, h, w]: latent → RGB by a [C, 3]
    matrix (+ bias), one pixel per latent cell, the batch as a grid (show_progress_grid)."""
    m, bias = factors
    x = x0.detach().float().cpu()
    rgb = torch.einsum("bchw,cr->brhw", x, m.float())
    if bias is not None:
        rgb = rgb + bias.float().view(1, 3, 1, 1)
    images = to_pil(rgb)
    return images[0] if len(images) == 1 else image_grid(images)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _partial_infotext(engine, p: GenerationParams, prompt: str, seed: int) -> str:
    """The core parameters of an interrupted image (the pipeline writes the full infotext
    only for images it finished)."""
    spec, scheduler = resolve_sampler(p.sampler_name, p.scheduler)
    return format_infotext(prompt, p.negative_prompt, {
        "Steps": p.steps, "Sampler": spec.name,
        "Schedule type": scheduler_label(scheduler) if scheduler else None,
        "CFG scale": p.cfg_scale, "Seed": seed, "Size": f"{p.width}x{p.height}",
        "Model hash": engine.hash, "Model": engine.name})


def run_batches(job: Job, engine, params: GenerationParams, seeds: list[int],
                subseeds: list[int], *, limits: Limits = DEFAULT_LIMITS,
                preview_every: int = PREVIEW_EVERY, first_batch: int | None = None,
                preview: str = "Approx cheap") -> Generated:
    """Run a generation job batch by batch (n_iter batches of batch_size) on `engine`.

    /skip drops the batch in progress; /interrupt also the batches still to come, and returns
    the partly denoised batch in progress decoded from its latest x̂0 (A1111 returns the
    sampler's last x̂0), except for masked img2img, whose overlay needs the finished image.
    first_batch: where these batches start in a job the caller has begun (job.begin) for
    several runs, as the X/Y/Z plot's cells; None begins the job here with n batches.
    preview: A1111's show_progress_type, "Approx cheap" (latent → RGB factors) or "Full"
    (x̂0 through the VAE: exact, one decode per preview)."""
    bs, n = params.batch_size, params.n_iter
    factors = engine.family.preview_factors(engine.config) if preview_every > 0 else None
    out = Generated([], [], [], [])
    latest: dict[str, torch.Tensor] = {}
    if first_batch is None:
        job.begin(n)

    def callback(step: int, total: int, x0: torch.Tensor | None) -> None:
        job.sampling_step, job.sampling_steps = step, total
        if x0 is not None:
            latest["x0"] = x0
            if preview_every > 0 and step - job.preview_step >= preview_every:
                if preview == "Full":
                    images = to_pil(engine.decode(x0))
                    job.set_preview(images[0] if len(images) == 1 else image_grid(images),
                                    step)
                elif factors is not None:
                    job.set_preview(approx_preview(x0, factors), step)
        job.check()

    kw = {"limits": limits} if _accepts(generate, "limits") else {}
    for k in range(n):
        job.next_batch(k + (first_batch or 0))
        if job.stop == "interrupt":
            break
        sl = slice(k * bs, (k + 1) * bs)
        one = GenerationParams(**{**params.__dict__, "n_iter": 1, "seed": seeds[k * bs],
                                  "subseed": subseeds[k * bs]})
        if params.all_prompts is not None:
            one.all_prompts = params.all_prompts[sl]
        latest.clear()
        try:
            res = generate(engine, one, callback, **kw)
        except Stop:
            if job.stop != "interrupt":
                continue  # skipped: on to the next batch
            if "x0" in latest and params.mask is None:
                images = to_pil(engine.decode(latest["x0"]))
                prompts = one.all_prompts or [params.prompt] * len(images)
                out.images += images
                out.infotexts += [_partial_infotext(engine, one, q, s)
                                  for q, s in zip(prompts, seeds[sl])]
                out.seeds += seeds[sl][:len(images)]
                out.subseeds += subseeds[sl][:len(images)]
            break
        out.images += res.images
        out.infotexts += res.infotexts
        out.seeds += res.seeds
        out.subseeds += res.subseeds
    return out
