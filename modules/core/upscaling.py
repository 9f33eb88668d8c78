"""The extras service: resizing images with A1111's pixel upscalers ("None", "Lanczos", "Nearest"; PIL only).

A1111's rules, kept so results match: an upscaler resizes by its factor and then to the target size
rounded down to a multiple of 8 (Lanczos); "resize to" upscales by the larger of the two ratios and, with
crop, centres the result on a canvas of exactly the asked size; a second upscaler is blended in with its
visibility. Model upscalers (ESRGAN and friends) are not here yet; their names are refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_OUTPUT_SIDE = 8192
MAX_SCALE = 8.0


class ExtrasError(ValueError):
    """An extras request that cannot be run as given."""


class UnknownUpscalerError(ExtrasError):
    """An extras request naming an upscaler that does not exist (with any other problems of the request)."""


@dataclass(frozen=True)
class ExtrasParams:
    resize_mode: int = 0  # 0: scale by upscaling_resize, 1: to upscaling_resize_w x upscaling_resize_h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0


def upscaler_list() -> list[dict]:
    """/sdapi/v1/upscalers, in A1111's shape."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in UPSCALERS]


def upscale(image: Image.Image, scale: float, name: str) -> Image.Image:
    """One upscaler by `scale`, as A1111's Upscaler.upscale does for its PIL upscalers."""
    resample = UPSCALERS[name]
    dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    if resample is not None:
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if (image.width, image.height) != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def validate(params: ExtrasParams) -> None:
    problems = []
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(params, field)
        if name not in UPSCALERS:
            problems.append(f"{field}: unknown upscaler {name!r} (available: {', '.join(UPSCALERS)})")
    unknown = bool(problems)
    if params.resize_mode not in (0, 1):
        problems.append(f"resize_mode must be 0 (scale by) or 1 (scale to), got {params.resize_mode}")
    elif params.resize_mode == 0 and not 0 < params.upscaling_resize <= MAX_SCALE:
        problems.append(f"upscaling_resize must be in (0, {MAX_SCALE:g}], got {params.upscaling_resize}")
    elif params.resize_mode == 1:
        for field in ("upscaling_resize_w", "upscaling_resize_h"):
            v = getattr(params, field)
            if not 8 <= v <= MAX_OUTPUT_SIDE:
                problems.append(f"{field} must be between 8 and {MAX_OUTPUT_SIDE}, got {v}")
    if not 0 <= params.extras_upscaler_2_visibility <= 1:
        problems.append("extras_upscaler_2_visibility must be between 0 and 1")
    if problems:
        raise (UnknownUpscalerError if unknown else ExtrasError)("; ".join(problems))


def run(image: Image.Image, params: ExtrasParams) -> Image.Image:
    """Upscale one image as A1111's extras tab does (no face restoration: none is installed)."""
    validate(params)
    if params.upscaler_1 == "None":
        return image  # A1111: no first upscaler means no upscaling at all
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    if params.resize_mode == 1:
        scale = max(params.upscaling_resize_w / image.width, params.upscaling_resize_h / image.height)
    else:
        scale = params.upscaling_resize
    out_w, out_h = int(image.width * scale), int(image.height * scale)
    if max(out_w, out_h) > MAX_OUTPUT_SIDE or min(out_w, out_h) < 8:
        raise ExtrasError(f"the result would be {out_w}x{out_h}; each side must be between 8 and {MAX_OUTPUT_SIDE}")
    result = _scaled(image, scale, params.upscaler_1, params)
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        second = _scaled(image, scale, params.upscaler_2, params)
        if second.size != result.size:
            second = second.resize(result.size)
        if second.mode != result.mode:
            second = second.convert(result.mode)
        result = Image.blend(result, second, params.extras_upscaler_2_visibility)
    return result


def _scaled(image: Image.Image, scale: float, name: str, params: ExtrasParams) -> Image.Image:
    out = upscale(image, scale, name)
    if params.resize_mode == 1 and params.upscaling_crop:
        w, h = params.upscaling_resize_w, params.upscaling_resize_h
        canvas = Image.new(out.mode, (w, h))
        canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
    return out
