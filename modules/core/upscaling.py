"""The extras service: A1111's Extras tab (and /extra-single-image, /extra-batch-images) over the upscalers.

A1111's rules, kept so results match: an upscaler resizes by its factor and then to the target size
rounded down to a multiple of 8 (Lanczos); "resize to" upscales by the larger of the two ratios and, with
crop, centres the result on a canvas of exactly the asked size; a second upscaler is blended in with its
visibility; the infotext says "Postprocess upscale by: 2, Postprocess upscaler: Lanczos" (PNG chunk `extras`
of a saved file, `postprocessing` of an API answer; the source image's own `parameters` are kept).

The PIL upscalers ("None", "Lanczos", "Nearest") are here; model upscalers (ESRGAN, Real-ESRGAN) come from an
`upscalers` object handed in (`modules.model_store.upscalers.Upscalers`, the server's one): anything with
`names()`, `has(name)`, `problem(name)` and `upscale_image(image, name, scale, job=...)`. Without one, only the
PIL upscalers exist. No torch here.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_OUTPUT_SIDE = 8192
MAX_SCALE = 8.0
EXTRAS_FOLDER = "extras-images"  # A1111's outdir_extras_samples, under the outputs folder


class ExtrasError(ValueError):
    """An extras request that cannot be run as given."""


class UnknownUpscalerError(ExtrasError):
    """An extras request naming an upscaler that does not exist (with any other problems of the request)."""


class UpscalerUnavailableError(ExtrasError):
    """A listed upscaler that cannot be used: an architecture this project does not load (SwinIR, DAT), or a
    file that does not read as an upscaler."""


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


@dataclass
class ExtrasResult:
    images: list  # PIL images, one per input
    infotexts: list[str]  # "Postprocess upscale by: 2, Postprocess upscaler: Lanczos", per image
    paths: list[Path] = field(default_factory=list)  # the saved files (none when nothing was saved)

    @property
    def html_info(self) -> str:
        """A1111's `html_info`: the last image's infotext as HTML."""
        return plaintext_to_html(self.infotexts[-1] if self.infotexts else "")


@dataclass(frozen=True)
class SaveTarget:
    """Where and how an extras job saves its images (the UI saves, the API does not, as in A1111)."""
    folder: Path  # outputs/extras-images, the outdir_samples setting, or a batch's output folder
    extension: str = "png"
    jpeg_quality: int = 80
    pnginfo: bool = True  # the enable_pnginfo setting
    keep_names: bool = False  # batch from directory: each result is named after its input file


def plaintext_to_html(text: str) -> str:
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>" if text else ""


def upscaler_list() -> list[dict]:
    """/sdapi/v1/upscalers, in A1111's shape, for the PIL upscalers alone (see Upscalers.api_list)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in UPSCALERS]


def upscale(image: Image.Image, scale: float, name: str) -> Image.Image:
    """One PIL upscaler by `scale`, as A1111's Upscaler.upscale does for its PIL upscalers."""
    resample = UPSCALERS[name]
    dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    if resample is not None:
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if (image.width, image.height) != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def known_names(upscalers=None) -> list[str]:
    return list(upscalers.names()) if upscalers is not None else list(UPSCALERS)


def validate(params: ExtrasParams, upscalers=None) -> None:
    """Every problem of `params` at once: UnknownUpscalerError when a name is unknown, UpscalerUnavailableError
    when a named upscaler cannot be used, ExtrasError for the rest."""
    problems = []
    unknown = unavailable = False
    for fld in ("upscaler_1", "upscaler_2"):
        name = getattr(params, fld)
        if name in UPSCALERS:
            continue
        if upscalers is None or not upscalers.has(name):
            problems.append(f"{fld}: unknown upscaler {name!r} (available: {', '.join(known_names(upscalers))})")
            unknown = True
            continue
        if fld == "upscaler_2" and params.extras_upscaler_2_visibility <= 0:
            continue  # not used: a second upscaler that cannot load does not matter at visibility 0
        problem = upscalers.problem(name)
        if problem:
            problems.append(f"{fld}: {problem}")
            unavailable = True
    if params.resize_mode not in (0, 1):
        problems.append(f"resize_mode must be 0 (scale by) or 1 (scale to), got {params.resize_mode}")
    elif params.resize_mode == 0 and not 0 < params.upscaling_resize <= MAX_SCALE:
        problems.append(f"upscaling_resize must be in (0, {MAX_SCALE:g}], got {params.upscaling_resize}")
    elif params.resize_mode == 1:
        for fld in ("upscaling_resize_w", "upscaling_resize_h"):
            v = getattr(params, fld)
            if not 8 <= v <= MAX_OUTPUT_SIDE:
                problems.append(f"{fld} must be between 8 and {MAX_OUTPUT_SIDE}, got {v}")
    if not 0 <= params.extras_upscaler_2_visibility <= 1:
        problems.append("extras_upscaler_2_visibility must be between 0 and 1")
    if problems:
        kind = UnknownUpscalerError if unknown else UpscalerUnavailableError if unavailable else ExtrasError
        raise kind("; ".join(problems))


def _scale_of(image: Image.Image, params: ExtrasParams) -> float:
    if params.resize_mode == 1:
        return max(params.upscaling_resize_w / image.width, params.upscaling_resize_h / image.height)
    return params.upscaling_resize


def check_size(image: Image.Image, params: ExtrasParams) -> None:
    """The result's size is within limits (checked before any work, so a batch fails before its first image)."""
    if params.upscaler_1 == "None":
        return
    scale = _scale_of(image, params)
    out_w, out_h = int(image.width * scale), int(image.height * scale)
    if max(out_w, out_h) > MAX_OUTPUT_SIDE or min(out_w, out_h) < 8:
        raise ExtrasError(f"the result would be {out_w}x{out_h}; each side must be between 8 and {MAX_OUTPUT_SIDE}")


def postprocess_info(image: Image.Image, params: ExtrasParams) -> dict[str, Any]:
    """A1111's postprocessing infotext fields for one image (empty when nothing is upscaled)."""
    if params.upscaler_1 == "None":
        return {}
    info: dict[str, Any] = {}
    if params.resize_mode == 1:
        info["Postprocess upscale to"] = f"{params.upscaling_resize_w}x{params.upscaling_resize_h}"
    else:  # 2, not 2.0, as A1111's UI writes it
        by = params.upscaling_resize
        info["Postprocess upscale by"] = int(by) if float(by).is_integer() else by
    if params.resize_mode == 1 and params.upscaling_crop:
        info["Postprocess crop to fit"] = True
    info["Postprocess upscaler"] = params.upscaler_1
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        info["Postprocess upscaler 2"] = params.upscaler_2
    return info


def infotext_of(info: Mapping[str, Any]) -> str:
    from modules.core.infotext import format_value, quote
    return ", ".join(f"{k}: {quote(format_value(v))}" for k, v in info.items() if v is not None)


def run(image: Image.Image, params: ExtrasParams, upscalers=None, job=None) -> Image.Image:
    """Upscale one image as A1111's extras tab does (no face restoration: none is installed)."""
    validate(params, upscalers)
    if params.upscaler_1 == "None":
        return image  # A1111: no first upscaler means no upscaling at all
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    check_size(image, params)
    scale = _scale_of(image, params)
    result = _scaled(image, scale, params.upscaler_1, params, upscalers, job)
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        second = _scaled(image, scale, params.upscaler_2, params, upscalers, job)
        if second.size != result.size:
            second = second.resize(result.size)
        if second.mode != result.mode:
            second = second.convert(result.mode)
        result = Image.blend(result, second, params.extras_upscaler_2_visibility)
    return result


def _scaled(image, scale, name, params, upscalers, job):
    if name in UPSCALERS:
        out = upscale(image, scale, name)
    else:
        out = upscalers.upscale_image(image, name, scale, job=job)
    if params.resize_mode == 1 and params.upscaling_crop:
        w, h = params.upscaling_resize_w, params.upscaling_resize_h
        canvas = Image.new(out.mode, (w, h))
        canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
    return out


def open_image(source: Image.Image | str | Path) -> Image.Image:
    """A PIL image as it is, or an image file read whole (a folder's images are read one at a time)."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as im:
            im.load()
            return im
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ExtrasError(f"{Path(source).name} is not a readable image: {e}") from None


def image_size(source: Image.Image | str | Path) -> Image.Image:
    """An image with the source's size for the checks before queueing (a file's header only is read)."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as im:
            return Image.new("1", im.size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ExtrasError(f"{Path(source).name} is not a readable image: {e}") from None


def run_extras(images: Sequence[tuple[Image.Image | Path, str | None]], params: ExtrasParams, upscalers=None, *,
               save: SaveTarget | None = None, job=None, keep_images: bool = True) -> ExtrasResult:
    """The extras job: every (image or image file, file name or None) upscaled in turn (`job` gets one
    iteration per image, its tiles as steps, and may stop the batch), saved to `save` when given with the
    postprocessing infotext and the source image's own `parameters`. Without `keep_images` the results are
    only saved (a folder's worth of images need not fit in memory)."""
    validate(params, upscalers)
    for image, _name in images:
        check_size(image_size(image), params)
    result = ExtrasResult(images=[], infotexts=[])
    for i, (source, name) in enumerate(images):
        if job is not None:
            job.begin_iteration(i, len(images))
            job.textinfo = f"extras: image {i + 1} of {len(images)}"
        image = open_image(source)
        out = run(image, params, upscalers, job)
        text = infotext_of(postprocess_info(image, params))
        if keep_images:
            result.images.append(out)
        result.infotexts.append(text)
        if save is not None:
            result.paths.append(save_result(out, text, image, name, save))
    return result


def source_parameters(image: Image.Image) -> str | None:
    """The generation parameters the source image carried (kept in the saved result, as A1111 keeps them)."""
    from modules.core.infotext import read_image_infotext
    try:
        return read_image_infotext(image)
    except Exception:  # odd metadata must not fail the upscale
        return None


def result_chunks(text: str, source: Image.Image, section: str) -> tuple[str | None, dict[str, str]]:
    """(the `parameters` text, the other PNG text chunks) of a result: the source's own parameters, and the
    postprocessing text under `section` ("extras" in a saved file, "postprocessing" in an API answer)."""
    return source_parameters(source), ({section: text} if text else {})


def save_result(image: Image.Image, text: str, source: Image.Image, name: str | None, save: SaveTarget) -> Path:
    from modules.core import outputs
    extension = save.extension.lower().lstrip(".")
    parameters, chunks = result_chunks(text, source, "extras") if save.pnginfo else (None, {})
    if extension != "png":  # JPEG and WebP carry one comment: the postprocessing text, as A1111 writes it
        parameters, chunks = (text or None) if save.pnginfo else None, {}
    if save.keep_names and name:
        return outputs.save_image_named(image, save.folder, Path(name).stem, infotext=parameters,
                                        extension=extension, jpeg_quality=save.jpeg_quality, chunks=chunks)
    return outputs.save_image(image, save.folder, seed="", prompt="", infotext=parameters, extension=extension,
                              pattern="", jpeg_quality=save.jpeg_quality, chunks=chunks)
