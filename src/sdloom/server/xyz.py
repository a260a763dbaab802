"""A1111's X/Y/Z plot script over the API: `script_name: "x/y/z plot"` with its `script_args`
runs one generation per cell and returns a labelled grid (scripts/xyz_grid.py).

script_args are A1111's, by position: x_type, x_values, x_values_dropdown, y_type, y_values,
y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images,
include_sub_grids, no_fixed_seeds, then either margin_size, csv_mode, raw_mode (1.6–1.8) or
vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode (1.9+). An axis type is the
index into the tab's axis list (txt2img and img2img lists differ) or, as sdloom's leniency,
its label. Values are A1111's: comma-separated (CSV quoting), integer and float ranges
`1-5`, `1-9 (+2)`, `0-1 [5]`; an axis with choices (Sampler) reads the dropdown list unless
csv_mode.

Axes served: Nothing, Seed, Var. seed, Var. strength, Steps, Hires steps, CFG Scale, Prompt
S/R, Sampler, Hires sampler; another axis is a 422 naming it. The cells run as one job (one
place in the queue, progress over all cells). Layout as A1111's draw_grid_annotations: cells
row by row, column labels above, row labels in a left band 3/4 of a cell wide, one grid per
Z value side by side under its Z label, Pillow's default font at (w + h) / 25 px.
Differences, each deliberate: the returned `all_seeds` and `infotexts` line up with the images
(A1111 leaves them one apart); a failed cell fails the request (A1111 logs it and leaves the
cell black); only an interrupted cell is black.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import LimitError, SdloomError
from ..images import image_grid
from ..infotext import quote
from ..pipelines.params import GenerationParams
from ..sampling.samplers import SAMPLERS, resolve_sampler
from ..seeds import all_seeds, fix_seed
from .jobs import PREVIEW_EVERY, Generated, Job, run_batches
from .schema import Txt2ImgRequest

SCRIPT_TITLE = "X/Y/Z plot"
# A1111 1.6–1.10's axis lists, by index; the ones sdloom serves are in AXES
TXT2IMG_AXES = ("Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps",
                "CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Hires sampler",
                "Checkpoint name")
IMG2IMG_AXES = ("Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale",
                "Image CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name")


@dataclass(frozen=True)
class AxisType:
    """One axis kind: the request field it sets and how its values read and print."""
    label: str
    type: type
    field: str | None  # None: Nothing or Prompt S/R (special)
    labelled: bool = True  # the cell label is "Label: value" (A1111's format_value_add_label)
    choices: bool = False  # a dropdown axis (values from x_values_dropdown unless csv_mode)


AXES = {a.label.lower(): a for a in (
    AxisType("Nothing", str, None, labelled=False),
    AxisType("Seed", int, "seed"),
    AxisType("Var. seed", int, "subseed"),
    AxisType("Var. strength", float, "subseed_strength"),
    AxisType("Steps", int, "steps"),
    AxisType("Hires steps", int, "hr_second_pass_steps"),
    AxisType("CFG Scale", float, "cfg_scale"),
    AxisType("Prompt S/R", str, None, labelled=False),
    AxisType("Sampler", str, "sampler_name", labelled=False, choices=True),
    AxisType("Hires sampler", str, "hr_sampler_name", choices=True),
)}


@dataclass(frozen=True)
class Axis:
    kind: AxisType
    values: list[Any]
    text: str  # the values as the client wrote them (infotext "X Values")

    def label(self, v: Any) -> str:
        if self.kind.label == "Nothing":
            return ""
        if isinstance(v, float):
            v = round(v, 8)
        return f"{self.kind.label}: {v}" if self.kind.labelled else str(v)

    def apply(self, fields: dict[str, Any], v: Any) -> None:
        """Set this axis's value v on a request's fields (A1111's AxisOption.apply)."""
        if self.kind.label == "Prompt S/R":
            old = self.values[0]
            fields["prompt"] = fields["prompt"].replace(old, v)
            fields["negative_prompt"] = fields["negative_prompt"].replace(old, v)
        elif self.kind.field is not None:
            fields[self.kind.field] = v


def is_xyz(script_name: str | None) -> bool:
    return (script_name or "").strip().lower() == SCRIPT_TITLE.lower()


# ------------------------------------------------------------------ script_args
_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)"
                          r"(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)"
                          r"(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*")
MAX_AXIS_VALUES = 256


def _csv_values(text: str) -> list[str]:
    return [v.strip() for row in csv.reader(io.StringIO(text)) for v in row]


def _num(s: str) -> str:
    return s.replace(" ", "")


def _expand(kind: AxisType, items: list[str]) -> list[Any]:
    """A1111's process_axis: ranges expanded, then each value converted to the axis type."""
    out: list[Any] = []
    for v in items:
        if kind.type is int and (m := _INT_RANGE.fullmatch(v)):
            step = int(m.group(3)) if m.group(3) else 1
            if step == 0:
                raise SdloomError(f"X/Y/Z plot: range {v!r} has a step of 0")
            out += list(range(int(_num(m.group(1))), int(_num(m.group(2))) + 1, step))
        elif kind.type is int and (m := _INT_COUNT.fullmatch(v)):
            n = int(m.group(3)) if m.group(3) else 1
            out += [int(x) for x in np.linspace(int(_num(m.group(1))), int(_num(m.group(2))),
                                                min(n, MAX_AXIS_VALUES + 1))]
        elif kind.type is float and (m := _FLOAT_RANGE.fullmatch(v)):
            a, b = float(_num(m.group(1))), float(_num(m.group(2)))
            step = float(m.group(3)) if m.group(3) else 1.0
            if step == 0:
                raise SdloomError(f"X/Y/Z plot: range {v!r} has a step of 0")
            out += np.arange(a, b + step, step)[:MAX_AXIS_VALUES + 1].tolist()
        elif kind.type is float and (m := _FLOAT_COUNT.fullmatch(v)):
            n = int(float(m.group(3))) if m.group(3) else 1
            out += np.linspace(float(_num(m.group(1))), float(_num(m.group(2))),
                               min(n, MAX_AXIS_VALUES + 1)).tolist()
        else:
            out.append(v)
        if len(out) > MAX_AXIS_VALUES:
            raise LimitError(f"X/Y/Z plot: an axis has more than {MAX_AXIS_VALUES} values")
    try:
        return [kind.type(x) for x in out]
    except ValueError:
        bad = next(x for x in out if not _converts(kind.type, x))
        raise SdloomError(f"X/Y/Z plot: {kind.label} value {bad!r} is not "
                          f"{'an integer' if kind.type is int else 'a number'}") from None


def _converts(t: type, x: Any) -> bool:
    try:
        t(x)
        return True
    except ValueError:
        return False


def _axis_type(value: Any, img2img: bool, which: str) -> AxisType:
    labels = IMG2IMG_AXES if img2img else TXT2IMG_AXES
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise SdloomError(f"X/Y/Z plot: {which} type must be an axis index or name, "
                          f"not {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(labels):
            served = ", ".join(f"{i} {lab}" for i, lab in enumerate(labels)
                               if lab.lower() in AXES)
            raise SdloomError(f"X/Y/Z plot: {which} type {value} is not an axis sdloom has "
                              f"({'img2img' if img2img else 'txt2img'}: {served})")
        value = labels[value]
    kind = AXES.get(value.strip().lower())
    if kind is None or (img2img and kind.label == "Hires steps") \
            or (img2img and kind.label == "Hires sampler"):
        raise SdloomError(f"X/Y/Z plot: {which} axis {value!r} is not supported by sdloom; "
                          f"axes: {', '.join(a.label for a in AXES.values())}")
    return kind


def _arg(args: list[Any], i: int, default: Any) -> Any:
    return args[i] if i < len(args) and args[i] is not None else default


@dataclass(frozen=True)
class Plot:
    axes: tuple[Axis, Axis, Axis]  # x, y, z
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)
    margin_size: int = 0


def parse_script_args(args: list[Any], img2img: bool, prompt: str, negative: str) -> Plot:
    """A1111's X/Y/Z plot script_args → a Plot, each value checked (422 naming it)."""
    if not isinstance(args, list):
        raise SdloomError("script_args must be a list (A1111's X/Y/Z plot arguments)")
    if len(args) >= 18:  # 1.9+: vary_seeds_x/y/z, margin_size, csv_mode
        vary = tuple(bool(_arg(args, i, False)) for i in (13, 14, 15))
        margin, csv_mode = _arg(args, 16, 0), bool(_arg(args, 17, False))
    else:  # 1.6–1.8: margin_size, csv_mode, raw_mode
        vary = (False, False, False)
        margin, csv_mode = _arg(args, 13, 0), bool(_arg(args, 14, False))
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 500:
        raise SdloomError(f"X/Y/Z plot: margin_size must be 0 to 500 pixels, not {margin!r}")
    axes = []
    for k, which in enumerate("XYZ"):
        kind = _axis_type(_arg(args, 3 * k, 1 if which == "X" else 0), img2img, which)
        text = _arg(args, 3 * k + 1, "")
        dropdown = _arg(args, 3 * k + 2, [])
        if not isinstance(text, str) or not isinstance(dropdown, list):
            raise SdloomError(f"X/Y/Z plot: {which} values must be text (and the dropdown "
                              "values a list)")
        if kind.label == "Nothing":
            axes.append(Axis(kind, [0], ""))
            continue
        if kind.choices and not csv_mode and dropdown:
            items = [str(v).strip() for v in dropdown]
            text = ",".join(items)
        else:
            items = _csv_values(text)
        items = [v for v in items if v != ""] if kind.type is not str else items
        if not items or items == [""]:
            raise SdloomError(f"X/Y/Z plot: the {which} axis ({kind.label}) has no values")
        values = _expand(kind, items)
        if kind.label == "Prompt S/R" and values[0] not in prompt and values[0] not in negative:
            raise SdloomError(f"Prompt S/R did not find {values[0]} in prompt or negative "
                              "prompt.")
        if kind.label in ("Sampler", "Hires sampler"):
            for v in values:
                resolve_sampler(v)  # an unknown name is a 422 naming it
        axes.append(Axis(kind, values, text))
    return Plot((axes[0], axes[1], axes[2]), draw_legend=bool(_arg(args, 9, True)),
                include_lone_images=bool(_arg(args, 10, False)),
                include_sub_grids=bool(_arg(args, 11, False)),
                no_fixed_seeds=bool(_arg(args, 12, False)), vary_seeds=vary,
                margin_size=int(margin))


# ------------------------------------------------------------------ the grid
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Words to lines no wider than width (a longer word keeps its own line)."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if line and draw.textlength(cand, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines


def annotate(grid: Image.Image, width: int, height: int, hor: list[str], ver: list[str],
             margin: int = 0) -> Image.Image:
    """A1111's draw_grid_annotations: a grid of width×height cells with hor[col] above each
    column and ver[row] left of each row, cells `margin` apart, on white."""
    cols, rows = grid.width // width, grid.height // height
    assert cols == len(hor) and rows == len(ver)
    size = (width + height) // 25
    font, spacing = _font(size), size // 2
    pad_left = width * 3 // 4 if any(ver) else 0
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def block(text: str, allowed: int) -> tuple[list[str], list[int]]:
        lines = _wrap(draw, text, font, allowed) if text else []
        heights = []
        for ln in lines:
            box = draw.textbbox((0, 0), ln or " ", font=font)
            heights.append(box[3] - box[1])
        return lines, heights

    hor_blocks = [block(t, width) for t in hor]
    ver_blocks = [block(t, pad_left) for t in ver]
    hor_h = [sum(h + spacing for h in hs) - spacing if hs else 0 for _, hs in hor_blocks]
    ver_h = [sum(h + spacing for h in hs) - spacing if hs else 0 for _, hs in ver_blocks]
    pad_top = max(hor_h) + spacing * 2 if any(hor_h) else 0
    out = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1),
                            grid.height + pad_top + margin * (rows - 1)), "white")
    for r in range(rows):
        for c in range(cols):
            cell = grid.crop((width * c, height * r, width * (c + 1), height * (r + 1)))
            out.paste(cell, (pad_left + (width + margin) * c, pad_top + (height + margin) * r))
    d = ImageDraw.Draw(out)

    def text(x: float, y: float, lines: list[str], heights: list[int]) -> None:
        for ln, h in zip(lines, heights):
            d.text((x, y), ln, font=font, fill="black", anchor="mt")
            y += h + spacing

    for c, (lines, hs) in enumerate(hor_blocks):
        text(pad_left + (width + margin) * c + width / 2, pad_top / 2 - hor_h[c] / 2, lines, hs)
    for r, (lines, hs) in enumerate(ver_blocks):
        text(pad_left / 2, pad_top + (height + margin) * r + height / 2 - ver_h[r] / 2,
             lines, hs)
    return out


def draw_plot(cells: list[Image.Image], plot: Plot) -> tuple[Image.Image, list[Image.Image]]:
    """The Z grid (sub-grids side by side under their Z labels) and the X/Y sub-grids of
    cells ordered x fastest, then y, then z."""
    xs, ys, zs = plot.axes
    nx, ny = len(xs.values), len(ys.values)
    w, h = cells[0].size
    subs = []
    for iz in range(len(zs.values)):
        part = [c.convert("RGB") for c in cells[iz * nx * ny:(iz + 1) * nx * ny]]
        g = image_grid(part, rows=ny)
        if plot.draw_legend:
            g = annotate(g, w, h, [xs.label(v) for v in xs.values],
                         [ys.label(v) for v in ys.values], plot.margin_size)
        subs.append(g)
    sw, sh = subs[0].size
    z_grid = image_grid(subs, rows=1)
    if plot.draw_legend:
        z_grid = annotate(z_grid, sw, sh, [zs.label(v) for v in zs.values], [""])
    return z_grid, subs


def _grid_infotext(infotext: str, plot: Plot, seeds: list[list[int]], with_z: bool) -> str:
    """A cell's infotext with A1111's Script, X/Y (Z on the main grid) Type and Values."""
    extra = {"Script": SCRIPT_TITLE}
    for axis, which, fixed in zip(plot.axes, "XYZ", seeds):
        if axis.kind.label == "Nothing" or (which == "Z" and not with_z):
            continue
        extra[f"{which} Type"] = axis.kind.label
        extra[f"{which} Values"] = axis.text
        if axis.kind.label in ("Seed", "Var. seed") and not plot.no_fixed_seeds:
            extra[f"Fixed {which} Values"] = ", ".join(map(str, fixed))
    tail = ", ".join(f"{k}: {quote(v)}" for k, v in extra.items())
    return f"{infotext}, {tail}" if infotext else tail


# ------------------------------------------------------------------ the job
def xyz_job(server, req, img2img: bool, to_params: Callable) -> tuple[Job, Any, dict[str, Any]]:
    """Check the plot and every cell's parameters, then queue one job that runs the cells
    (z, then y, then x, as A1111 with no costly axis) and draws the grid. Returns the job
    (its result: engine, Generated with the grid first) and the first cell's params and
    options for the response's info.

    The request is read once (its images decoded once, whatever the cell count); a cell is
    those params with its axis values, and the prompts a Prompt S/R cell makes go through
    the same request → params path (styles, LoRA tags) as a prompt of its own."""
    plot = parse_script_args(req.script_args, img2img, req.prompt, req.negative_prompt)
    base = req.model_copy(update={"script_name": None, "script_args": []})
    if not plot.no_fixed_seeds:
        base.seed = fix_seed(base.seed)
        if base.subseed_strength:
            base.subseed = fix_seed(base.subseed)
    p0, opts, model = to_params(base, server, img2img)
    xs, ys, zs = plot.axes
    fixed = []
    for axis in plot.axes:
        vals = axis.values
        if axis.kind.label in ("Seed", "Var. seed") and not plot.no_fixed_seeds:
            vals = [fix_seed(v) for v in vals]
        fixed.append(vals)
    n_cells = len(xs.values) * len(ys.values) * len(zs.values)
    lim = server.limits
    lim.check("X/Y/Z plot images", n_cells * req.batch_size * req.n_iter, "max_images")
    prompts: dict[tuple[str, str], tuple[str, str]] = {}

    def styled(prompt: str, negative: str) -> tuple[str, str]:
        key = (prompt, negative)
        if key not in prompts:
            q = Txt2ImgRequest(prompt=prompt, negative_prompt=negative, styles=req.styles)
            qp, _, _ = to_params(q, server, False)
            prompts[key] = (qp.prompt, qp.negative_prompt)
        return prompts[key]

    cells = []  # (params, seeds, subseeds) for ix fastest, then iy, then iz
    config = server.loaded_config()
    for iz, z in enumerate(fixed[2]):
        for iy, y in enumerate(fixed[1]):
            for ix, x in enumerate(fixed[0]):
                fields: dict[str, Any] = {"prompt": req.prompt,
                                          "negative_prompt": req.negative_prompt,
                                          "seed": base.seed}
                for axis, v in ((xs, x), (ys, y), (zs, z)):
                    axis.apply(fields, v)
                vx, vy, vz = plot.vary_seeds
                if fields["seed"] >= 0:
                    fields["seed"] += (ix if vx else 0) + (iy * len(xs.values) if vy else 0) \
                        + (iz * len(xs.values) * len(ys.values) if vz else 0)
                prompt, negative = fields.pop("prompt"), fields.pop("negative_prompt")
                if (prompt, negative) != (req.prompt, req.negative_prompt):
                    fields["prompt"], fields["negative_prompt"] = styled(prompt, negative)
                p = GenerationParams(**{**p0.__dict__, **fields})
                server.validate(p, config)
                seed = fix_seed(p.seed)
                sub = fix_seed(p.subseed) if p.subseed_strength else -1
                seeds, subseeds = all_seeds(seed, p.batch_size * p.n_iter, sub,
                                            p.subseed_strength)
                cells.append((p, seeds, subseeds))
    w, h = cells[0][0].width or 0, cells[0][0].height or 0
    if w and h:
        lim.check("X/Y/Z grid pixels", n_cells * w * h, "max_pixels")
    every = opts.get("show_progress_every_n_steps", PREVIEW_EVERY)
    vae = server.vae_path(opts)
    keep = not req.override_settings_restore_afterwards
    kind = "img2img" if img2img else "txt2img"

    def work(job: Job) -> tuple[Any, Generated]:
        def run(engine) -> list[Generated]:
            job.begin(len(cells) * req.n_iter)
            outs = []
            for i, (p, seeds, subseeds) in enumerate(cells):
                if job.stop == "interrupt":
                    outs.append(Generated([], [], [], []))
                    continue
                outs.append(run_batches(job, engine, p, seeds, subseeds, limits=lim,
                                        preview_every=every, first_batch=i * req.n_iter,
                                        preview=opts.get("show_progress_type",
                                                         "Approx cheap")))
            return outs
        engine, outs = server.with_engine(model, keep, run, worker=job.worker, vae=vae)
        if not any(o.images for o in outs):
            return engine, Generated([], [], [], [])
        size = next(o.images[0].size for o in outs if o.images)
        images = [(o.images[0] if len(o.images) == 1 else image_grid(o.images))
                  if o.images else Image.new("RGB", size) for o in outs]
        first = next(o for o in outs if o.images)
        z_grid, subs = draw_plot(images, plot)
        info_main = _grid_infotext(first.infotexts[0], plot, fixed, with_z=True)
        out = Generated([z_grid], [info_main], [first.seeds[0]], [first.subseeds[0]])
        if plot.include_sub_grids and len(subs) > 1:
            for iz, g in enumerate(subs):
                o = outs[iz * len(xs.values) * len(ys.values)]
                text = o.infotexts[0] if o.infotexts else first.infotexts[0]
                out.images.append(g)
                out.infotexts.append(_grid_infotext(text, plot, fixed, with_z=False))
                out.seeds.append(o.seeds[0] if o.seeds else first.seeds[0])
                out.subseeds.append(o.subseeds[0] if o.subseeds else first.subseeds[0])
        done = [o for o in outs if o.images]
        if plot.include_lone_images:
            for o in done:
                out.images += o.images
                out.infotexts += o.infotexts
                out.seeds += o.seeds
                out.subseeds += o.subseeds
        if req.save_images:
            fmt = opts["samples_format"]
            for o in done:
                server.save(o.images, o.infotexts, o.seeds, img2img, fmt)
            server.save([z_grid], [info_main], [first.seeds[0]], img2img, fmt, grid=True)
        return engine, out

    job = server.jobs.submit(Job(kind, work, id=req.force_task_id,
                                 keep_on_disconnect=req.save_images))
    return job, cells[0][0], opts


def xyz_script_info() -> list[dict[str, Any]]:
    """A1111's /script-info entries of the X/Y/Z plot (one per tab), its args as ScriptArg."""
    out = []
    for tab, labels in ((False, TXT2IMG_AXES), (True, IMG2IMG_AXES)):
        names = list(labels)
        args: list[dict[str, Any]] = []
        for which, default in (("X", 1), ("Y", 0), ("Z", 0)):
            args += [{"label": f"{which} type", "value": names[default], "minimum": None,
                      "maximum": None, "step": None, "choices": names},
                     {"label": f"{which} values", "value": "", "minimum": None,
                      "maximum": None, "step": None, "choices": None},
                     {"label": f"{which} values", "value": None, "minimum": None,
                      "maximum": None, "step": None, "choices": list(SAMPLERS)}]
        for label, value in (("Draw legend", True), ("Include Sub Images", False),
                             ("Include Sub Grids", False), ("Keep -1 for seeds", False),
                             ("Vary seeds for X", False), ("Vary seeds for Y", False),
                             ("Vary seeds for Z", False)):
            args.append({"label": label, "value": value, "minimum": None, "maximum": None,
                         "step": None, "choices": None})
        args.append({"label": "Grid margins (px)", "value": 0, "minimum": 0, "maximum": 500,
                     "step": 2, "choices": None})
        args.append({"label": "Use text inputs instead of dropdowns", "value": False,
                     "minimum": None, "maximum": None, "step": None, "choices": None})
        out.append({"name": SCRIPT_TITLE.lower(), "is_alwayson": False, "is_img2img": tab,
                    "args": args})
    return out
