"""ESRGAN-family super-resolution networks, as the files A1111 users keep in an upscaler folder.

* RRDBNet (Wang et al. 2018, "ESRGAN", §3.1): conv_first, a trunk of residual-in-residual dense
  blocks (RRDB = three RDBs of five 3×3 convs with dense connections, each RDB and each RRDB
  residual scaled by 0.2), conv_body, a long skip, nearest ×2 upsample + conv per factor 2,
  conv_hr, conv_last; LeakyReLU(0.2). Real-ESRGAN ×2 / ×1 models (Wang et al. 2021) keep the
  ×4 body and pixel-unshuffle the input by 2 / 4 first (12 / 48 input channels).
* SRVGGNetCompact (Real-ESRGAN's compact model, realesr-general/animevideo): `body` = conv,
  PReLU, (conv, PReLU)×n, conv to out·s² channels; pixel-shuffle by s, plus the nearest-upsampled
  input.

Module names are BasicSR's keys (`conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`,
`conv_hr`, `conv_last`); the original ESRGAN layouts (`model.0`, `model.1.sub.N.RDB1.conv1.0`,
… and `RRDB_trunk.N.RDB1`, `trunk_conv`, `upconv1`, `HRconv`) are renamed by one table.
Architecture, scale and widths come from tensor shapes only, never from the file name.

Images go in as RGB in [0, 1], the convention the models were trained with (BasicSR and
Real-ESRGAN's own inference). A1111 ≥ 1.8 feeds them BGR (upscaler_utils.pil_image_to_torch_bgr);
colours can differ slightly from A1111's for that reason.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError, SdloomError
from ..io import display_name, load_torch_weights, one_line

SUFFIXES = (".pth", ".pt", ".safetensors")


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


# ---------------------------------------------------------------------- configs
@dataclass(frozen=True)
class RRDBConfig:
    """RRDBNet shapes: widths nf (features) and gc (growth), nb RRDBs, n_up ×2 upsamplers,
    and the input pixel-unshuffle factor (1, or 2 / 4 for Real-ESRGAN ×2 / ×1)."""
    in_ch: int = 3
    out_ch: int = 3
    nf: int = 64
    gc: int = 32
    nb: int = 23
    n_up: int = 2
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2 ** self.n_up // self.unshuffle

    @classmethod
    def detect(cls, shapes: Mapping[str, tuple[int, ...]]) -> RRDBConfig:
        """From BasicSR-named shapes (after `canonical_keys`)."""
        for k in ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_last.weight"):
            if k not in shapes:
                raise ModelFileError(f"not an RRDBNet (ESRGAN) state dict: no {k}")
        nf, cin = shapes["conv_first.weight"][:2]
        gc = shapes["body.0.rdb1.conv1.weight"][0]
        out_ch = shapes["conv_last.weight"][0]
        nb = len({k.split(".")[1] for k in shapes if k.startswith("body.")})
        n_up = len([k for k in shapes if re.fullmatch(r"conv_up\d+\.weight", k)])
        for u in (1, 2, 4):
            if cin == out_ch * u * u:
                return cls(out_ch, out_ch, nf, gc, nb, n_up, u)
        raise ModelFileError(f"RRDBNet with {cin} input and {out_ch} output channels: not a "
                             "plain or pixel-unshuffled (×2, ×1) super-resolution model")


@dataclass(frozen=True)
class CompactConfig:
    """SRVGGNetCompact shapes: nf features, num_conv body convs, scale s."""
    in_ch: int = 3
    out_ch: int = 3
    nf: int = 64
    num_conv: int = 16
    scale: int = 4

    @classmethod
    def detect(cls, shapes: Mapping[str, tuple[int, ...]]) -> CompactConfig:
        convs = sorted(int(k.split(".")[1]) for k, s in shapes.items()
                       if re.fullmatch(r"body\.\d+\.weight", k) and len(s) == 4)
        if not convs or convs[0] != 0 or "body.1.weight" not in shapes:
            raise ModelFileError("not an SRVGGNetCompact state dict: no body.0.weight conv and "
                                 "body.1.weight PReLU")
        nf, cin = shapes["body.0.weight"][:2]
        last = convs[-1]
        num_conv = (last - 2) // 2
        if last % 2 or convs != list(range(0, last + 1, 2)):
            raise ModelFileError("SRVGGNetCompact body convs are not at body.0, 2, 4, …")
        cout = shapes[f"body.{last}.weight"][0]
        s = round((cout / cin) ** 0.5)
        if s < 1 or s * s * cin != cout:
            raise ModelFileError(f"SRVGGNetCompact last conv has {cout} channels for {cin} "
                                 "input channels: not out·scale²")
        return cls(cin, cin, nf, num_conv, s)


Config = RRDBConfig | CompactConfig


# ---------------------------------------------------------------------- key layouts
# the original ESRGAN repository's newer layout (RRDBNet_arch.py, 2019) → BasicSR
_NEW_ESRGAN = [(r"^RRDB_trunk\.", "body."), (r"\.RDB(\d)\.", r".rdb\1."),
               (r"^trunk_conv\.", "conv_body."), (r"^upconv(\d)\.", r"conv_up\1."),
               (r"^HRconv\.", "conv_hr.")]


def _old_esrgan(keys: list[str]) -> dict[str, str]:
    """The old ESRGAN layout (`model.N` of one Sequential; the architecture of most community
    models): model.0 conv_first; model.1.sub.i.RDBk.convj.0 the trunk, whose last entry
    model.1.sub.nb is conv_body; each ×2 upsampler is (Upsample, conv, act), so the upconvs
    are model.3, 6, …, then conv_hr at 2+3n and conv_last at 4+3n."""
    idx = sorted({int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.weight$", k))})
    if not idx or idx[0] != 0 or len(idx) < 3:
        raise ModelFileError("old ESRGAN layout without model.0 / conv_hr / conv_last weights")
    n_up = (idx[-1] - 4) // 3
    if idx[-1] != 4 + 3 * n_up or idx != [0, *[3 + 3 * i for i in range(n_up)], 2 + 3 * n_up,
                                         4 + 3 * n_up]:
        raise ModelFileError(f"old ESRGAN layout with convs at model.{idx}: not conv_first, "
                             "×2 upsamplers, HR conv, last conv")
    nb = max([int(m.group(1)) for k in keys
              if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))], default=-1) + 1
    names = {0: "conv_first", 2 + 3 * n_up: "conv_hr", 4 + 3 * n_up: "conv_last",
             **{3 + 3 * i: f"conv_up{i + 1}" for i in range(n_up)}}
    out = {}
    for k in keys:
        if m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k):
            out[k] = f"{names.get(int(m.group(1)), k)}.{m.group(2)}"
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k):
            out[k] = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := re.fullmatch(rf"model\.1\.sub\.{nb}\.(weight|bias)", k):
            out[k] = f"conv_body.{m.group(1)}"
        else:
            out[k] = k  # left as is: strict loading names it
    return out


def canonical_keys(keys: list[str]) -> tuple[str, dict[str, str]]:
    """The layout name ("esrgan-old", "esrgan", "basicsr", "compact") and the renaming of
    every key into this module's (BasicSR) names."""
    keys = list(keys)
    if "model.0.weight" in keys:
        return "esrgan-old", _old_esrgan(keys)
    if any(k.startswith("RRDB_trunk.") for k in keys):
        out = {}
        for k in keys:
            n = k
            for pat, rep in _NEW_ESRGAN:
                n = re.sub(pat, rep, n)
            out[k] = n
        return "esrgan", out
    if "conv_first.weight" in keys:
        return "basicsr", {k: k for k in keys}
    if "body.0.weight" in keys:
        return "compact", {k: k for k in keys}
    raise ModelFileError("not an ESRGAN-family upscaler: none of model.0.weight (ESRGAN), "
                         "conv_first.weight (Real-ESRGAN/BasicSR RRDBNet) or body.0.weight "
                         "(SRVGGNetCompact)")


def detect(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Config, dict[str, str]]:
    """Config and key renaming from names and shapes alone (works on meta tensors' shapes)."""
    layout, rename = canonical_keys(list(shapes))
    named = {rename[k]: tuple(s) for k, s in shapes.items()}
    cfg = CompactConfig.detect(named) if layout == "compact" else RRDBConfig.detect(named)
    return cfg, rename


# ---------------------------------------------------------------------- networks
class ResidualDenseBlock(nn.Module):
    """RDB: x_i = lrelu(conv_i(cat(x, x_1..x_{i-1}))) for i < 5; out = x + 0.2·conv5(cat(...))."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", _conv(nf + i * gc, gc))
        self.conv5 = _conv(nf + 4 * gc, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(_lrelu(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in residual dense block: x + 0.2·rdb3(rdb2(rdb1(x)))."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


def _pad_to(x: torch.Tensor, m: int) -> torch.Tensor:
    """Pad bottom/right to multiples of m (reflect, as Real-ESRGAN; replicate if too small)."""
    ph, pw = -x.shape[-2] % m, -x.shape[-1] % m
    if not ph and not pw:
        return x
    mode = "reflect" if x.shape[-2] > ph and x.shape[-1] > pw else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator (module names = BasicSR keys)."""

    def __init__(self, c: RRDBConfig):
        super().__init__()
        self.config = c
        self.conv_first = _conv(c.in_ch * c.unshuffle ** 2, c.nf)
        self.body = nn.Sequential(*(RRDB(c.nf, c.gc) for _ in range(c.nb)))
        self.conv_body = _conv(c.nf, c.nf)
        for i in range(c.n_up):
            setattr(self, f"conv_up{i + 1}", _conv(c.nf, c.nf))
        self.conv_hr = _conv(c.nf, c.nf)
        self.conv_last = _conv(c.nf, c.out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        h, w = x.shape[-2:]
        if c.unshuffle > 1:
            x = F.pixel_unshuffle(_pad_to(x, c.unshuffle), c.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(c.n_up):
            up = getattr(self, f"conv_up{i + 1}")
            feat = _lrelu(up(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(_lrelu(self.conv_hr(feat)))
        return out[..., :h * c.scale, :w * c.scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style net: body convs + PReLU, pixel shuffle, plus the
    nearest-upsampled input (the body learns the residual)."""

    def __init__(self, c: CompactConfig):
        super().__init__()
        self.config = c
        layers: list[nn.Module] = [_conv(c.in_ch, c.nf), nn.PReLU(c.nf)]
        for _ in range(c.num_conv):
            layers += [_conv(c.nf, c.nf), nn.PReLU(c.nf)]
        layers.append(_conv(c.nf, c.out_ch * c.scale ** 2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.scale
        out = F.pixel_shuffle(self.body(x), s)
        return out + F.interpolate(x, scale_factor=s, mode="nearest")


def build(c: Config) -> nn.Module:
    return SRVGGNetCompact(c) if isinstance(c, CompactConfig) else RRDBNet(c)


# ---------------------------------------------------------------------- files
def _unwrap(obj: object, name: str) -> dict[str, torch.Tensor]:
    """A .pth's state dict: BasicSR saves {"params_ema": …} / {"params": …}; DataParallel
    prefixes "module."."""
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ModelFileError(f"{name}: not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ModelFileError(f"{name}: holds no tensors")
    return sd


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an upscaler file: .safetensors, or .pth/.pt read with weights only."""
    path = Path(path)
    name = display_name(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            return _unwrap(load_file(str(path)), name)
        return _unwrap(load_torch_weights(path), name)
    except SdloomError:
        raise
    except Exception as e:  # damaged or foreign files: one line, no traceback
        raise ModelFileError(f"cannot read upscaler {name}: {one_line(e, path)}") from None


def load_state_dict(sd: Mapping[str, torch.Tensor], name: str = "upscaler") -> nn.Module:
    """Detect, build and strictly load; missing, unexpected and mis-shaped keys are listed."""
    try:
        cfg, rename = detect({k: tuple(v.shape) for k, v in sd.items()})
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from None
    model = build(cfg)
    own = model.state_dict()
    got = {rename[k]: v for k, v in sd.items()}
    missing = sorted(set(own) - set(got))
    unexpected = sorted(k for k, v in sd.items() if rename[k] not in own)
    wrong = sorted(f"{k} {tuple(got[k].shape)} ≠ {tuple(own[k].shape)}"
                   for k in set(own) & set(got) if got[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(v[:6])}{' …' if len(v) > 6 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatch", wrong)) if v]
        raise ModelFileError(f"{name} does not fit the detected {type(cfg).__name__} "
                             f"{cfg}: " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in got.items()})
    return model.eval().requires_grad_(False)


def load_upscaler(path: str | Path) -> nn.Module:
    """An upscaler file → an eval-mode network on the CPU (fp32); `.config.scale` is its factor."""
    return load_state_dict(read_state_dict(path), display_name(path))


def file_config(path: str | Path) -> Config:
    """The detected config of a file (shapes only where the format allows it)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise ModelFileError(f"cannot read upscaler {display_name(path)}: "
                                 f"{one_line(e, path)}") from None
    else:
        shapes = {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    return detect(shapes)[0]


# ---------------------------------------------------------------------- tiled inference
def _starts(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """Tile spans [a, b) covering [0, length): neighbours overlap by ≥ overlap; starts are
    multiples of align (so a pixel-unshuffle sees the same 2×2 / 4×4 cells as untiled)."""
    if length <= tile:
        return [(0, length)]
    step = max(align, (tile - overlap) // align * align)
    starts = sorted({*range(0, length - tile, step), (length - tile) // align * align})
    return [(a, a + tile) for a in starts[:-1]] + [(starts[-1], length)]


def _ramp(n: int, scale: int, left: float, right: float) -> torch.Tensor:
    """Blend weights of one tile's n output pixels: 0 over the outer quarter of an overlap
    of `left`/`right` input pixels, rising linearly to 1 over its middle half (so a tile's
    border pixels, which saw zero padding, count for nothing when the overlap is wide)."""
    d = (torch.arange(n, dtype=torch.float32) + 0.5) / scale  # input px from the left edge
    w = torch.ones(n)
    if left > 0:
        w = torch.minimum(w, ((d - left / 4) / (left / 2)).clamp(0, 1))
    if right > 0:
        w = torch.minimum(w, ((n / scale - d - right / 4) / (right / 2)).clamp(0, 1))
    return w


@torch.no_grad()
def upscale_tensor(model: nn.Module, x: torch.Tensor, *, tile: int = 192, overlap: int = 8
                   ) -> torch.Tensor:
    """[1, C, H, W] in [0, 1] → [1, C, sH, sW] on the CPU, run in tiles of tile×tile input
    pixels (0 = whole image) whose overlaps are blended (`_ramp`). Equal to the untiled
    result when a quarter of the overlap covers the net's receptive radius; otherwise seams
    are feathered, as A1111's tiled ESRGAN."""
    c = model.config
    s = c.scale
    if tile < 0 or overlap < 0:
        raise SdloomError("tile size and overlap must be ≥ 0")
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    _, ch, h, w = x.shape
    if tile == 0 or (h <= tile and w <= tile):
        return model(x.to(dev, dt)).float().cpu()
    if 2 * overlap >= tile:
        raise SdloomError(f"tile overlap {overlap} must be less than half the tile size {tile}")
    align = getattr(c, "unshuffle", 1)
    rows, cols = _starts(h, tile, overlap, align), _starts(w, tile, overlap, align)
    out = torch.zeros(1, c.out_ch, h * s, w * s)
    total = torch.zeros(1, 1, h * s, w * s)
    for i, (y0, y1) in enumerate(rows):
        wy = _ramp((y1 - y0) * s, s, rows[i - 1][1] - y0 if i else 0,
                   y1 - rows[i + 1][0] if i + 1 < len(rows) else 0)
        for j, (x0, x1) in enumerate(cols):
            wx = _ramp((x1 - x0) * s, s, cols[j - 1][1] - x0 if j else 0,
                       x1 - cols[j + 1][0] if j + 1 < len(cols) else 0)
            y = model(x[..., y0:y1, x0:x1].to(dev, dt)).float().cpu()
            wt = wy[:, None] * wx[None, :]
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] += y * wt
            total[..., y0 * s:y1 * s, x0 * s:x1 * s] += wt
    return out / total.clamp_min(1e-8)
