"""A1111's `modules.processing` for scripts and extensions: `process_images(p)`, `Processed(...)`,
`StableDiffusionProcessing`, `StableDiffusionProcessingTxt2Img`, `StableDiffusionProcessingImg2Img`, `fix_seed`.

`process_images(p)` makes the request `p` as a script left it (its fields changed, `p.prompt` or `p.seed` made
lists, `p.override_settings` set): a fresh processing object is built from those fields, validated, and run on
the same job and thread. The processing classes import torch, so they load on first use.
"""
from __future__ import annotations

import importlib
import random

from modules.generation.results import GenerationResult
from modules.generation.results import processed as Processed  # noqa: N812  (A1111's class name)

__all__ = ["GenerationResult", "Processed", "process_images", "fix_seed", "get_fixed_seed"]

_LAZY = {
    "StableDiffusionProcessing": ("modules.generation.processing", "Processing"),
    "StableDiffusionProcessingTxt2Img": ("modules.generation.txt2img", "Txt2ImgProcessing"),
    "StableDiffusionProcessingImg2Img": ("modules.generation.img2img", "Img2ImgProcessing"),
}


def process_images(p) -> GenerationResult:
    """Run `p` with its fields as they are now (A1111's process_images)."""
    from modules import shared
    from modules.generation.processing import process_images as run
    fresh = p.derive()
    with shared.request_scope(fresh.settings, fresh.job):
        return run(fresh)


def get_fixed_seed(seed) -> int:
    if seed is None or seed == "" or seed == -1:
        return int(random.randrange(4294967294))
    return int(seed)


def fix_seed(p) -> None:
    """Pick the random seeds now (a script making several requests wants one seed for all of them)."""
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def copy_processing(p):
    """A copy of `p` a script may change without touching `p` (its settings, styles and infotext entries are
    copied, not shared): A1111's `copy.copy(p)` with the shared lists split."""
    import copy
    pc = copy.copy(p)
    pc.override_settings = dict(p.override_settings)
    pc.styles = list(p.styles)
    pc.extra_generation_params = dict(p.extra_generation_params)
    return pc
