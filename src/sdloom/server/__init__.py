"""The A1111-compatible HTTP API (`sdloom serve`); FastAPI and uvicorn load only when serving."""
from __future__ import annotations

import sys

from ..errors import SdloomError


def add_serve_args(p) -> None:
    p.add_argument("--model", help="model to load (default: the embedded model)")
    p.add_argument("--models-dir", help="folder of models that clients may switch to")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP basic auth")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--outdir", default="outputs",
                   help="where requests with save_images write (txt2img-images/, img2img-images/)")
    p.add_argument("--lora-dir")
    p.add_argument("--embeddings")


def run_serve(args) -> int:
    """The `sdloom serve` command: load the model, then serve until interrupted."""
    try:
        import uvicorn

        from .app import Server, create_app
    except ImportError as e:
        raise SdloomError(f"sdloom serve needs fastapi and uvicorn ({e}); "
                          "pip install fastapi uvicorn") from None
    if args.api_auth is not None and ":" not in args.api_auth:
        raise SdloomError("--api-auth takes USER:PASS")
    server = Server(args.model, models_dir=args.models_dir, device=args.device,
                    precision=args.precision, lora_dir=args.lora_dir,
                    embeddings_dir=args.embeddings, outdir=args.outdir)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_auth:
        print(f"sdloom: serving on {args.host} without --api-auth: anyone who can reach this "
              "address can use the API", file=sys.stderr)
    uvicorn.run(create_app(server, args.api_auth), host=args.host, port=args.port,
                log_level="warning")
    return 0
