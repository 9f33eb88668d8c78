"""A txt2img request as a plain dataclass, its limits and validation (no torch: UI and API import it at start-up)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from modules.core import samplers

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 500
MAX_BATCH_SIZE = 64
MAX_BATCH_COUNT = 100
MAX_IMAGES = 1000
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = {"None": None, "Lanczos": "LANCZOS", "Nearest": "NEAREST"}
HIRES_UPSCALERS = tuple(LATENT_UPSCALE_MODES) + tuple(PIXEL_UPSCALERS)  # and the server's model upscalers


class GenerationError(ValueError):
    """A request that cannot be run as given (the caller's mistake: shown as a 4xx / a UI notice)."""


class UnknownNameError(GenerationError):
    """A request naming a sampler, schedule type or upscaler that does not exist (A1111 answers 400); the
    message lists the request's other problems too."""


@dataclass
class Txt2ImgRequest:
    """One txt2img job, immutable once submitted; field names and defaults follow A1111's API."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str = samplers.DEFAULT_API_SAMPLER
    scheduler: str = "Automatic"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    # Forge's "Distilled CFG Scale": the guidance FLUX.1-dev was distilled to take as an input (CFG Scale then
    # turns on real classifier-free guidance with the negative prompt when above 1); other models ignore it
    distilled_cfg_scale: float = 3.5
    width: int = 512
    height: int = 512
    eta: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    denoising_strength: float | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    save_images: bool = True
    # the server's upscalers (`model_store.upscalers.Upscalers`), through which a model hr_upscaler (ESRGAN, ...)
    # runs; set by validate(req, upscalers=...)
    upscalers: Any = field(default=None, repr=False, compare=False)


def hires_target_size(req: Txt2ImgRequest) -> tuple[int, int]:
    """A1111's hires target: explicit resize (keeping aspect when one side is 0) or scale."""
    if req.hr_resize_x or req.hr_resize_y:
        if req.hr_resize_x and req.hr_resize_y:
            w, h = req.hr_resize_x, req.hr_resize_y
        elif req.hr_resize_x:
            w, h = req.hr_resize_x, req.hr_resize_x * req.height / req.width
        else:
            w, h = req.hr_resize_y * req.width / req.height, req.hr_resize_y
    else:
        w, h = req.width * req.hr_scale, req.height * req.hr_scale
    return int(w) // 8 * 8, int(h) // 8 * 8


def validate(req: Txt2ImgRequest, upscalers=None) -> Txt2ImgRequest:
    """Range-check a request and resolve its sampler names; raises GenerationError with every problem
    (UnknownNameError when one of them is a name that does not exist). `upscalers` (the server's, else the
    request's own) make the model upscalers' names valid hr_upscalers."""
    problems = []
    unknown = False
    if not 1 <= req.steps <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}")
    for name in ("width", "height"):
        v = getattr(req, name)
        if not MIN_SIZE <= v <= MAX_SIZE:
            problems.append(f"{name} must be between {MIN_SIZE} and {MAX_SIZE}, got {v}")
        elif v % 8:
            problems.append(f"{name} must be a multiple of 8, got {v}")
    if not 1 <= req.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {req.batch_size}")
    if not 1 <= req.n_iter <= MAX_BATCH_COUNT:
        problems.append(f"n_iter (batch count) must be between 1 and {MAX_BATCH_COUNT}, got {req.n_iter}")
    if req.batch_size * req.n_iter > MAX_IMAGES:
        problems.append(f"at most {MAX_IMAGES} images per request")
    if not 0 <= req.cfg_scale <= 100 or math.isnan(req.cfg_scale):
        problems.append(f"cfg_scale must be between 0 and 100, got {req.cfg_scale}")
    if not 0 <= req.distilled_cfg_scale <= 30 or math.isnan(req.distilled_cfg_scale):
        problems.append(f"distilled_cfg_scale must be between 0 and 30, got {req.distilled_cfg_scale}")
    if not 0 <= req.subseed_strength <= 1:
        problems.append(f"subseed_strength must be between 0 and 1, got {req.subseed_strength}")
    if req.seed < -1 or req.seed >= 2**32 or req.subseed < -1 or req.subseed >= 2**32:
        problems.append("seed and subseed must be -1 (random) or between 0 and 4294967295")
    if req.eta is not None and not 0 <= req.eta <= 1:
        problems.append(f"eta must be between 0 and 1, got {req.eta}")
    try:
        sampler, schedule = samplers.resolve(req.sampler_name, req.scheduler, default=samplers.DEFAULT_API_SAMPLER)
        hr_sampler, hr_schedule = sampler, schedule
        if req.hr_sampler_name and req.hr_sampler_name != "Use same sampler":
            hr_sampler, hr_schedule = samplers.resolve(req.hr_sampler_name, req.hr_scheduler or schedule,
                                                       default=sampler)
        samplers.scheduler_overrides(sampler, schedule)  # pairs diffusers cannot build fail here, with a 4xx
        samplers.scheduler_overrides(hr_sampler, hr_schedule)
    except samplers.UnknownSamplerError as e:
        problems.append(str(e))
        unknown = True
        sampler = schedule = hr_sampler = hr_schedule = None
    upscalers = upscalers if upscalers is not None else req.upscalers
    if req.enable_hr:
        if req.hr_upscaler not in HIRES_UPSCALERS:
            if upscalers is None or not upscalers.has(req.hr_upscaler):
                names = list(HIRES_UPSCALERS) + (upscalers.model_names() if upscalers is not None else [])
                problems.append(f"hr_upscaler must be one of {names}, got {req.hr_upscaler!r}")
                unknown = True
            elif problem := upscalers.problem(req.hr_upscaler):
                problems.append(f"hr_upscaler: {problem}")
        if not 1 <= req.hr_scale <= 4 and not (req.hr_resize_x or req.hr_resize_y):
            problems.append(f"hr_scale must be between 1 and 4, got {req.hr_scale}")
        if not 0 <= req.hr_second_pass_steps <= MAX_STEPS:
            problems.append(f"hr_second_pass_steps must be between 0 and {MAX_STEPS}")
        if req.denoising_strength is not None and not 0 <= req.denoising_strength <= 1:
            problems.append(f"denoising_strength must be between 0 and 1 (0: upscale only), got "
                            f"{req.denoising_strength}")
        if req.width > 0 and req.height > 0 and req.hr_resize_x >= 0 and req.hr_resize_y >= 0:
            w, h = hires_target_size(req)  # needs a valid first-pass size (reported above when not)
            if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE):
                problems.append(f"hires size {w}x{h} is outside {MIN_SIZE}..{MAX_SIZE}")
        else:
            problems.append("hires fix needs a first-pass width and height, and hr_resize_x/y of 0 or more")
    if problems:
        raise (UnknownNameError if unknown else GenerationError)("; ".join(problems))
    return dataclasses.replace(req, sampler_name=sampler, scheduler=schedule,
                               hr_sampler_name=hr_sampler, hr_scheduler=hr_schedule, upscalers=upscalers)


