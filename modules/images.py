"""A1111's `modules.images` for scripts and extensions: `save_image`, `image_grid`, `GridAnnotation`,
`draw_grid_annotations`, `draw_prompt_matrix`, over the studio's own outputs and grids code."""
from __future__ import annotations

from pathlib import Path

from modules.core import outputs
from modules.core.grids import (  # noqa: F401
    GridAnnotation,
    draw_grid_annotations,
    draw_prompt_matrix,
)
from modules.core.grids import image_grid as _grid


def image_grid(imgs, batch_size: int = 1, rows: int | None = None):
    """A1111's grid: `rows` rows (else about square for the batch size)."""
    if rows is None:
        rows = max(1, int(len(imgs) ** 0.5)) if batch_size == 1 else batch_size
        rows = min(rows, len(imgs))
    return _grid(imgs, rows=rows)


def save_image(image, path, basename: str = "", seed=None, prompt=None, extension: str = "png", info=None,
               short_filename: bool = False, no_prompt: bool = False, grid: bool = False,
               pnginfo_section_name: str = "parameters", p=None, existing_info=None, forced_filename=None,
               suffix: str = "", save_to_dirs=None):
    """Save with the studio's naming (NNNNN-seed-prompt.ext, written atomically, never over a file); returns
    (path, None) as A1111 returns (image path, text file path)."""
    folder = Path(path)
    if forced_filename:
        saved = outputs.save_image_named(image, folder, forced_filename, infotext=info, extension=extension)
    else:
        saved = outputs.save_image(image, folder, seed=seed if seed is not None else "",
                                   prompt="" if no_prompt else (prompt or basename or ""), infotext=info,
                                   extension=extension)
    return str(saved), None
