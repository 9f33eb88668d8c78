"""Upscalers by A1111 name: the PIL ones ("None", "Lanczos", "Nearest") and one per model file of
models/ESRGAN, models/RealESRGAN, models/SwinIR and models/DAT (`.pth`, `.pt`, `.safetensors`), named by the
file's stem as A1111 names user files. They serve the Extras tab, /extra-single-image, /extra-batch-images and
hires fix alike (`Upscalers`, one per server: `webui.upscalers`).

ESRGAN and Real-ESRGAN files load with this project's own architectures (`upscaler_arch`: RRDBNet in every key
layout, SRVGGNetCompact). SwinIR and DAT files are listed, as A1111 lists them, but using one is an error that
says why: A1111 builds them with spandrel, and spandrel cannot be imported here (its package imports
torchvision, which cannot be installed beside this project's torch).

A model is leased from the model manager for each use (kind "upscaler", keyed by the file and its version), so
it shares the VRAM/RAM budgets with the checkpoints, and runs tiled on the compute device: tiles of the
`ESRGAN_tile` setting (input pixels; 0 = whole image) overlapping by `ESRGAN_tile_overlap`, blended across the
seams. Listing reads file names only (no torch): the scale shown before a file was loaded comes from its name.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image

from modules.core import upscaling
from modules.core.upscaling import (
    ExtrasError,
    UnknownUpscalerError,
    UpscalerUnavailableError,
)

log = logging.getLogger("webui.upscalers")

FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")  # under the models folder, as in A1111
LOADABLE_FOLDERS = ("ESRGAN", "RealESRGAN")
SUFFIXES = (".pth", ".pt", ".safetensors")
KIND = "upscaler"  # the model manager's kind for these models
DEFAULT_TILE, DEFAULT_OVERLAP = 192, 8  # A1111's ESRGAN_tile, ESRGAN_tile_overlap
MAX_INTERMEDIATE_SIDE = 2 * upscaling.MAX_OUTPUT_SIDE  # a 4x model pass may overshoot the target before Lanczos
WHY_NOT = {
    "SwinIR": "SwinIR models cannot be used here: A1111 builds them with spandrel, and spandrel's package imports "
              "torchvision, which cannot be installed beside this project's torch. Use an ESRGAN or Real-ESRGAN "
              "model (models/ESRGAN, models/RealESRGAN).",
    "DAT": "DAT models cannot be used here: A1111 builds them with spandrel, and spandrel's package imports "
           "torchvision, which cannot be installed beside this project's torch. Use an ESRGAN or Real-ESRGAN "
           "model (models/ESRGAN, models/RealESRGAN).",
}
# A1111's names for its built-in Real-ESRGAN / ESRGAN models: accepted for the file they stand for when that
# file is here (clients written for A1111 send them), never listed (files are listed by their own names).
A1111_NAMES = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "ESRGAN_4x": "ESRGAN_4x",
}
_RESERVED = set(upscaling.UPSCALERS) | {"Latent", "Latent (antialiased)", "Latent (bicubic)",
                                         "Latent (bicubic antialiased)", "Latent (nearest)",
                                         "Latent (nearest-exact)"}
_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(?:x([1-8])|([1-8])x)(?:[^a-z0-9]|plus|$)", re.IGNORECASE)


def scale_from_name(stem: str, default: int = 4) -> int:
    """The scale a file's name announces ("4x_foolhardy_Remacri", "RealESRGAN_x2plus"), else `default` (A1111
    lists every model upscaler with scale 4 until it is loaded)."""
    m = _SCALE_IN_NAME.search(stem)
    return int(m.group(1) or m.group(2)) if m else default


@dataclass(frozen=True)
class UpscalerInfo:
    """One model file: `name` (its stem, as A1111 names user files), `path`, `folder` ("ESRGAN", ...)."""
    name: str
    path: Path
    folder: str
    scale: int = 4

    @property
    def key(self) -> str:
        """The model manager's key: the file and its version (a replaced file loads anew)."""
        try:
            st = self.path.stat()
            version = f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            version = "missing"
        return f"{KIND}:{self.path}:{version}"

    @property
    def loadable(self) -> bool:
        return self.folder in LOADABLE_FOLDERS


class UpscalerRegistry:
    """The model files of the upscaler folders, rescanned on each listing (a few directory reads)."""

    def __init__(self, dirs: Mapping[str, Sequence[Path]]):
        self.dirs = {kind: [Path(d) for d in paths] for kind, paths in dirs.items()}
        self._lock = threading.Lock()
        self._failures: dict[str, str] = {}  # key -> why the file did not load (until it changes)
        self._scales: dict[str, int] = {}  # key -> the scale of the loaded network

    def list(self) -> list[UpscalerInfo]:
        found: dict[str, UpscalerInfo] = {}
        for kind in FOLDERS:
            for folder in self.dirs.get(kind, []):
                try:
                    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                                   and not p.name.startswith("."))
                except OSError:
                    continue
                for path in files:
                    name = path.stem
                    if name in _RESERVED:
                        log.warning("upscaler file %s is ignored: its name is a built-in upscaler's", path)
                        continue
                    if name in found:
                        log.warning("upscaler file %s is ignored: %s has the same name", path, found[name].path)
                        continue
                    info = UpscalerInfo(name, path, kind, scale_from_name(name))
                    scale = self._scales.get(info.key)
                    found[name] = UpscalerInfo(name, path, kind, scale) if scale else info
        return list(found.values())

    def find(self, name: str) -> UpscalerInfo | None:
        """A model upscaler by its name, or by A1111's name for a built-in model whose file is here."""
        by_name = {info.name: info for info in self.list()}
        return by_name.get(name) or by_name.get(A1111_NAMES.get(name, "\0"))

    def failure(self, info: UpscalerInfo) -> str | None:
        with self._lock:
            return self._failures.get(info.key)

    def remember(self, info: UpscalerInfo, *, scale: int | None = None, failure: str | None = None) -> None:
        with self._lock:
            if scale:
                self._scales[info.key] = scale
            if failure:
                self._failures[info.key] = failure


def read_state_dict(path: Path) -> dict:
    """The tensors of an upscaler file (safetensors, or a pickle read with weights_only: no code runs)."""
    import pickle

    import torch

    from modules.model_store.upscaler_arch import (
        UnsupportedArchError,
        unwrap_state_dict,
    )
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # torch names the class a refused pickle wanted to build
            raise  # not a pickle of tensors at all: "cannot be read"
        raise UnsupportedArchError("the file was refused: a pickle holding more than tensors (it could run code "
                                   "when loaded); convert it to .safetensors") from e
    return unwrap_state_dict(obj)


def load_upscaler(info: UpscalerInfo):
    """The network of a model file, on the CPU (eval mode), or UpscalerUnavailableError saying why not."""
    if not info.loadable:
        raise UpscalerUnavailableError(f"{info.name}: {WHY_NOT[info.folder]}")
    from modules.model_store.upscaler_arch import (
        UnsupportedArchError,
        describe,
        detect_and_build,
    )
    try:
        model = detect_and_build(read_state_dict(info.path))
    except UnsupportedArchError as e:
        raise UpscalerUnavailableError(f"{info.name} ({info.folder}/{info.path.name}) cannot be used: {e}") from None
    except Exception as e:  # unreadable or truncated files, safetensors errors
        raise UpscalerUnavailableError(f"{info.name} ({info.folder}/{info.path.name}) cannot be read: {e}") from None
    log.info("upscaler %s: %s", info.name, describe(model))
    return model


@contextlib.contextmanager
def use_upscaler(manager, info: UpscalerInfo, registry: UpscalerRegistry | None = None) -> Iterator[Any]:
    """Lease the upscaler's network from the model manager (loaded on first use) for the with-block. A file that
    fails to load is remembered by `registry`, so later requests are refused before they are queued."""
    def load():
        try:
            model = load_upscaler(info)
        except UpscalerUnavailableError as e:
            if registry is not None:
                registry.remember(info, failure=str(e))
            raise
        if registry is not None:
            registry.remember(info, scale=model.scale)
        return model

    with manager.use(info.key, load, kind=KIND, name=info.name) as model:
        yield model


def model_pass(model, image: Image.Image, *, tile: int, overlap: int, progress=None) -> Image.Image:
    """One pass of the network over a PIL image (RGB in [0, 1], tiled), back to a PIL image; an alpha channel
    is resized with Lanczos beside it, an L image stays L."""
    import numpy as np
    import torch

    from modules.model_store.upscaler_arch import tiled_forward
    mode = image.mode
    alpha = image.getchannel("A") if mode in ("RGBA", "LA") else None
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    param = next(model.parameters())
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        out = tiled_forward(model, x, tile, overlap, progress)
    arr = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    result = Image.fromarray(arr, "RGB")
    if alpha is not None:
        result = result.convert("RGBA")
        result.putalpha(alpha.resize(result.size, Image.Resampling.LANCZOS))
        return result if mode == "RGBA" else result.convert("LA")
    return result.convert("L") if mode == "L" else result


class Upscalers:
    """Every upscaler of a server by A1111 name, and the one way to use them (`upscale_image`).

    `manager()` gives the model manager (the server makes it on first use), `settings()` the settings in force
    (for `ESRGAN_tile` and `ESRGAN_tile_overlap`)."""

    def __init__(self, registry: UpscalerRegistry, manager: Callable[[], Any],
                 settings: Callable[[], Mapping[str, Any]] | None = None):
        self.registry = registry
        self._manager = manager
        self._settings = settings or (lambda: {})

    # -- names ---------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [info.name for info in self.registry.list()]

    def names(self) -> list[str]:
        """"None", "Lanczos", "Nearest", then one per model file: the Extras tab's and /upscalers' order."""
        return list(upscaling.UPSCALERS) + self.model_names()

    def has(self, name: str) -> bool:
        return name in upscaling.UPSCALERS or self.registry.find(name) is not None

    def find(self, name: str) -> UpscalerInfo:
        info = self.registry.find(name)
        if info is None:
            raise UnknownUpscalerError(f"unknown upscaler {name!r} (available: {', '.join(self.names())})")
        return info

    def problem(self, name: str) -> str | None:
        """Why a listed upscaler cannot be used (SwinIR/DAT, or a file that failed to load), else None."""
        info = self.registry.find(name)
        if info is None or name in upscaling.UPSCALERS:
            return None
        if not info.loadable:
            return f"{info.name}: {WHY_NOT[info.folder]}"
        return self.registry.failure(info)

    def api_list(self) -> list[dict[str, Any]]:
        """/sdapi/v1/upscalers in A1111's shape: name, model_name, model_path, model_url, scale."""
        items = upscaling.upscaler_list()
        for info in self.registry.list():
            items.append({"name": info.name, "model_name": info.folder, "model_path": str(info.path),
                          "model_url": None, "scale": info.scale})
        return items

    def realesrgan_list(self) -> list[dict[str, Any]]:
        """/sdapi/v1/realesrgan-models in A1111's shape (name, path, scale): the RealESRGAN folder's files."""
        return [{"name": info.name, "path": str(info.path), "scale": info.scale}
                for info in self.registry.list() if info.folder == "RealESRGAN"]

    # -- use -----------------------------------------------------------------------------------------------
    def tiling(self) -> tuple[int, int]:
        settings = self._settings()
        return (int(settings.get("ESRGAN_tile", DEFAULT_TILE)), int(settings.get("ESRGAN_tile_overlap", DEFAULT_OVERLAP)))

    def upscale_image(self, image: Image.Image, name: str, scale: float, *, job=None, tile: int | None = None,
                      overlap: int | None = None) -> Image.Image:
        """`image` upscaled by `scale` with upscaler `name`, as A1111's Upscaler.upscale: the target is the scaled
        size rounded down to a multiple of 8; a model runs (at most 3 times) until the image is at least that
        large, then Lanczos makes it exactly that. On the job worker only (it leases the model and uses the
        compute device); `job` gets each tile as a step and may stop it. Raises UnknownUpscalerError,
        UpscalerUnavailableError, ExtrasError (a result too large)."""
        if name in upscaling.UPSCALERS:
            return upscaling.upscale(image, scale, name)
        info = self.find(name)
        problem = self.problem(name)
        if problem:
            raise UpscalerUnavailableError(problem)
        default_tile, default_overlap = self.tiling()
        tile = default_tile if tile is None else tile
        overlap = default_overlap if overlap is None else overlap
        dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
        progress = (lambda done, total: job.step(done, total)) if job is not None else None
        with use_upscaler(self._manager(), info, self.registry) as model:
            for i in range(3):
                if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                    break
                if max(image.size) * model.scale > MAX_INTERMEDIATE_SIDE:
                    raise ExtrasError(f"{name} would make a {image.width * model.scale}x{image.height * model.scale} "
                                      f"image on the way (at most {MAX_INTERMEDIATE_SIDE} a side): ask for less")
                shape = image.size
                image = model_pass(model, image, tile=tile, overlap=overlap, progress=progress)
                if shape == image.size:
                    break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
        return image

    def resize(self, image: Image.Image, width: int, height: int, name: str, *, job=None) -> Image.Image:
        """`image` at exactly width x height through upscaler `name`, as A1111's resize_image (mode 0) does for
        hires fix: the upscaler when the image grows, then Lanczos to the exact size."""
        if name == "None" or image.mode == "L":
            return image.resize((width, height), resample=Image.Resampling.LANCZOS)
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = self.upscale_image(image, name, scale, job=job)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        return image


def folders_for(models_dir: Path, overrides: Mapping[str, Any] | None = None,
                extra: Mapping[str, Sequence[Path]] | None = None) -> dict[str, list[Path]]:
    """The upscaler folders of a models folder (models/ESRGAN, ...), a flag's folder in place of one
    (`overrides`: kind -> path or None), plus `extra` folders (the demo models')."""
    dirs: dict[str, list[Path]] = {}
    for kind in FOLDERS:
        chosen = (overrides or {}).get(kind)
        dirs[kind] = [Path(chosen).resolve() if chosen else Path(models_dir) / kind]
        dirs[kind] += [Path(p) for p in (extra or {}).get(kind, [])]
    return dirs
