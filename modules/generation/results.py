"""What a generation gives back and what its hooks and callbacks are handed (torch-free, so scripts can import
these names at start-up): `GenerationResult` (A1111's `Processed`), `PostprocessImageArgs`, `ImageSaveParams`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class GenerationResult:
    images: list  # PIL images (grid first when one was made and return_grid is on)
    infotexts: list[str]
    info: dict
    paths: list[Path]
    grid_count: int = 0
    samples: list | None = None  # float images (H x W x 3 in [0, 1]) when the run was asked to keep them

    # A1111's Processed attributes, read from `info`
    @property
    def index_of_first_image(self) -> int:
        return self.grid_count

    @property
    def seed(self):
        return self.info.get("seed")

    @property
    def all_seeds(self) -> list:
        return self.info.get("all_seeds", [])

    @property
    def subseed(self):
        return self.info.get("subseed")

    @property
    def all_subseeds(self) -> list:
        return self.info.get("all_subseeds", [])

    @property
    def prompt(self):
        return self.info.get("prompt")

    @property
    def all_prompts(self) -> list:
        return self.info.get("all_prompts", [])

    @property
    def negative_prompt(self):
        return self.info.get("negative_prompt")

    @property
    def all_negative_prompts(self) -> list:
        return self.info.get("all_negative_prompts", [])

    @property
    def width(self):
        return self.info.get("width")

    @property
    def height(self):
        return self.info.get("height")

    def js(self) -> str:
        return json.dumps(self.info, default=str)


def processed(p, images: list, seed: Any = -1, info: str = "", subseed: Any = None, all_prompts=None,
              all_negative_prompts=None, all_seeds=None, all_subseeds=None, index_of_first_image: int = 0,
              infotexts=None, comments: str = "", extra_images_list=None, paths=None) -> GenerationResult:
    """A1111's `Processed(p, images, seed, info, ...)`: a script's own answer (an X/Y/Z grid and its cells), with
    the request's `info` for whatever the script does not say."""
    images = list(images or []) + list(extra_images_list or [])
    infotexts = list(infotexts) if infotexts is not None else [info] * len(images)
    base = p.info(index_of_first_image) if hasattr(p, "info") else {}
    base = dict(base, infotexts=infotexts, index_of_first_image=index_of_first_image)
    for key, value in (("seed", seed), ("subseed", subseed), ("all_prompts", all_prompts),
                       ("all_negative_prompts", all_negative_prompts), ("all_seeds", all_seeds),
                       ("all_subseeds", all_subseeds)):
        if value is not None and value != -1:
            base[key] = value
    if comments:
        base["comments"] = comments
    return GenerationResult(images=images, infotexts=infotexts, info=base, paths=list(paths or []),
                            grid_count=index_of_first_image)


@dataclass
class PostprocessImageArgs:
    """What `postprocess_image` hooks get (A1111's name): they may replace `image`."""
    image: Any


@dataclass
class ImageSaveParams:
    """What A1111's `on_before_image_saved` / `on_image_saved` callbacks get: they may change `image` and
    `pnginfo` before the file is written; `filename` is the folder before saving and the file after."""
    image: Any
    p: Any
    filename: str
    pnginfo: dict
