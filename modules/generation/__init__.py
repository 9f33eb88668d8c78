"""Generation: txt2img, img2img and inpainting, from a request to images, infotexts and saved files.

This is the service's public face (`from modules import generation`). The request side (`params`,
`img2img_params`: dataclasses, limits, validation) is torch-free and imported at once, for the UI and the API at
start-up; the work (`processing`: the one loop and its hooks; `txt2img`, `img2img`, `hires`, `sampling`,
`leases`, `images`, `outpainting`) imports torch, so its names load on first use.
"""
from __future__ import annotations

import importlib

from modules.generation.img2img_params import (  # noqa: F401
    INPAINT_AREAS,
    MASK_MODES,
    MASKED_CONTENT,
    RESIZE_MODES,
    Img2ImgRequest,
    validate_img2img,
)
from modules.generation.params import (  # noqa: F401
    HIRES_UPSCALERS,
    LATENT_UPSCALE_MODES,
    MAX_SIZE,
    MIN_SIZE,
    PIXEL_UPSCALERS,
    GenerationError,
    Txt2ImgRequest,
    UnknownNameError,
    hires_target_size,
    validate,
)
from modules.generation.results import (  # noqa: F401
    GenerationResult,
    ImageSaveParams,
    PostprocessImageArgs,
    processed,
)

_LAZY = {
    "GenerationContext": "processing", "Processing": "processing",
    "HOOKS": "processing", "process_images": "processing",
    "local_context": "processing",
    "Txt2ImgProcessing": "txt2img", "run_txt2img": "txt2img",
    "Img2ImgProcessing": "img2img", "run_img2img": "img2img", "run_img2img_batch": "img2img",
    "BatchFolders": "img2img", "prepare_images": "img2img",
    "ComparisonRequest": "comparison", "run_comparison": "comparison",
    "hires_schedule": "hires", "make_noise": "sampling", "slerp": "sampling", "decode_latents": "sampling",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
