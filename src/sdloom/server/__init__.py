"""The A1111-compatible HTTP API (`sdloom serve`); FastAPI and uvicorn load only when serving."""
from __future__ import annotations

import sys

from ..errors import SdloomError


def add_serve_args(p) -> None:
    from ..cli import add_engine_args
    p.add_argument("--model", help="model to load (default: the embedded model)")
    p.add_argument("--models-dir", help="folder of models that clients may switch to")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", metavar="USER:PASS",
                   help="require HTTP basic auth on every route; several users as U1:P1,U2:P2")
    p.add_argument("--allowed-hosts", metavar="H1,H2",
                   help="Host header values to answer (default when bound to a loopback "
                        "address: localhost, 127.0.0.1, [::1], which blocks DNS rebinding; "
                        "* for any)")
    p.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                   help="change a request limit, e.g. max_steps=150 (repeatable; "
                        "sdloom.limits.Limits lists them)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="jobs that may run or wait at once; more get a 503 with Retry-After")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda:1; several (cuda:0,cuda:1) or all: a worker and a copy of "
                        "the model on each, jobs go to the first free one")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    add_engine_args(p)
    p.add_argument("--outdir", default="outputs",
                   help="where requests with save_images write (txt2img-images/, img2img-images/)")
    p.add_argument("--lora-dir")
    p.add_argument("--embeddings")
    p.add_argument("--upscaler-dir", help="folder of ESRGAN-family upscaler models "
                   "(.pth/.safetensors), listed by file stem in /sdapi/v1/upscalers")
    p.add_argument("--styles-file", action="append", default=[], metavar="PATH",
                   help="A1111 styles.csv (name, prompt, negative_prompt) that requests name "
                        "in `styles`; repeatable, later names replace earlier ones "
                        "(default: none)")
    p.add_argument("--vae-dir", help="folder of VAE files that requests name in sd_vae "
                   "(listed by /sdapi/v1/sd-vae; Automatic/None keep the model's own)")
    p.add_argument("--clip-vision-dir", help="CLIP vision encoders for IP-Adapter units of "
                   "the ControlNet API: clip_h.pth (ViT-H) and clip_g.pth (ViT-bigG), as the "
                   "extension's annotator/downloads/clip_vision")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve through Ray Serve (pip install 'sdloom[ray]'): replicas of this "
                        "server behind Ray's HTTP proxy; ADDRESS of a Ray cluster, or none for "
                        "a local one")
    p.add_argument("--replicas", default="1", metavar="N|auto",
                   help="with --ray: N replicas, or auto (1 to one per GPU, scaled by queue "
                        "length)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="with --ray: GPUs each replica holds (default 1 where Ray sees GPUs, "
                        "else 0)")
    p.add_argument("--controlnet-dir", help="folder of ControlNet models that requests name "
                   "in alwayson_scripts.controlnet (listed as \"name [hash]\" in "
                   "/controlnet/model_list; names only, never paths)")


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def default_allowed_hosts(host: str, allowed: str | None) -> list[str] | None:
    """The Host header values to answer: --allowed-hosts, else the loopback names when bound to
    loopback (a DNS-rebinding page then cannot talk to the server), else any (None)."""
    if allowed:
        return [h.strip() for h in allowed.split(",") if h.strip()]
    if host in LOOPBACK or host.startswith("127."):
        return ["localhost", "127.0.0.1", "[::1]"]
    return None


def run_serve(args) -> int:
    """The `sdloom serve` command: load the model, then serve until interrupted."""
    try:
        import uvicorn

        from .app import Server, create_app
    except ImportError as e:
        raise SdloomError(f"sdloom serve needs fastapi and uvicorn ({e}); "
                          "pip install fastapi uvicorn") from None
    from ..cli import engine_options
    from ..limits import DEFAULT_LIMITS
    from .guard import parse_users
    if args.api_auth is not None:
        parse_users(args.api_auth)  # a malformed value fails before the model loads
    if args.max_queue < 1:
        raise SdloomError("--max-queue must be ≥ 1")
    limits = DEFAULT_LIMITS.with_overrides(args.limit)
    server_kwargs = dict(
        model=args.model, models_dir=args.models_dir, device=args.device,
        precision=args.precision, lora_dir=args.lora_dir, embeddings_dir=args.embeddings,
        outdir=args.outdir, limits=limits, max_queue=args.max_queue,
        upscaler_dir=args.upscaler_dir, controlnet_dir=args.controlnet_dir, vae_dir=args.vae_dir,
        clip_vision_dir=args.clip_vision_dir,
        styles_file=getattr(args, "styles_file", None) or None,
        flags={k: getattr(args, k, None) for k in
               ("host", "port", "api_auth", "allowed_hosts", "limit")},
        engine_options=engine_options(args))
    app_kwargs = dict(api_auth=args.api_auth,
                      allowed_hosts=default_allowed_hosts(args.host, args.allowed_hosts))
    if args.host not in LOOPBACK and not args.api_auth:
        print(f"sdloom: serving on {args.host} without --api-auth: anyone who can reach this "
              "address can use the API", file=sys.stderr)
    if getattr(args, "ray", None) is not None:  # the same app in Ray Serve replicas
        from .ray_serve import start
        start(args.ray, args.host, args.port, server_kwargs, app_kwargs, args.replicas,
              args.gpus_per_replica, args.max_queue)
        return 0
    app = create_app(Server(**server_kwargs), **app_kwargs)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
