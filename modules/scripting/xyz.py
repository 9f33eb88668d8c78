"""X/Y/Z plot's axes and values, as A1111 has them: the axis list of each tab (indices are A1111's), value
lists with ranges (`1-5`, `1-10 (+2)`, `0-1 [5]`, `10-1 (-3)`), each value checked before any image is made,
how a value is applied to a processing object, and the labelled grid of the cells. Torch-free."""
from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from modules.core import samplers


class AxisError(ValueError):
    """A value or axis X/Y/Z plot cannot use (named in the message)."""


@dataclass
class Axis:
    label: str
    type: Callable  # int | float | str | "permutations"
    apply: Callable | None  # apply(p, value, all_values); None: listed for A1111's indices, not available here
    tab: str | None = None  # None: both tabs; "txt2img" / "img2img": that tab only
    confirm: Callable | None = None  # confirm(p, values) raises AxisError for a bad value
    format: Callable | None = None  # the legend of a value
    choices: Callable | None = None  # the values the UI's dropdown offers
    cost: float = 0.0  # the costlier axes vary slowest (a checkpoint loads once per value)


def _field(name: str):
    def apply(p, x, xs):
        setattr(p, name, x)
    return apply


def _override(key: str):
    def apply(p, x, xs):
        p.override_settings[key] = x
    return apply


def _prompt_sr(p, x, xs):
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise AxisError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)
    if getattr(p, "hr_prompt", None):
        p.hr_prompt = p.hr_prompt.replace(xs[0], x)
    if getattr(p, "hr_negative_prompt", None):
        p.hr_negative_prompt = p.hr_negative_prompt.replace(xs[0], x)


def _prompt_order(p, x, xs):
    """The prompt's tokens (the axis' values) in the order of permutation `x`."""
    token_order = sorted(((p.prompt.find(t), t) for t in x), key=lambda pair: pair[0])
    parts, start = [], 0
    for pos, token in token_order:
        if pos < 0:
            raise AxisError(f"Prompt order: {token!r} is not in the prompt")
        parts.append(p.prompt[start:pos])
        start = pos + len(token)
    parts.append(p.prompt[start:])
    out = ""
    for i, token in enumerate(x):
        out += parts[i] + token
    p.prompt = out + parts[-1]


def _checkpoint(p, x, xs):
    p.override_settings["sd_model_checkpoint"] = x


def _vae(p, x, xs):
    p.override_settings["sd_vae"] = x


def _styles(p, x, xs):
    p.styles = list(p.styles) + [s.strip() for s in x.split(",") if s.strip()]


def _size(p, x, xs):
    try:
        w, h = (int(v) for v in str(x).lower().split("x"))
    except ValueError:
        raise AxisError(f"Size: {x!r} is not WIDTHxHEIGHT") from None
    p.width, p.height = w, h


def _nothing(p, x, xs):
    pass


def _confirm_samplers(p, xs):
    for x in xs:
        try:
            samplers.resolve(x, "Automatic")
        except samplers.UnknownSamplerError:
            raise AxisError(f"Unknown sampler: {x}") from None


def _confirm_checkpoints(p, xs):
    for x in xs:
        if p.ctx.registry.find(x) is None:
            raise AxisError(f"Unknown checkpoint: {x}")


def _confirm_vae(p, xs):
    choices = p.ctx.vaes.choices() if p.ctx.vaes is not None else ["Automatic", "None"]
    for x in xs:
        if x not in choices:
            raise AxisError(f"Unknown VAE: {x} (VAEs: {', '.join(choices)})")


def _confirm_styles(p, xs):
    for x in xs:
        for name in (s.strip() for s in x.split(",")):
            if name and name not in p.ctx.styles.names():
                raise AxisError(f"Unknown style: {name}")


def _confirm_schedules(p, xs):
    labels = samplers.schedule_type_labels()
    for x in xs:
        if x not in labels:
            raise AxisError(f"Unknown schedule type: {x} (schedule types: {', '.join(labels)})")


def _confirm_upscalers(p, xs):
    from modules.generation.params import HIRES_UPSCALERS
    server = getattr(p.request, "upscalers", None)  # the model upscalers (ESRGAN, ...) of the server
    for x in xs:
        if x not in HIRES_UPSCALERS and not (server is not None and server.has(x)):
            raise AxisError(f"Unknown hires upscaler: {x}")


def _format_value(p, axis, x) -> str:
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x))
    return f"{axis.label}: {x}" if axis.type in (int, float) else str(x)


def _format_name(p, axis, x) -> str:
    return str(x)


def _format_nothing(p, axis, x) -> str:
    return ""


PERMUTATIONS = "permutations"


def _names(kind: str) -> list[str]:
    from modules import shared
    return shared.names_of(kind)

_upscalers = lambda: __import__("modules.generation.params", fromlist=["HIRES_UPSCALERS"]).HIRES_UPSCALERS  # noqa: E731

AXES: list[Axis] = [
    Axis("Nothing", str, _nothing, format=_format_nothing),
    Axis("Seed", int, _field("seed")),
    Axis("Var. seed", int, _field("subseed")),
    Axis("Var. strength", float, _field("subseed_strength")),
    Axis("Steps", int, _field("steps")),
    Axis("Hires steps", int, _field("hr_second_pass_steps"), tab="txt2img"),
    Axis("CFG Scale", float, _field("cfg_scale")),
    Axis("Image CFG Scale", float, None, tab="img2img"),
    Axis("Prompt S/R", str, _prompt_sr, format=_format_name),
    Axis("Prompt order", PERMUTATIONS, _prompt_order, format=_format_value),
    Axis("Sampler", str, _field("sampler_name"), tab="txt2img", confirm=_confirm_samplers, format=_format_name,
         choices=samplers.sampler_names),
    Axis("Hires sampler", str, _field("hr_sampler_name"), tab="txt2img", confirm=_confirm_samplers,
         format=_format_name, choices=samplers.sampler_names),
    Axis("Sampler", str, _field("sampler_name"), tab="img2img", confirm=_confirm_samplers, format=_format_name,
         choices=samplers.sampler_names),
    Axis("Checkpoint name", str, _checkpoint, confirm=_confirm_checkpoints, format=_format_name, cost=1.0,
         choices=lambda: _names("checkpoints")),
    Axis("Negative Guidance minimum sigma", float, None),
    Axis("Sigma Churn", float, None),
    Axis("Sigma min", float, None),
    Axis("Sigma max", float, None),
    Axis("Sigma noise", float, None),
    Axis("Schedule type", str, _field("scheduler"), confirm=_confirm_schedules, format=_format_name,
         choices=samplers.schedule_type_labels),
    Axis("Schedule min sigma", float, None),
    Axis("Schedule max sigma", float, None),
    Axis("Schedule rho", float, None),
    Axis("Beta schedule alpha", float, None),
    Axis("Beta schedule beta", float, None),
    Axis("Eta", float, _field("eta")),
    Axis("Clip skip", int, _override("CLIP_stop_at_last_layers")),
    Axis("Denoising", float, _field("denoising_strength")),
    Axis("Initial noise multiplier", float, _field("initial_noise_multiplier")),
    Axis("Extra noise", float, None),
    Axis("Hires upscaler", str, _field("hr_upscaler"), tab="txt2img", confirm=_confirm_upscalers,
         format=_format_name, choices=lambda: list(_upscalers())),
    Axis("Cond. Image Mask Weight", float, None, tab="img2img"),
    Axis("VAE", str, _vae, confirm=_confirm_vae, format=_format_name, cost=0.7, choices=lambda: _names("vaes")),
    Axis("Styles", str, _styles, confirm=_confirm_styles, format=_format_name, choices=lambda: _names("styles")),
    Axis("UniPC Order", int, None, cost=0.5),
    Axis("Face restore", str, None),
    Axis("Token merging ratio", float, None),
    Axis("Token merging ratio high-res", float, None),
    Axis("Always discard next-to-last sigma", str, None),
    Axis("SGM noise multiplier", str, None),
    Axis("Refiner checkpoint", str, None, cost=1.0),
    Axis("Refiner switch at", float, None),
    Axis("RNG source", str, None),
    Axis("FP8 mode", str, None, cost=0.9),
    Axis("Size", str, _size, format=_format_name),
]


def axes_for(is_img2img: bool) -> list[Axis]:
    """The tab's axis list, in A1111's order (its indices are what `x_type` etc. count)."""
    tab = "img2img" if is_img2img else "txt2img"
    return [a for a in AXES if a.tab in (None, tab)]


def find_axis(axes: list[Axis], value) -> Axis:
    """An axis by index (A1111's API sends indices) or by label (case-insensitive)."""
    if isinstance(value, bool):
        raise AxisError(f"axis type must be an index or a label, got {value!r}")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        i = int(value)
        if not 0 <= i < len(axes):
            raise AxisError(f"axis type index {i} is out of range (0..{len(axes) - 1})")
        return axes[i]
    if isinstance(value, float) and value.is_integer():
        return find_axis(axes, int(value))
    wanted = str(value).strip().lower()
    for axis in axes:
        if axis.label.lower() == wanted:
            return axis
    raise AxisError(f"unknown axis type {value!r} (axes: {', '.join(a.label for a in axes)})")


RE_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
RE_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*\])\s*")
RE_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*\])\s*")
MAX_VALUES = 1000


def split_values(text: str, csv_mode: bool = False) -> list[str]:
    """A comma-separated list (quotes keep commas inside a value, as in A1111's CSV reading)."""
    text = str(text or "")
    if not text.strip():
        return []
    row = next(csv.reader(io.StringIO(text), skipinitialspace=True), [])
    return [v.strip() for v in row if v.strip() != ""]


def _num(text: str) -> str:
    return text.replace(" ", "")


def parse_values(axis: Axis, values_text: str, dropdown: list | None = None, csv_mode: bool = False) -> list:
    """The values of an axis from its text (or, for a choices axis in dropdown mode, the dropdown's list)."""
    if axis.label == "Nothing":
        return [""]
    if axis.apply is None:
        raise AxisError(f"X/Y/Z plot axis {axis.label!r} is not available in this studio")
    if axis.choices is not None and dropdown:
        raw = [str(v) for v in dropdown]
    else:
        raw = split_values(values_text, csv_mode)
    if not raw:
        raise AxisError(f"{axis.label}: no values given")
    out: list[Any] = []
    if axis.type is int:
        for v in raw:
            m, mc = RE_INT_RANGE.fullmatch(v), RE_INT_COUNT.fullmatch(v)
            if m is not None:
                start, end = int(_num(m.group(1))), int(_num(m.group(2))) + 1
                step = int(m.group(3)) if m.group(3) is not None else 1
                out += list(range(start, end, step))
            elif mc is not None:
                start, end, num = int(_num(mc.group(1))), int(_num(mc.group(2))), int(mc.group(3))
                out += [int(x) for x in np.linspace(start, end, num).tolist()]
            else:
                out.append(v)
    elif axis.type is float:
        for v in raw:
            m, mc = RE_FLOAT_RANGE.fullmatch(v), RE_FLOAT_COUNT.fullmatch(v)
            if mc is not None:
                start, end, num = float(_num(mc.group(1))), float(_num(mc.group(2))), int(float(mc.group(3)))
                out += np.linspace(start, end, num).tolist()
            elif m is not None:
                start, end = float(_num(m.group(1))), float(_num(m.group(2)))
                step = float(m.group(3)) if m.group(3) is not None else 1.0
                out += np.arange(start, end + step, step).tolist()
            else:
                out.append(v)
    elif axis.type == PERMUTATIONS:
        out = [list(perm) for perm in itertools.permutations(raw)]
    else:
        out = raw
    if len(out) > MAX_VALUES:
        raise AxisError(f"{axis.label}: {len(out)} values, at most {MAX_VALUES}")
    if axis.type in (int, float):
        try:
            out = [axis.type(x) for x in out]
        except (TypeError, ValueError):
            bad = next(x for x in out if not _castable(axis.type, x))
            raise AxisError(f"{axis.label}: {bad!r} is not a {'whole number' if axis.type is int else 'number'}") \
                from None
        if axis.type is float:
            out = [round(x, 8) for x in out]
    if not out:
        raise AxisError(f"{axis.label}: the range {values_text!r} has no values")
    return out


def _castable(t, x) -> bool:
    try:
        t(x)
        return True
    except (TypeError, ValueError):
        return False


def legend(p, axis: Axis, value) -> str:
    fmt = axis.format or _format_value
    return fmt(p, axis, value)
