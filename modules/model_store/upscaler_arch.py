"""The upscaler networks this project loads, written here, and the tiled forward pass that runs them.

spandrel (the maintained architecture library A1111 uses) cannot be imported beside this project's torch: its
package `__init__` builds its registry of every architecture, and two of them import torchvision at module level
(LaMa and RestoreFormer), which must not be installed here; so the architectures are our own, key for key
compatible with the published files:

- ESRGAN's RRDBNet, in each of its three key layouts: the original ESRGAN one (`model.0.weight`,
  `model.1.sub.N.RDB1.conv1.0.weight`, ..., upsampling convs `model.3`, `model.6`, ...), the later ESRGAN repo's
  (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`, `HRconv`) and BasicSR / Real-ESRGAN's (`conv_first`,
  `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`), with Real-ESRGAN's
  pixel-unshuffle input for its x2 and x1 models (`conv_first` taking 4 or 16 times the image channels);
  width (nf), depth (nb), growth channels (gc), scale and channels are read off the state dict;
- Real-ESRGAN's SRVGGNetCompact (`realesr-general-x4v3`, `realesr-animevideov3`: `body.N` convs and PReLUs).

Anything else (SwinIR, DAT, HAT, Swin2SR, ...) is named by its keys and refused with `UnsupportedArchError`.
Inputs and outputs are RGB in [0, 1], N x C x H x W, as the original ESRGAN and Real-ESRGAN code feeds them.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedArchError(ValueError):
    """A state dict of an architecture this project cannot build (or not an upscaler at all)."""


# ----------------------------------------------------------------------------------------------- ESRGAN

class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN's generator in BasicSR's key names. `upsamples` nearest x2 steps (each followed by
    a conv), after a pixel-unshuffle of the input by `unshuffle` (1, 2 or 4): the scale is 2**upsamples /
    unshuffle (Real-ESRGAN x2plus: 2 upsamples over an unshuffle of 2)."""

    arch = "ESRGAN"

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32,
                 upsamples: int = 2, unshuffle: int = 1):
        super().__init__()
        if unshuffle not in (1, 2, 4) or 2 ** upsamples < unshuffle:
            raise UnsupportedArchError(f"an RRDBNet with {upsamples} upsamplings over a pixel-unshuffle of "
                                       f"{unshuffle} has no integer scale")
        self.in_nc, self.out_nc, self.nf, self.nb, self.gc = in_nc, out_nc, nf, nb, gc
        self.upsamples, self.unshuffle = upsamples, unshuffle
        self.scale = 2 ** upsamples // unshuffle
        self.size_multiple = unshuffle  # the input's sides must be multiples of this (padded by the runner)
        self.conv_first = nn.Conv2d(in_nc * unshuffle * unshuffle, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(upsamples):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.upsamples):
            up = getattr(self, f"conv_up{i + 1}")
            feat = self.lrelu(up(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


# ------------------------------------------------------------------------------------ Real-ESRGAN compact

class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style network: convs with PReLUs at the input's size, a pixel-shuffle to the
    output size, plus the nearest-upscaled input."""

    arch = "Compact"
    size_multiple = 1

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, num_conv: int = 16, scale: int = 4):
        super().__init__()
        self.in_nc, self.out_nc, self.nf, self.num_conv, self.scale = in_nc, out_nc, nf, num_conv, scale
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# ------------------------------------------------------------------------------------------- detection

# Keys that name architectures we do not build, for a refusal that says what the file is.
_OTHER_ARCHES = (
    ("DAT", ("before_RG.1.weight",)),
    ("HAT", ("conv_after_body.weight", "layers.0.residual_group.blocks.0.conv_block.cab.0.weight")),
    ("Swin2SR", ("layers.0.residual_group.blocks.0.attn.logit_scale",)),
    ("SwinIR", ("layers.0.residual_group.blocks.0.attn.relative_position_bias_table",)),
    ("SwinIR", ("patch_embed.proj.weight", "conv_after_body.weight")),
    ("SPAN", ("block_1.c1_r.sk.weight",)),
    ("OmniSR", ("residual_layer.0.residual_layer.0.layer.0.fn.0.weight",)),
    ("GFPGAN", ("toRGB.0.weight",)),
    ("CodeFormer", ("quantize.embedding.weight",)),
)

_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TRUNK_END = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_TAIL = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_MID_RDB = re.compile(r"^RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)$")
_NEW_RDB = re.compile(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")
_NEW_UP = re.compile(r"^conv_up(\d+)\.(weight|bias)$")
_COMPACT = re.compile(r"^body\.(\d+)\.(weight|bias)$")


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The tensors of a loaded upscaler file: Real-ESRGAN's `params_ema` / `params` wrappers, `state_dict` /
    `model` ones and DataParallel's `module.` prefixes taken off."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("params_ema", "params", "state_dict", "model", "net", "generator"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise UnsupportedArchError("the file holds no state dict (a dict of tensors)")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not state:
        raise UnsupportedArchError("the file holds no tensors")
    return state


def _other_arch(state: dict) -> str | None:
    for name, keys in _OTHER_ARCHES:
        if all(k in state for k in keys):
            return name
    return None


def old_esrgan_to_new(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout (`model.N...`) in BasicSR's names. After the trunk (`model.1.sub`) the
    sequential holds the upsampling convs, then HR_conv0 and the last conv: the last two of the
    `model.N.weight` tensors are those, the ones before them the upsampling convs, in order."""
    new: dict[str, torch.Tensor] = {}
    trunk_ends = sorted({int(m.group(1)) for k in state if (m := _OLD_TRUNK_END.match(k))})
    tail = sorted({int(m.group(1)) for k in state if (m := _OLD_TAIL.match(k)) and int(m.group(1)) >= 2})
    if len(trunk_ends) != 1 or len(tail) < 2 or "model.0.weight" not in state:
        raise UnsupportedArchError("an ESRGAN file in the original layout needs model.0, model.1.sub.N (the trunk "
                                   "conv) and at least two convs after the trunk")
    names = {tail[-2]: "conv_hr", tail[-1]: "conv_last"}
    names.update({n: f"conv_up{i + 1}" for i, n in enumerate(tail[:-2])})
    for key, value in state.items():
        if m := _OLD_RDB.match(key):
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif m := _OLD_TRUNK_END.match(key):
            new[f"conv_body.{m.group(2)}"] = value
        elif key.startswith("model.0."):
            new["conv_first." + key.removeprefix("model.0.")] = value
        elif (m := _OLD_TAIL.match(key)) and int(m.group(1)) in names:
            new[f"{names[int(m.group(1))]}.{m.group(2)}"] = value
        else:
            raise UnsupportedArchError(f"unexpected key {key!r} for an ESRGAN file in the original layout (an "
                                       "ESRGAN variant this project does not build)")
    return new


def mid_esrgan_to_new(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The later ESRGAN repo's layout (`RRDB_trunk`, `trunk_conv`, `upconvN`, `HRconv`) in BasicSR's names."""
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _MID_RDB.match(key):
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        else:
            key = re.sub(r"^trunk_conv\.", "conv_body.", key)
            key = re.sub(r"^upconv(\d+)\.", r"conv_up\1.", key)
            new[re.sub(r"^HRconv\.", "conv_hr.", key)] = value
    return new


def build_rrdbnet(state: dict[str, torch.Tensor]) -> RRDBNet:
    """An RRDBNet shaped after a BasicSR-layout state dict (not loaded)."""
    try:
        first, last = state["conv_first.weight"], state["conv_last.weight"]
        gc = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as e:
        raise UnsupportedArchError(f"an ESRGAN state dict without {e.args[0]}") from None
    nb = len({int(m.group(1)) for k in state if (m := _NEW_RDB.match(k))})
    upsamples = len({int(m.group(1)) for k in state if (m := _NEW_UP.match(k))})
    nf, in_ch, out_nc = first.shape[0], first.shape[1], last.shape[0]
    ratio = in_ch // out_nc if in_ch % out_nc == 0 else 0
    unshuffle = {1: 1, 4: 2, 16: 4}.get(ratio)
    if unshuffle is None:
        raise UnsupportedArchError(f"conv_first takes {in_ch} channels for a {out_nc}-channel output: not an "
                                   "image, nor a pixel-unshuffled one")
    return RRDBNet(in_nc=in_ch // unshuffle ** 2, out_nc=out_nc, nf=nf, nb=nb, gc=gc, upsamples=upsamples,
                   unshuffle=unshuffle)


def build_compact(state: dict[str, torch.Tensor]) -> SRVGGNetCompact:
    indices = sorted({int(m.group(1)) for k in state if (m := _COMPACT.match(k))})
    count = indices[-1] + 1
    if indices != list(range(count)) or count < 3 or count % 2 == 0:
        raise UnsupportedArchError("an SRVGGNetCompact needs convs with a PReLU after each but the last "
                                   "(body.0 ... body.N, PReLU weights at the odd indices)")
    first, final = state["body.0.weight"], state[f"body.{count - 1}.weight"]
    in_nc, nf = first.shape[1], first.shape[0]
    scale = math.isqrt(final.shape[0] // in_nc)
    if scale * scale * in_nc != final.shape[0]:
        raise UnsupportedArchError(f"the last conv's {final.shape[0]} channels are no pixel-shuffle of "
                                   f"{in_nc} channels")
    return SRVGGNetCompact(in_nc=in_nc, out_nc=in_nc, nf=nf, num_conv=(count - 3) // 2, scale=scale)


def detect_and_build(state: dict[str, torch.Tensor]) -> nn.Module:
    """The network a state dict is for, its weights loaded (eval mode, no gradients), or UnsupportedArchError
    naming what the file is when we cannot build it."""
    if "model.0.weight" in state and any(_OLD_RDB.match(k) for k in state):
        state = old_esrgan_to_new(state)
    elif "RRDB_trunk.0.RDB1.conv1.weight" in state:
        state = mid_esrgan_to_new(state)
    other = _other_arch(state)
    if other is not None:
        raise UnsupportedArchError(f"a {other} model; only ESRGAN (RRDBNet) and Real-ESRGAN (RRDBNet, "
                                   "SRVGGNetCompact) models load here")
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        model = build_rrdbnet(state)
    elif "body.0.weight" in state and "body.1.weight" in state and state["body.1.weight"].ndim == 1:
        model = build_compact(state)
    else:
        sample = ", ".join(sorted(state)[:4])
        raise UnsupportedArchError(f"not an ESRGAN or Real-ESRGAN model (its keys begin {sample}, ...)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split()[6:]) or type(e).__name__  # past "Error(s) in loading state_dict for X:"
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise UnsupportedArchError(f"the weights do not fit an {model.arch} network: {detail}") from None
    model.eval().requires_grad_(False)
    return model


def describe(model: nn.Module) -> str:
    if isinstance(model, RRDBNet):
        return (f"ESRGAN (RRDBNet) x{model.scale}: nf={model.nf}, nb={model.nb}, gc={model.gc}"
                + (f", pixel-unshuffle {model.unshuffle}" if model.unshuffle > 1 else ""))
    if isinstance(model, SRVGGNetCompact):
        return f"Real-ESRGAN compact (SRVGGNetCompact) x{model.scale}: nf={model.nf}, {model.num_conv} convs"
    return type(model).__name__


# ------------------------------------------------------------------------------------------ tiled forward

def forward_padded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) for any size: sides that are no multiple of `model.size_multiple` (pixel-unshuffle models) are
    padded by reflection first and the result cropped back, as Real-ESRGAN's own inference pads."""
    multiple, scale = getattr(model, "size_multiple", 1), model.scale
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    out = model(x)
    return out[..., : h * scale, : w * scale]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one side: every `tile - overlap` pixels; the last tile may be shorter (but always
    longer than the overlap), so every seam between two tiles is exactly `overlap` pixels wide."""
    stride = tile - overlap
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    return starts


def seam_weights(length: int, start: int, end: int, full: int, overlap: int) -> torch.Tensor:
    """The weight of a tile covering [start, end) of a side `full` long, per pixel. Along a seam (an `overlap`
    wide band shared with the next tile) the weights of the two tiles add up to 1: each is 0 on the quarter
    of the band at its own edge (where a tile's result is least like the whole image's, missing its
    neighbours), rises linearly over the middle half, and is 1 on the quarter beyond. Image borders get 1."""
    pos = torch.arange(start, end, dtype=torch.float64) + 0.5
    w = torch.ones(end - start, dtype=torch.float64)
    if overlap > 0:
        if start > 0:  # a seam at the tile's left/top edge
            w = torch.minimum(w, ((pos - start - overlap / 4) / (overlap / 2)).clamp(0, 1))
        if end < full:  # a seam at its right/bottom edge
            w = torch.minimum(w, ((end - pos - overlap / 4) / (overlap / 2)).clamp(0, 1))
    return w


def tiled_forward(model: nn.Module, x: torch.Tensor, tile: int, overlap: int,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """model(x) of an 1 x C x H x W tensor in tiles of `tile` input pixels overlapping by `overlap` (A1111's
    ESRGAN_tile / ESRGAN_tile_overlap; tile 0: the whole image at once), blended across the seams as
    `seam_weights` says. Each output pixel is a weighted mean of tiles whose result at that pixel lies at
    least overlap/4 input pixels from any seam edge, so a network that sees no farther than that gives the
    untiled result exactly. The result is gathered on the CPU, in float32; `progress(done, total)` is called
    after every tile (and may raise to stop)."""
    scale = model.scale
    _, _, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        out = forward_padded(model, x).float().cpu()
        if progress is not None:
            progress(1, 1)
        return out
    multiple = getattr(model, "size_multiple", 1)
    tile = max(multiple * 2, tile - tile % multiple)
    overlap = max(0, min(overlap, tile // 2))
    overlap -= overlap % multiple  # tile starts stay on the unshuffle grid, so tiles see what the whole sees
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = None
    total = torch.zeros(1, 1, h * scale, w * scale)
    done, count = 0, len(ys) * len(xs)
    for y0 in ys:
        y1 = min(y0 + tile, h)
        wy = seam_weights(h, y0 * scale, y1 * scale, h * scale, overlap * scale)
        for x0 in xs:
            x1 = min(x0 + tile, w)
            result = forward_padded(model, x[..., y0:y1, x0:x1]).float().cpu()
            if out is None:
                out = torch.zeros(1, result.shape[1], h * scale, w * scale)
            wx = seam_weights(w, x0 * scale, x1 * scale, w * scale, overlap * scale)
            weight = (wy[:, None] * wx[None, :]).float()[None, None]
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += result * weight
            total[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += weight
            done += 1
            if progress is not None:
                progress(done, count)
    return out / total.clamp_min(1e-12)
