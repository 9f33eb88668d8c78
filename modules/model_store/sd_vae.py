"""VAEs of models/VAE and A1111's "SD VAE" setting: which files there are, what a choice of "Automatic",
"None" or a file name means for a checkpoint, and loading one (offline, no pickle code ever runs).

A1111's rules, which users rely on:
- "None": the checkpoint's own VAE.
- "Automatic": a VAE named after the checkpoint (`NAME.vae.safetensors`, `NAME.vae.pt`, `NAME.vae.ckpt`)
  beside the checkpoint or in the VAE folder, else the checkpoint's own.
- a name from the list (`GET /sdapi/v1/sd-vae`): that VAE, whatever the checkpoint.
The infotext then carries `VAE hash` (the file's AutoV2 hash) and `VAE` (its file name).

Files are single files (`.safetensors`; `.pt`, `.ckpt`, `.bin` through `torch.load(weights_only=True)`) in
the LDM layout (`encoder.*`, `decoder.*`, optionally under `first_stage_model.`) or diffusers' own key layout,
or diffusers folders (`config.json` + weights). A single file takes its shape from the checkpoint it is used
with (the VAE config of that checkpoint), unless it carries its own (`diffusers_configs` metadata, as the
project's tiny test VAE does). torch and diffusers are imported only inside the loading functions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.model_store.checkpoint_files import (
    DIFFUSERS_CONFIGS_METADATA_KEY,
    CheckpointError,
    ModelArch,
    load_state_dict_and_extras,
    read_safetensors_shapes,
)
from modules.model_store.hashing import HashCache, sha256_of_file
from modules.model_store.loading import materialized_config_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTOMATIC = "Automatic"
NONE = "None"
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.bin")


class UnknownVaeError(ValueError):
    """A VAE name that matches no file of the VAE folder."""


@dataclass(frozen=True)
class VaeInfo:
    """One VAE: `name` as A1111 lists it (the file or folder name), `path` on disk."""
    name: str
    path: Path
    hash_cache: HashCache | None = field(default=None, repr=False, compare=False)

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def weights_file(self) -> Path:
        if not self.is_folder:
            return self.path
        for candidate in _FOLDER_WEIGHTS:
            if (self.path / candidate).is_file():
                return self.path / candidate
        raise CheckpointError(f"VAE folder {self.name} holds no diffusion_pytorch_model weights")

    @property
    def shorthash(self) -> str:
        """A1111's "VAE hash": the first 10 hex digits of the file's sha256 (a folder's: of its weights file)."""
        file = self.weights_file()
        return self.hash_cache.autov2(file) if self.hash_cache is not None else sha256_of_file(file)[:10]

    def key(self, dtype) -> str:
        return f"vae:{self.path}:{str(dtype).removeprefix('torch.')}"


def _is_vae_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError):
        return False


class VaeRegistry:
    """The VAE files and folders under the VAE folder (searched recursively), rescanned on `refresh`."""

    def __init__(self, folder: Path, hash_cache: HashCache | None = None):
        self.folder = Path(folder)
        self.extra_folders: list[Path] = []  # more folders listed after the VAE folder (--demo's tiny VAEs)
        self.hash_cache = hash_cache
        self._items: list[VaeInfo] = []

    def refresh(self) -> list[VaeInfo]:
        items: list[VaeInfo] = []
        for folder in [self.folder, *self.extra_folders]:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in VAE_SUFFIXES and not _inside_folder_vae(path):
                    items.append(VaeInfo(path.relative_to(folder).as_posix(), path, self.hash_cache))
                elif path.is_dir() and _is_vae_folder(path):
                    items.append(VaeInfo(path.relative_to(folder).as_posix(), path, self.hash_cache))
        self._items = items
        return list(items)

    def list(self) -> list[VaeInfo]:
        return list(self._items)

    def names(self) -> list[str]:
        return [v.name for v in self._items]

    def find(self, name: str) -> VaeInfo | None:
        """A VAE by its listed name, its file name or its name without extension (case-insensitive)."""
        wanted = name.strip().lower()
        for info in self._items:
            if wanted in (info.name.lower(), info.path.name.lower(), info.path.stem.lower()):
                return info
        return None

    def choices(self) -> list[str]:
        """What the `sd_vae` setting accepts: Automatic, None and every listed VAE."""
        return [AUTOMATIC, NONE, *self.names()]

    def choose(self, choice: str | None, checkpoint_path: str | os.PathLike) -> VaeInfo | None:
        """The VAE a generation with checkpoint `checkpoint_path` uses (None: the checkpoint's own)."""
        choice = (choice or AUTOMATIC).strip()
        if choice == NONE:
            return None
        if choice == AUTOMATIC:
            return self.near_checkpoint(Path(checkpoint_path))
        info = self.find(choice)
        if info is None:
            raise UnknownVaeError(f"VAE {choice!r} not found (available: {', '.join(self.choices())})")
        return info

    def for_latent_channels(self, channels: int, prefer: tuple[str, ...] = (),
                            only_preferred: bool = False) -> VaeInfo | None:
        """The first VAE file whose decoder takes `channels` latent channels (16: FLUX's and SD3's), one whose
        name holds a word of `prefer` first (only those with `only_preferred`); for checkpoint files that ship
        without a VAE."""
        def preferred(info):
            return any(w in info.path.stem.lower() for w in prefer)
        matches = [info for info in self._items if not info.is_folder and _latent_channels(info.path) == channels
                   and (preferred(info) or not only_preferred)]
        matches.sort(key=lambda info: (not preferred(info), info.name.lower()))
        return matches[0] if matches else None

    def near_checkpoint(self, checkpoint: Path) -> VaeInfo | None:
        """A1111's Automatic: NAME.vae.* beside the checkpoint, else in the VAE folder."""
        stem = checkpoint.name if checkpoint.is_dir() else checkpoint.stem
        for folder in (checkpoint.parent, self.folder):
            for suffix in VAE_SUFFIXES:
                path = folder / f"{stem}.vae{suffix}"
                if path.is_file():
                    return VaeInfo(path.name, path, self.hash_cache)
        return None


def _latent_channels(path: Path) -> int | None:
    """A VAE file's latent channels from its header (the decoder's first convolution), None if unreadable."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        shapes = read_safetensors_shapes(path)
    except (OSError, ValueError):
        return None
    for prefix in ("", "vae.", "first_stage_model."):
        shape = shapes.get(prefix + "decoder.conv_in.weight")
        if shape and len(shape) == 4:
            return shape[1]
    return None


def _inside_folder_vae(path: Path) -> bool:
    return _is_vae_folder(path.parent)


def load_vae(info: VaeInfo, checkpoint_vae_config: Path, dtype: "torch.dtype"):
    """An AutoencoderKL on the CPU in eval mode. `checkpoint_vae_config` is the diffusers config folder of the
    checkpoint it will be used with (its `vae/config.json` gives a single file its shape)."""
    from diffusers import AutoencoderKL

    try:
        if info.is_folder:
            vae = AutoencoderKL.from_pretrained(info.path, torch_dtype=dtype, local_files_only=True)
        else:
            state_dict, extras = load_state_dict_and_extras(info.path)
            config_dir = checkpoint_vae_config
            configs = extras.get("metadata", {}).get(DIFFUSERS_CONFIGS_METADATA_KEY)
            if configs:
                config_dir = materialized_config_dir(configs, ModelArch("sd1", False, "epsilon"))
            vae = _vae_from_state_dict(state_dict, config_dir, dtype)
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(f"Cannot load VAE {info.name}: {e}") from e
    missing = [n for n, t in vae.named_parameters() if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"VAE {info.name} is incomplete ({len(missing)} tensors missing, e.g. {missing[0]})")
    return vae.eval()


def _vae_from_state_dict(state_dict: dict[str, Any], config_dir: Path, dtype):
    from diffusers import AutoencoderKL

    keys = list(state_dict)
    if any(k.startswith("vae.") for k in keys):  # some files keep the VAE under a "vae." prefix
        state_dict = {k.removeprefix("vae."): v for k, v in state_dict.items()}
        keys = list(state_dict)
    diffusers_layout = any(".down_blocks." in k or k.startswith("decoder.up_blocks.") for k in keys)
    if diffusers_layout:
        config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
        vae = AutoencoderKL.from_config(config)
        vae.load_state_dict(state_dict, strict=True)
        return vae.to(dtype)
    # LDM layout (encoder.down.0..., optionally under first_stage_model.): diffusers' own converter
    return AutoencoderKL.from_single_file(state_dict, config=str(config_dir), subfolder="vae", torch_dtype=dtype,
                                          local_files_only=True)
