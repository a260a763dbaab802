"""A1111's extras API (`/sdapi/v1/extra-single-image`, `extra-batch-images`): the upscalers of
the one registry (upscalers.py) on decoded images, queued as jobs, with A1111's postprocessing
info and PNG chunks."""
from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from ..errors import LimitError, NotFoundError, SdloomError
from ..infotext import encode_image
from .jobs import Job
from .schema import ExtrasBaseRequest, ExtrasBatchImagesRequest, ExtrasSingleImageRequest


def _upscaler(name: str | None, server):
    """The registry entry of an A1111 upscaler field; None for "None" or empty (no upscale)."""
    from ..upscalers import find
    if name is None or name in ("", "None"):
        return None
    return find(name, server.upscaler_dir)  # NotFoundError (404) naming it and the list


def _extras_one(img: Image.Image, req: ExtrasBaseRequest, server
                ) -> tuple[Image.Image, dict[str, Any]]:
    """A1111's postprocessing upscale (scripts/postprocessing_upscale.py) of one image and
    its info: upscaler_1 by upscaling_resize (mode 0) or to w×h (mode 1, cropped centred
    with upscaling_crop), then upscaler_2 on the original blended in by its visibility."""
    from ..upscalers import target_size, upscale
    up1, up2 = _upscaler(req.upscaler_1, server), _upscaler(req.upscaler_2, server)
    info: dict[str, Any] = {}
    if up1 is None:
        return img, info
    if req.resize_mode == 1:
        w, h = req.upscaling_resize_w, req.upscaling_resize_h
        by = max(w / img.width, h / img.height)
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        by = req.upscaling_resize
        info["Postprocess upscale by"] = by
    tw, th = target_size(img.width, img.height, by)
    lim = server.limits
    for what, v in (("upscaled width", tw), ("upscaled height", th)):
        lim.check(what, v, "max_side")
    lim.check("upscaled pixels", tw * th, "max_pixels")
    eng = getattr(server, "_engine", None)  # None while unloaded: the default device
    kw = {"upscaler_dir": server.upscaler_dir, "device": getattr(eng, "device", None),
          "max_pixels": 4 * lim.max_pixels}  # a model's last pass may overshoot the target

    def one(up) -> Image.Image:
        out = upscale(img, up.name, tw, th, **kw)
        if req.resize_mode == 1 and req.upscaling_crop:
            canvas = Image.new(out.mode, (w, h))
            canvas.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = canvas
        return out

    out = one(up1)
    info["Postprocess upscaler"] = up1.name
    if up2 is not None and req.extras_upscaler_2_visibility > 0:
        second = one(up2)
        if second.mode != out.mode:
            second = second.convert(out.mode)
        out = Image.blend(out, second, req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = up2.name
    if req.resize_mode == 1 and req.upscaling_crop:
        info["Postprocess crop to"] = f"{w}x{h}"
    return out, info


def _extras_text(info: dict[str, Any]) -> str:
    from ..infotext import quote
    return ", ".join(f"{k}: {quote(v)}" for k, v in info.items() if v is not None)


def _encode_extras(img: Image.Image, fmt: str, parameters: str | None, pp: str) -> str:
    """base64 of the result; PNG keeps the input's `parameters` chunk and adds A1111's
    `postprocessing` chunk, other formats carry `parameters` as EXIF."""
    if fmt == "png":
        from PIL import PngImagePlugin
        meta = PngImagePlugin.PngInfo()
        if parameters:
            meta.add_text("parameters", parameters)
        if pp:
            meta.add_text("postprocessing", pp)
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=meta)
        data = buf.getvalue()
    else:
        data = encode_image(img, fmt, parameters)
    return base64.b64encode(data).decode("ascii")


def extras_job(server, req: ExtrasBaseRequest, decode, images: list[tuple[Any, str]]) -> Job:
    """Decode (with the server's limits), then queue a job that upscales one by one and
    encodes."""
    if req.gfpgan_visibility > 0 or req.codeformer_visibility > 0:
        raise SdloomError("not supported by sdloom: face restoration (gfpgan_visibility, "
                          "codeformer_visibility)")
    server.limits.check("images", len(images), "max_images")
    _upscaler(req.upscaler_1, server)  # unknown names fail before decoding or waiting
    _upscaler(req.upscaler_2, server)
    decoded = [decode(data, what, server.limits) for data, what in images]
    fmt = server.options.get("samples_format", "png")

    def work(job: Job) -> tuple[list[str], str]:
        out, text = [], ""
        for img in decoded:
            params = img.info.get("parameters")
            try:
                src = img if img.mode in ("RGB", "RGBA") else img.convert(
                    "RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            except (ValueError, OSError) as e:
                raise SdloomError(f"cannot convert a {img.mode} image ({e})") from None
            try:
                res, info = _extras_one(src, req, server)
            except MemoryError:
                raise LimitError("out of memory while upscaling; try a smaller size") from None
            text = _extras_text(info)
            out.append(_encode_extras(res, fmt, params if isinstance(params, str) else None,
                                      text))
        return out, text
    return server.jobs.submit(Job("extras", work))


def extras_result(result: tuple[list[str], str]) -> tuple[list[str], str]:
    import html
    out, text = result
    return out, "<p>" + html.escape(text) + "</p>"


def extras_router(server, wait, decode) -> APIRouter:
    """The two extras routes; `wait` awaits a job for a request, `decode` reads an image."""
    router = APIRouter()

    @router.post("/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest, request: Request
                                 ) -> dict[str, Any]:
        if not req.image:
            raise NotFoundError("Image not found")
        job = await run_in_threadpool(extras_job, server, req, decode, [(req.image, "image")])
        images, html_info = extras_result(await wait(job, request))
        return {"html_info": html_info, "image": images[0]}

    @router.post("/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request
                                 ) -> dict[str, Any]:
        job = await run_in_threadpool(
            extras_job, server, req, decode,
            [(f.data, f"imageList[{i}]") for i, f in enumerate(req.imageList)])
        images, html_info = extras_result(await wait(job, request))
        return {"html_info": html_info, "images": images}

    return router
