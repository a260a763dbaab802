"""`sdloom …`: the command line, thin over the library API (README.md, "Using it")."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from .errors import SdloomError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`sdloom: error: …`, exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"sdloom: error: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    """A float argument that is a real number (not nan or inf)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _positive_finite(text: str) -> float:
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _int_from(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {v}" if high is None
                                             else f"must be from {low} to {high}, got {v}")
        return v
    parse.__name__ = f"integer ≥ {low}"
    return parse


def _seed(text: str) -> int:
    v = _int_from(-1)(text)
    if v >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be below 2^64, got {v}")
    return v


def _lora_arg(text: str) -> tuple[str, float]:
    path, sep, w = text.rpartition(":")
    if sep and path and not w.startswith(("\\", "/")):
        try:
            return path, float(w)
        except ValueError:
            pass
    return text, 1.0


def _control_arg(text: str) -> tuple[str, str, list[float]]:
    """IMAGE:MODEL[:WEIGHT[:START[:END]]] → (image, model, numbers); paths may hold ':'."""
    parts = text.split(":")
    nums: list[float] = []
    while len(parts) > 2 and len(nums) < 3:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(parts) < 2:
        raise SdloomError(f"--control takes IMAGE:MODEL[:WEIGHT[:START[:END]]], got {text!r}")
    cut = next((i for i in range(1, len(parts)) if Path(":".join(parts[:i])).is_file()), 1)
    return ":".join(parts[:cut]), ":".join(parts[cut:]), nums


def _control_units(args) -> list:
    """ControlUnits from --control and its per-unit options (one value applies to all)."""
    from .controlnet import ControlUnit
    from .images import load_image
    units = []
    for i, text in enumerate(args.control):
        image, model, nums = _control_arg(text)

        def pick(values, default):
            if not values:
                return default
            if len(values) not in (1, len(args.control)):
                raise SdloomError(f"give one value for all --control units or one per unit "
                                  f"({len(args.control)}), got {len(values)}")
            return values[0] if len(values) == 1 else values[i]
        weight, start, end = (nums + [1.0, 0.0, 1.0][len(nums):])[:3]
        units.append(ControlUnit(
            model, load_image(image) if image else None,
            module=pick(args.control_module, "none"), weight=weight, guidance_start=start,
            guidance_end=end,
            control_mode=CONTROL_MODES[pick(args.control_mode, "balanced")],
            resize_mode=CONTROL_RESIZE[pick(args.control_resize, "crop")],
            pixel_perfect=args.control_pixel_perfect,
            hr_option=HR_CHOICES[pick(args.control_hr, "both")]))
    return units


def _ip_units(args) -> list:
    """The IP-Adapter unit of --ip-adapter and --style-image, or none."""
    if not args.ip_adapter and not args.style_image:
        return []
    if not (args.ip_adapter and args.style_image):
        raise SdloomError("--ip-adapter and --style-image go together")
    from pathlib import Path

    from .images import load_image
    from .models.ip_adapter import IPAdapterUnit
    encoder = args.ip_image_encoder or str(Path(args.ip_adapter).parent / "image_encoder")
    return [IPAdapterUnit(args.ip_adapter, encoder, [load_image(x) for x in args.style_image],
                          args.ip_weight, args.ip_start, args.ip_end)]


CONTROL_MODES = {"balanced": 0, "prompt": 1, "controlnet": 2}
CONTROL_RESIZE = {"just": 0, "crop": 1, "fill": 2}
HR_CHOICES = {"both": "Both", "low": "Low res only", "high": "High res only"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), [a:b:N], BREAK, <lora:name:w>)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--model", help="checkpoint (.safetensors/.ckpt) or diffusers folder; "
                   "default: the embedded emoji model")
    p.add_argument("--vae", help="a separate VAE file to use instead of the model's")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type "
                   "(e.g. eps for SD 2.x-base 512 checkpoints)")
    p.add_argument("--no-t5", action="store_true", help="SD3: leave T5-XXL out (less memory; "
                   "its part of the conditioning is zeros, as A1111 with T5 disabled)")
    p.add_argument("--text-encoders", nargs="+", metavar="FILE",
                   help="SD3: separate text encoder files (clip_l, clip_g, optional t5xxl "
                   "fp16/fp8; any order, told apart by their shapes) or a folder of them, for "
                   "a model file without its own; they replace the file's own of that kind")
    p.add_argument("--sampler", default="DPM++ 2M", help='A1111 name, e.g. "Euler a", "DPM++ 2M Karras"')
    p.add_argument("--scheduler", default="automatic", help="automatic, karras, exponential, "
                   "uniform, sgm_uniform, simple, normal, ddim_uniform, …")
    p.add_argument("--steps", type=_int_from(1), default=20)
    p.add_argument("--cfg", type=_finite, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--width", type=_int_from(1), help="default: the model's native size")
    p.add_argument("--height", type=_int_from(1))
    p.add_argument("--seed", type=_seed, default=-1, help="-1 = random")
    p.add_argument("--subseed", type=_seed, default=-1, help="variation seed")
    p.add_argument("--subseed-strength", type=_finite, default=0.0)
    p.add_argument("--batch-size", type=_int_from(1), default=1)
    p.add_argument("--n-iter", type=_int_from(1), default=1, help="number of batches")
    p.add_argument("--clip-skip", type=_int_from(1), default=1)
    p.add_argument("--eta", type=_finite, help="noise multiplier of ancestral/SDE samplers")
    p.add_argument("--lora", action="append", default=[], metavar="PATH:W",
                   help="apply a LoRA file at weight W (repeatable)")
    p.add_argument("--lora-dir", help="folder where <lora:name:w> names are looked up")
    p.add_argument("--control", action="append", default=[],
                   metavar="IMAGE:MODEL[:W[:START[:END]]]",
                   help="a ControlNet unit (repeatable; units add): control image, ControlNet "
                        "file or diffusers folder, weight (1), guidance start and end as "
                        "fractions of the steps (0, 1); img2img/inpaint default to the init "
                        "image when IMAGE is empty")
    p.add_argument("--control-module", action="append", default=[],
                   help="preprocessor per unit (one for all, or one per --control): none, "
                        "canny, invert, threshold, shuffle, tile_resample (default none)")
    p.add_argument("--control-mode", action="append", default=[], choices=CONTROL_MODES,
                   help="balanced, prompt (my prompt is more important) or controlnet "
                        "(ControlNet is more important); one for all or one per unit")
    p.add_argument("--control-resize", action="append", default=[], choices=CONTROL_RESIZE,
                   help="fit the control image: just (resize), crop (and resize, default), "
                        "fill (resize and fill)")
    p.add_argument("--control-hr", action="append", default=[], choices=HR_CHOICES,
                   help="with --hires-scale: apply the unit in both passes (default), the "
                        "low-res one or the high-res one")
    p.add_argument("--control-pixel-perfect", action="store_true",
                   help="preprocess at the resolution the image is resized to")
    p.add_argument("--ip-adapter", metavar="FILE",
                   help="an IP-Adapter file (plain SD1.5 layout) for --style-image")
    p.add_argument("--style-image", action="append", default=[], metavar="IMAGE",
                   help="a reference image for --ip-adapter (repeatable: tokens concatenated)")
    p.add_argument("--ip-image-encoder", metavar="PATH",
                   help="its CLIP vision model (transformers folder or file); default: the "
                        "image_encoder folder beside the IP-Adapter file")
    p.add_argument("--ip-weight", type=_finite, default=1.0, help="IP-Adapter weight (1)")
    p.add_argument("--ip-start", type=_finite, default=0.0,
                   help="IP-Adapter start, a fraction of the steps (0)")
    p.add_argument("--ip-end", type=_finite, default=1.0,
                   help="IP-Adapter end, a fraction of the steps (1)")
    p.add_argument("--upscaler-dir", help="folder of ESRGAN-family models for --hires-upscaler")
    p.add_argument("--embeddings", help="folder of textual-inversion embeddings")
    p.add_argument("--output", "-o", default="outputs", help="output folder or .png file")
    p.add_argument("--grid", action="store_true", help="also save a grid of the batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    add_engine_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Speed and memory options of the engine (generate commands and serve)."""
    p.add_argument("--compile", action="store_true",
                   help="compile the denoiser with torch.compile (slow first image; inductor "
                        "caches kernels on disk for later runs)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the denoiser eagerly on CUDA instead of replaying CUDA graphs")
    p.add_argument("--offload", choices=["none", "model", "blocks"], default="none",
                   help="keep the weights in CPU memory: model = one component on the GPU at a "
                        "time (A1111 --medvram), blocks = one block (--lowvram; slowest)")
    p.add_argument("--medvram", dest="offload", action="store_const", const="model",
                   help="= --offload model")
    p.add_argument("--lowvram", dest="offload", action="store_const", const="blocks",
                   help="= --offload blocks")


def engine_options(args) -> dict:
    """Engine keyword arguments from add_engine_args' options."""
    return {"compile": args.compile, "cuda_graphs": not args.no_cuda_graphs,
            "offload": args.offload}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = Parser(prog="sdloom", description="Stable Diffusion in plain PyTorch")
    ap.add_argument("--version", action="version", version=f"sdloom {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="text to image")
    _add_common(g)
    g.add_argument("--hires-scale", type=_positive_finite, help="enable hires fix with this upscale factor")
    g.add_argument("--hires-steps", type=_int_from(0), default=0, help="second-pass steps (0 = same)")
    g.add_argument("--hires-upscaler", default="Latent",
                   help="Latent, Latent (nearest), Latent (bicubic antialiased), Lanczos, …")
    g.add_argument("--denoise", type=_finite, default=0.7, help="hires-fix denoising strength")
    g.add_argument("--hires-sampler", help="second-pass sampler (default: the same)")
    g.add_argument("--hires-scheduler", help="second-pass schedule type (default: the same)")
    g.add_argument("--hires-prompt", default="", help="second-pass prompt (default: the same)")
    g.add_argument("--hires-negative", default="",
                   help="second-pass negative prompt (default: the same)")

    i = sub.add_parser("img2img", help="image to image")
    _add_common(i)
    i.add_argument("--init", required=True, help="the input image")
    i.add_argument("--strength", "--denoise", type=_finite, default=0.75, dest="strength")
    i.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2, 3],
                   help="0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize "
                        "in latent space (the image encoded as it is, its latent scaled)")

    m = sub.add_parser("inpaint", help="repaint the masked area (white = repaint)")
    _add_common(m)
    m.add_argument("--init", required=True)
    m.add_argument("--mask", help="mask image, same size as --init (white = repaint)")
    m.add_argument("--outpaint", metavar="L,R,T,B",
                   help="extend the canvas by these pixels and paint the new area (no --mask)")
    m.add_argument("--strength", "--denoise", type=_finite, default=0.75, dest="strength")
    m.add_argument("--mask-blur", type=_int_from(0, 64), default=4,
                   help="mask blur σ in pixels, 0..64")
    m.add_argument("--fill", default=None,
                   choices=["original", "fill", "noise", "latent-noise", "latent-nothing"],
                   help="masked content (default: original; fill for outpainting)")
    m.add_argument("--only-masked", action="store_true", help="inpaint area: only masked")
    m.add_argument("--padding", type=_int_from(0), default=32, help="only-masked padding, pixels")
    m.add_argument("--invert-mask", action="store_true")

    s = sub.add_parser("info", help="family, components, parameter counts, hash")
    s.add_argument("model")
    s = sub.add_parser("convert", help="diffusers folder ⇄ .safetensors; .ckpt → .safetensors")
    s.add_argument("src")
    s.add_argument("dst")
    s = sub.add_parser("pnginfo", help="print an image's generation parameters")
    s.add_argument("image")

    u = sub.add_parser("upscale", help="upscale an image (Lanczos, Nearest or an ESRGAN-family "
                       "model, as A1111's extras)")
    u.add_argument("image")
    u.add_argument("--upscaler", default="Lanczos",
                   help="None, Lanczos, Nearest, the stem of a model in --upscaler-dir, or a "
                        "model file (.pth/.safetensors)")
    u.add_argument("--upscaler-dir", help="folder of ESRGAN-family models")
    u.add_argument("--scale", type=_positive_finite,
                   help="factor (default 4); the size is rounded down to a multiple of 8 as A1111")
    u.add_argument("--width", type=_int_from(1), help="exact output width (with --height)")
    u.add_argument("--height", type=_int_from(1))
    u.add_argument("--tile", type=_int_from(0), default=192,
                   help="tile size in input pixels for models (0 = whole image)")
    u.add_argument("--tile-overlap", type=_int_from(0), default=8,
                   help="overlap of neighbouring tiles, blended")
    u.add_argument("--output", "-o", default="outputs",
                   help="output folder or .png file (default outputs/)")
    u.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")

    t = sub.add_parser("train", help="train or fine-tune (VAE, U-Net, text encoder, LoRA)")
    try:
        from .training.train import add_train_args
        add_train_args(t)
    except ImportError as e:  # pragma: no cover - the training module is part of the package
        t.set_defaults(_missing=str(e))

    v = sub.add_parser("serve", help="A1111-compatible HTTP API (/sdapi/v1/txt2img, …)")
    from .server import add_serve_args, run_serve
    add_serve_args(v)
    v.set_defaults(func=run_serve)

    e = sub.add_parser("eval", help="prompt adherence of a model on its data set")
    try:
        from .eval.adherence import add_eval_args
        add_eval_args(e)
    except ImportError as err:
        e.set_defaults(_missing=str(err))

    return ap


def _params(args, kind: str):
    from .images import load_image
    from .pipelines.params import FILL_MODES, GenerationParams
    p = GenerationParams(
        prompt=args.prompt, negative_prompt=args.negative, width=args.width, height=args.height,
        steps=args.steps, cfg_scale=args.cfg, sampler_name=args.sampler, scheduler=args.scheduler,
        seed=args.seed, subseed=args.subseed, subseed_strength=args.subseed_strength,
        batch_size=args.batch_size, n_iter=args.n_iter, clip_skip=args.clip_skip, eta=args.eta,
        loras=[_lora_arg(x) for x in args.lora], controlnets=_control_units(args),
        ip_adapters=_ip_units(args))
    if kind == "generate" and args.hires_scale:
        p.enable_hr, p.hr_scale = True, args.hires_scale
        p.hr_second_pass_steps, p.hr_upscaler = args.hires_steps, args.hires_upscaler
        p.denoising_strength = args.denoise
        p.hr_sampler_name, p.hr_scheduler = args.hires_sampler, args.hires_scheduler
        p.hr_prompt, p.hr_negative_prompt = args.hires_prompt, args.hires_negative
    if kind in ("img2img", "inpaint"):
        p.init_image = load_image(args.init)
        p.denoising_strength = args.strength
        p.resize_mode = getattr(args, "resize_mode", 0)
        if p.width is None and p.height is None:  # keep the input's size, rounded to 8
            p.width, p.height = (p.init_image.width // 8 * 8, p.init_image.height // 8 * 8)
    if kind == "inpaint":
        fill = args.fill
        if args.outpaint:
            from .pipelines.generate import outpaint_canvas
            try:
                margins = [int(v) for v in args.outpaint.split(",")]
                assert len(margins) == 4
            except (ValueError, AssertionError):
                raise SdloomError("--outpaint takes four integers: LEFT,RIGHT,TOP,BOTTOM") from None
            p.init_image, p.mask = outpaint_canvas(p.init_image, *margins)
            p.width, p.height = p.init_image.size
            fill = fill or "fill"
            if args.mask:
                raise SdloomError("give either --mask or --outpaint, not both")
        elif args.mask:
            p.mask = load_image(args.mask, mode=None)  # alpha kept: A1111's mask rule
        else:
            raise SdloomError("inpaint needs --mask IMAGE (or --outpaint L,R,T,B)")
        p.mask_blur = args.mask_blur
        p.inpainting_fill = FILL_MODES[fill or "original"]
        p.inpaint_full_res = args.only_masked
        p.inpaint_full_res_padding = args.padding
        p.inpainting_mask_invert = args.invert_mask
    return p


def _save(name, img, info: str) -> Path:
    """Write one PNG atomically at the path `name()` picks (reserving it), or raise a one-line
    SdloomError; a failed write leaves no empty reserved file behind."""
    from . import infotext
    path = None
    try:
        path = name()
        infotext.save_png(img, path, info)
        return path
    except OSError as e:
        if path is not None and path.is_file() and path.stat().st_size == 0:
            path.unlink()
        where = path or e.filename or "the output folder"
        raise SdloomError(f"cannot write {where}: {e.strerror or e}") from None


def cmd_generate(args, kind: str) -> int:
    from .images import unique_output_path
    from .pipelines.engine import Engine
    from .pipelines.generate import generate
    p = _params(args, kind)
    t0 = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, precision=args.precision, vae=args.vae,
                         prediction=args.prediction, embeddings_dir=args.embeddings,
                         lora_dir=args.lora_dir, upscaler_dir=args.upscaler_dir,
                         without=("t5",) if args.no_t5 else (),
                         text_encoders=args.text_encoders, **engine_options(args))
    load_s = time.perf_counter() - t0
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="it", desc=kind, leave=False, dynamic_ncols=True)

    def progress(step: int, total: int, _x) -> None:
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)

    t1 = time.perf_counter()
    result = generate(engine, p, progress)
    if bar is not None:
        bar.close()
    out = Path(args.output)
    paths = []
    for img, info, seed in zip(result.images, result.infotexts, result.seeds):
        if out.suffix.lower() == ".png":
            paths.append(_save(lambda: out if len(result.images) == 1 and not out.exists()
                               else unique_output_path(out.parent, prefix=out.stem + "-",
                                                       ext=".png"), img, info))
        else:
            paths.append(_save(lambda: unique_output_path(out, suffix=f"-{seed}"), img, info))
    if args.grid and len(result.images) > 1:
        paths.append(_save(lambda: unique_output_path(out if out.suffix == "" else out.parent,
                                                      prefix="grid-"),
                           result.grid(), result.infotexts[0]))
    gen_s = time.perf_counter() - t1
    for path in paths:
        print(path)
    print(f"{len(result.images)} image(s) in {gen_s:.2f} s (model load {load_s:.2f} s), "
          f"seed {result.seeds[0]}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .checkpoints.load import build_meta, check_fit, open_model_source
    from .families import family_of
    from .infotext import model_hash
    c, src = open_model_source(args.model)
    m = build_meta(c)  # shapes only: nothing is read or allocated
    check_fit(m, src)
    name = getattr(c, "name", "")
    print(f"model:       {args.model}")
    print(f"family:      {c.family}" + (f" (preset {name})" if name else " (custom shapes)"))
    for label, value in family_of(c).describe(c):
        print(f"{label + ':':13}{value}")
    for part, n in m.component_params().items():
        print(f"{part + ':':13}{n / 1e6:9.2f} M parameters")
    if Path(args.model).is_file():
        print(f"hash:        {model_hash(args.model)} (sha256[:10], A1111 'Model hash')")
    return 0


def cmd_convert(args) -> int:
    from .checkpoints.save import convert
    cfg = convert(args.src, args.dst)
    name = getattr(cfg, "name", "")
    print(f"wrote {args.dst} ({cfg.family}{', ' + name if name else ''})")
    return 0


def cmd_pnginfo(args) -> int:
    from .infotext import read_infotext
    text = read_infotext(args.image)
    if text is None:
        raise SdloomError(f"{args.image}: no generation parameters in this image")
    print(text)
    return 0


def cmd_upscale(args) -> int:
    from .images import load_image, unique_output_path
    from .limits import DEFAULT_LIMITS
    from .models.esrgan import SUFFIXES
    from .upscalers import target_size, upscale
    if (args.width is None) != (args.height is None):
        raise SdloomError("give both --width and --height, or --scale")
    if args.scale is not None and args.width is not None:
        raise SdloomError("give either --scale or --width/--height, not both")
    name, folder = args.upscaler, args.upscaler_dir
    as_file = Path(name)
    if as_file.suffix.lower() in SUFFIXES and as_file.is_file():  # a model file named directly
        name, folder = as_file.stem, as_file.parent
    img = load_image(args.image, mode=None)
    src_text = img.info.get("parameters") if isinstance(img.info.get("parameters"), str) \
        else None
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info
                          else "RGB")
    w, h = (args.width, args.height) if args.width else \
        target_size(img.width, img.height, args.scale or 4.0)
    lim = DEFAULT_LIMITS
    lim.check("width", w, "max_side")
    lim.check("height", h, "max_side")
    lim.check("pixels", w * h, "max_pixels")
    t0 = time.perf_counter()
    out = upscale(img, name, w, h, upscaler_dir=folder,
                  device=None if args.device == "auto" else args.device,
                  tile=args.tile, overlap=args.tile_overlap, max_pixels=4 * lim.max_pixels)
    dest = Path(args.output)
    if dest.suffix.lower() == ".png":
        pick = (lambda: dest) if not dest.exists() else \
            (lambda: unique_output_path(dest.parent, prefix=dest.stem + "-", ext=".png"))
    else:
        pick = lambda: unique_output_path(dest / "extras-images")  # noqa: E731
    path = _save(pick, out, src_text)  # atomic; the input's parameters kept
    print(path)
    print(f"{img.width}x{img.height} → {w}x{h} with {args.upscaler} in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings
    # torch's weights_only unpickler warns about the pickle protocol of files it then refuses
    # or loads anyway; the user gets sdloom's one line, not torch's two
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # a bad argument (one line printed), --help or --version
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "_missing", None):
        print(f"sdloom: error: {args.command} is unavailable: {args._missing}", file=sys.stderr)
        return 1
    try:
        if args.command in ("generate", "img2img", "inpaint"):
            return cmd_generate(args, args.command)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "pnginfo":
            return cmd_pnginfo(args)
        if args.command == "upscale":
            return cmd_upscale(args)
        return args.func(args)
    except SdloomError as e:
        print(f"sdloom: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdloom: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sdloom: error: out of memory (try a smaller size or batch)", file=sys.stderr)
        return 1
    except OSError as e:  # a file the user named: its name and the system's reason
        if os.environ.get("SDLOOM_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"sdloom: error: {where}{e.strerror or type(e).__name__}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line without the raw text; the traceback on request
        if os.environ.get("SDLOOM_DEBUG"):
            raise
        print(f"sdloom: error: internal error ({type(e).__name__}) in sdloom {args.command}; "
              "please report it (SDLOOM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
