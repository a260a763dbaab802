"""Scale-out on Ray Serve (`sdloom serve --ray [ADDRESS]`, the optional `ray` extra): the same
FastAPI app, built over its own Server in each replica, behind Ray's HTTP proxy.

Each replica is a whole `sdloom serve`: its model on its GPU (`--gpus-per-replica`, 1 where
Ray sees GPUs), its bounded queue (a full one answers 503 with Retry-After; Ray lets a few more
requests than the queue through to a replica so that probes and progress polls are not held up).
`--replicas N` fixes the count, `auto` lets Ray scale between 1 and one per GPU on the number
of requests in flight per replica (target: the queue length). Every response says which
replica answered (`X-Sdloom-Replica`: its process id).

Known difference: a client's /progress, /interrupt and /skip reach whichever replica Ray picks,
so they see that replica's jobs (with one replica, or without --ray, they see all).
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import SdloomError

PROBE_SLACK = 16  # requests beyond the queue that a replica takes (progress polls, lists)


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise SdloomError("--ray needs Ray Serve: pip install 'sdloom[ray]' "
                          "(or pip install 'ray[serve]')") from None
    return serve


def build_app(server_kwargs: dict[str, Any], app_kwargs: dict[str, Any]):
    """The replica's ASGI app: a Server loaded in this process, its routes, and the header
    naming the replica."""
    from .app import Server, create_app
    app = create_app(Server(**server_kwargs), **app_kwargs)
    pid = str(os.getpid())

    @app.middleware("http")
    async def name_the_replica(request, call_next):
        response = await call_next(request)
        response.headers["X-Sdloom-Replica"] = pid
        return response
    return app


def start(address: str, host: str, port: int, server_kwargs: dict[str, Any],
          app_kwargs: dict[str, Any], replicas: str | int = 1, gpus: float | None = None,
          max_queue: int = 8, blocking: bool = True) -> None:
    """Connect to Ray (`address`, or "local" to start one), put Serve's HTTP proxy on
    host:port and run the replicas; blocks until interrupted unless blocking=False."""
    import ray
    serve = _serve()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address)
    res = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
    opts: dict[str, Any] = {"ray_actor_options": {"num_gpus": gpus},
                            "max_ongoing_requests": max_queue + PROBE_SLACK}
    if str(replicas) == "auto":
        most = int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 1))
        opts["autoscaling_config"] = {"min_replicas": 1, "max_replicas": max(1, most),
                                      "target_ongoing_requests": max_queue}
    else:
        try:
            n = int(replicas)
        except ValueError:
            raise SdloomError(f"--replicas takes a number or auto, not {replicas!r}") from None
        if n < 1:
            raise SdloomError("--replicas must be ≥ 1")
        opts["num_replicas"] = n
    ingress = serve.ingress(lambda: build_app(server_kwargs, app_kwargs))
    app = serve.deployment(ingress(), name="sdloom", **opts).bind()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="sdloom", route_prefix="/", blocking=blocking)
