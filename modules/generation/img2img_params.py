"""An img2img/inpaint request (A1111's fields), its option names and validation (no torch: UI and API import it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from modules.generation.params import GenerationError, Txt2ImgRequest
from modules.generation.params import validate as validate_txt2img

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")
MAX_MASK_BLUR = 64
MAX_PADDING = 256
MAX_INIT_SIDE = 8192  # an init image or mask larger than this on a side is refused (decoding caps pixels too)


@dataclass
class Img2ImgRequest(Txt2ImgRequest):
    """One img2img job. `init_images` and `mask` are PIL images (decoded by the caller)."""
    init_images: list = field(default_factory=list)
    mask: Any = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = 1.0
    include_init_images: bool = False
    script_name: str | None = None
    script_args: list = field(default_factory=list)


def validate_img2img(req: Img2ImgRequest) -> Img2ImgRequest:
    """Range-check an img2img request (the txt2img checks plus the image and mask options)."""
    problems = []
    if not req.init_images:
        problems.append("init_images: at least one init image is needed")
    for i, image in enumerate(req.init_images):
        if not hasattr(image, "size"):
            problems.append(f"init_images[{i}] is not an image")
        elif max(image.size) > MAX_INIT_SIDE or min(image.size) < 1:
            problems.append(f"init_images[{i}] is {image.size[0]}x{image.size[1]}: sides must be 1..{MAX_INIT_SIDE}")
    if req.mask is not None:
        if not hasattr(req.mask, "size"):
            problems.append("mask is not an image")
        elif max(req.mask.size) > MAX_INIT_SIDE:
            problems.append(f"mask is {req.mask.size[0]}x{req.mask.size[1]}: sides must be at most {MAX_INIT_SIDE}")
    d = req.denoising_strength
    if d is None or not 0 <= d <= 1:
        problems.append(f"denoising_strength must be between 0 and 1, got {d}")
    if req.resize_mode not in range(len(RESIZE_MODES)):
        problems.append(f"resize_mode must be 0..3 ({', '.join(RESIZE_MODES)}), got {req.resize_mode}")
    if req.inpainting_fill not in range(len(MASKED_CONTENT)):
        problems.append(f"inpainting_fill must be 0..3 ({', '.join(MASKED_CONTENT)}), got {req.inpainting_fill}")
    if req.inpainting_mask_invert not in (0, 1):
        problems.append(f"inpainting_mask_invert must be 0 or 1, got {req.inpainting_mask_invert}")
    for name in ("mask_blur_x", "mask_blur_y"):
        if not 0 <= getattr(req, name) <= MAX_MASK_BLUR:
            problems.append(f"{name} must be between 0 and {MAX_MASK_BLUR}, got {getattr(req, name)}")
    if not 0 <= req.inpaint_full_res_padding <= MAX_PADDING:
        problems.append(f"inpaint_full_res_padding must be between 0 and {MAX_PADDING}, got {req.inpaint_full_res_padding}")
    if not 0 <= req.initial_noise_multiplier <= 2:
        problems.append(f"initial_noise_multiplier must be between 0 and 2, got {req.initial_noise_multiplier}")
    error_type = GenerationError
    try:
        # the shared checks (size, steps, sampler, seeds); hires fix does not apply to img2img
        base = validate_txt2img(dataclasses.replace(req, enable_hr=False, denoising_strength=None))
    except GenerationError as e:
        problems.append(str(e))
        error_type = type(e)  # an unknown sampler stays an UnknownNameError
        base = None
    if problems:
        raise error_type("; ".join(problems))
    return dataclasses.replace(req, sampler_name=base.sampler_name, scheduler=base.scheduler, enable_hr=False)
