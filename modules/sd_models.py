"""Stable Diffusion checkpoints on disk: discovery, hashes, architecture detection and offline loading.

What lives here, top to bottom:
- errors (`CheckpointError` and its kinds), `ModelArch` and `detect_architecture`;
- reading files: safetensors headers (shapes, metadata) without tensor data, and state dicts, where
  pickles (`.ckpt`, `.pt`, `.bin`) are only ever opened with `torch.load(weights_only=True)`;
- `HashCache` (sha256 cached by path, mtime and size) and the A1111 "AutoV2" short hash;
- `CheckpointInfo` / `CheckpointRegistry`: the checkpoints found in the model folders and how a
  user's text (title, name, hash ...) finds one, as A1111's `sd_model_checkpoint` does;
- `load_checkpoint`: a single file or a diffusers folder -> the keyword arguments of
  `StableDiffusionPipeline(...)` / `StableDiffusionXLPipeline(...)`, fully offline.

No web framework is imported here, and torch/diffusers/transformers are imported inside the
functions that need them, so listing checkpoints stays cheap at start-up.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.fileio import atomic_write_text
from modules.paths import SD_CONFIGS_DIR

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_CONFIGS_METADATA_KEY = "diffusers_configs"

UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# ComfyUI's observation for telling SD 2.x 768-v weights from 512-base weights (see _sd2_prediction).
SD2_V_STATISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STATISTIC_THRESHOLD = 0.09
# The last training step of SD 2.0-base (512, epsilon); diffusers' legacy loader keys on it too.
SD2_BASE_GLOBAL_STEP = 875000

# A safetensors header is JSON of a few hundred KB for the biggest SD checkpoints; anything huge is
# a corrupt or hostile file, not a checkpoint.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK_BYTES = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read or loaded; the message says why."""


class UnsupportedCheckpointError(CheckpointError):
    """Readable, but not an SD1 / SD2 / SDXL checkpoint this project can load."""


class CheckpointNotFoundError(CheckpointError):
    """A checkpoint name that matches nothing in the model folders."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code (or reference objects beyond tensors) when loaded."""


# ---------------------------------------------------------------------------------------------------
# Architecture


FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ModelArch:
    family: str  # "sd1" | "sd2" | "sdxl"
    inpainting: bool
    prediction_type: str  # "epsilon" | "v_prediction"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")

    @property
    def config_name(self) -> str:
        """The folder under modules/sd_configs/ holding this architecture's diffusers configs."""
        return f"{self.family}-inpainting" if self.inpainting else self.family

    @property
    def config_dir(self) -> Path:
        return SD_CONFIGS_DIR / self.config_name

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(int(n) for n in shape)


def _explicit_prediction_type(keys: Iterable[str], metadata: Mapping[str, str] | None) -> str | None:
    """A prediction type the file states outright, or None.

    Markers, strongest first: a `v_pred` key (the convention kohya's trainer and ComfyUI use for
    v-prediction fine-tunes), Stability's ModelSpec metadata, and the scheduler config this project
    embeds in its own files (`diffusers_configs`).
    """
    if "v_pred" in keys:
        return "v_prediction"
    if not metadata:
        return None
    spec = (metadata.get("modelspec.prediction_type") or "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    spec_arch = (metadata.get("modelspec.architecture") or "").strip().lower()
    if spec_arch.startswith("stable-diffusion-v2"):
        # ModelSpec names SD2 as "stable-diffusion-v2-768-v" or "stable-diffusion-v2-512".
        return "v_prediction" if spec_arch.endswith("-v") else "epsilon"
    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    if configs:
        try:
            prediction = json.loads(configs).get("scheduler", {}).get("prediction_type")
        except (ValueError, AttributeError):
            prediction = None
        if prediction in PREDICTION_TYPES:
            return prediction
    return None


def _describe_unknown(keys: list[str]) -> str:
    """A short guess at what a non-SD file is, for the error message."""
    if any(k.startswith("lora_") or ".lora_" in k or ".lora." in k for k in keys):
        return "it looks like a LoRA; put it in the Lora folder"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys) and not any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return "it looks like a VAE; put it in the VAE folder"
    if any(k.startswith(("model.diffusion_model.joint_blocks", "joint_blocks")) for k in keys):
        return "it looks like Stable Diffusion 3, which is not supported"
    if any(k.startswith(("model.diffusion_model.double_blocks", "double_blocks")) for k in keys):
        return "it looks like Flux, which is not supported"
    return "it has no Stable Diffusion UNet (model.diffusion_model.*) weights"


def detect_architecture(
    shapes: Mapping[str, Any] | str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> ModelArch:
    """The architecture of an LDM-layout state dict given its key -> shape map (tensors work too), or of
    a path: a diffusers folder (its configs are read) or a single file (safetensors: header only).

    Family from the text encoder keys: `conditioner.embedders.1.*` is SDXL, `cond_stage_model.model.*`
    (OpenCLIP) is SD2, `cond_stage_model.transformer.*` (OpenAI CLIP) is SD1. Inpainting: the UNet's
    first convolution takes 9 channels (4 latent + 1 mask + 4 masked-image latent).

    Prediction type: an explicit marker wins (see `_explicit_prediction_type`). Otherwise SD1, SDXL and
    every inpainting model are epsilon, and SD2 defaults to v_prediction: the flagship SD 2.0-v / 2.1
    releases and most SD2 fine-tunes are 768-v models, and diffusers makes the same default (an SD2
    single file maps to stabilityai/stable-diffusion-2-1). Shapes cannot tell 512-base from 768-v (the
    networks are identical); `load_checkpoint`, which has the weights, refines this (`_sd2_prediction`).
    """
    if isinstance(shapes, (str, os.PathLike)):
        path = Path(shapes)
        if path.is_dir():
            return _detect_diffusers_folder(path)
        if path.suffix.lower() == ".safetensors":
            file_shapes, file_metadata = read_safetensors_header(path)
            return detect_architecture(file_shapes, metadata={**file_metadata, **(metadata or {})})
        state_dict, _ = _load_state_dict_and_extras(path)
        return detect_architecture(state_dict, metadata=metadata)

    keys = list(shapes.keys())
    if UNET_INPUT_KEY not in shapes:
        raise UnsupportedCheckpointError(f"Not a Stable Diffusion checkpoint: {_describe_unknown(keys)}.")

    unet_in = _shape(shapes[UNET_INPUT_KEY])
    if len(unet_in) != 4:
        raise UnsupportedCheckpointError(f"Unexpected UNet input weight shape {unet_in}.")
    in_channels = unet_in[1]
    if in_channels not in (4, 9):
        raise UnsupportedCheckpointError(
            f"The UNet takes {in_channels} input channels; only ordinary (4) and inpainting (9) models are "
            "supported (5 is a depth model, 8 an instruct-pix2pix model)."
        )
    inpainting = in_channels == 9

    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise UnsupportedCheckpointError("SDXL checkpoint without its CLIP-L text encoder is not supported.")
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UnsupportedCheckpointError(
            "This is an SDXL refiner checkpoint; only SDXL base-style checkpoints are supported."
        )
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family = "sd1"
    else:
        raise UnsupportedCheckpointError(
            "Stable Diffusion UNet found, but no text encoder (cond_stage_model.* or conditioner.embedders.*) "
            "this project knows."
        )

    prediction = _explicit_prediction_type(keys, metadata)
    if prediction is None:
        prediction = "v_prediction" if family == "sd2" and not inpainting else "epsilon"
    return ModelArch(family=family, inpainting=inpainting, prediction_type=prediction)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _detect_diffusers_folder(folder: Path) -> ModelArch:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UnsupportedCheckpointError(f"{folder} is not a diffusers folder (no model_index.json).")
    index = _read_json(index_path)
    class_name = str(index.get("_class_name", ""))
    if not class_name.startswith("StableDiffusion") or "unet" not in index:
        raise UnsupportedCheckpointError(f"{folder} holds a {class_name or 'unknown'} pipeline, not Stable Diffusion.")
    unet = _read_json(folder / "unet" / "config.json")
    in_channels = int(unet.get("in_channels", 4))
    if in_channels not in (4, 9):
        raise UnsupportedCheckpointError(f"{folder}: UNet with {in_channels} input channels is not supported.")
    if "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None:
        if index.get("text_encoder", [None])[0] is None:
            raise UnsupportedCheckpointError(f"{folder}: SDXL refiner folders are not supported.")
        family = "sdxl"
    else:
        cross_attention_dim = unet.get("cross_attention_dim")
        text_encoder_config = folder / "text_encoder" / "config.json"
        hidden = _read_json(text_encoder_config).get("hidden_size") if text_encoder_config.is_file() else None
        family = "sd2" if 1024 in (hidden, cross_attention_dim) else "sd1"
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    prediction = "epsilon"
    if scheduler_config.is_file():
        prediction = _read_json(scheduler_config).get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedCheckpointError(f"{folder}: prediction type {prediction!r} is not supported.")
    return ModelArch(family=family, inpainting=in_channels == 9, prediction_type=prediction)


def _sd2_prediction(state_dict: Mapping[str, Any], global_step: int | None) -> str | None:
    """v_prediction or epsilon for an SD2 (non-inpainting) state dict from its values, or None.

    The step count SD 2.0-base finished at marks that model (diffusers' legacy loader uses the same
    rule). Otherwise the spread of one LayerNorm bias deep in the decoder: it is well above 0.09 in the
    768-v models and below it in 512-base ones. ComfyUI has used this observation for all SD2 loads
    since 2023 without complaints; the weights are the only evidence left in a bare state dict.
    """
    if global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    bias = state_dict.get(SD2_V_STATISTIC_KEY)
    if bias is None:
        return None
    spread = float(bias.float().std(unbiased=False))
    return "v_prediction" if spread > SD2_V_STATISTIC_THRESHOLD else "epsilon"


# ---------------------------------------------------------------------------------------------------
# Reading files


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, `__metadata__`) of a safetensors file, reading only its JSON header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path.name} is not a safetensors file (too short).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES or header_len + 8 > size:
                raise CheckpointError(f"{path.name} is not a valid safetensors file (bad header length).")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name} is not a valid safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a valid safetensors file (header is not an object).")
    metadata = header.pop("__metadata__", None) or {}
    try:
        shapes = {key: tuple(int(n) for n in info["shape"]) for key, info in header.items()}
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a valid safetensors file (bad tensor entry).") from e
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor in a safetensors file, from its header only (no tensor data)."""
    return read_safetensors_header(path)[0]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file (empty if none)."""
    return read_safetensors_header(path)[1]


def _load_state_dict_and_extras(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """The tensors of a checkpoint file, plus what else it carried: `metadata` (safetensors) and
    `global_step` (pickles, when present)."""
    import pickle

    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _, metadata = read_safetensors_header(path)
        try:
            return load_file(str(path), device="cpu"), {"metadata": metadata}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"Cannot read {path.name}: {e}") from e
    if suffix not in PICKLE_EXTENSIONS:
        raise UnsupportedCheckpointError(f"Unknown checkpoint file type {suffix!r} ({path.name}).")

    try:
        # weights_only: the unpickler only builds tensors and plain containers, so a malicious pickle
        # fails here instead of running its payload. There is deliberately no fallback.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path.name} was refused: it is a pickle that holds more than tensors (it could run code when "
            f"loaded). Convert it to .safetensors with a tool you trust. Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"Cannot read {path.name}: {e}") from e

    extras: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("global_step"), int):
            extras["global_step"] = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} does not hold a state dict.")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name} holds no tensors.")
    return tensors, extras


def load_state_dict(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """All tensors of a checkpoint file on the CPU. `.safetensors` via safetensors; `.ckpt`, `.pt`,
    `.pth`, `.bin` only via `torch.load(weights_only=True)` (a top-level "state_dict" is unwrapped); a
    pickle that would run code raises `UnsafeCheckpointError`."""
    return _load_state_dict_and_extras(path)[0]


# ---------------------------------------------------------------------------------------------------
# Hashes


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, cached by (absolute path, mtime_ns, size) and persisted as JSON.

    Hashing a checkpoint reads gigabytes, so a value is reused until the file's mtime or size
    changes. The cache file is rewritten atomically (temp file + os.replace) after each new hash, so a
    crash never leaves it half-written. Thread-safe; a file is hashed by one thread at a time.
    """

    FORMAT_VERSION = 1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A damaged cache only costs re-hashing; never refuse to start over it.
            log.warning("ignoring unreadable hash cache %s: %s", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.FORMAT_VERSION:
            return {}
        files = data.get("files")
        return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    def _write_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": self.FORMAT_VERSION, "files": self._entries}, indent=1, sort_keys=True)
        atomic_write_text(self.path, payload)

    @staticmethod
    def _key(file: str | os.PathLike) -> tuple[str, os.stat_result]:
        path = Path(file).resolve()
        return str(path), path.stat()

    def peek(self, file: str | os.PathLike) -> str | None:
        """The cached sha256 if it is still valid for the file as it is now, else None (never reads
        the file's contents)."""
        try:
            key, st = self._key(file)
        except OSError:
            return None
        with self._lock:
            entry = self._entries.get(key)
        if entry and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("size") == st.st_size:
            return entry.get("sha256")
        return None

    def sha256(self, file: str | os.PathLike) -> str:
        """The file's sha256 (hex), from the cache when its mtime and size are unchanged."""
        cached = self.peek(file)
        if cached:
            return cached
        key, _ = self._key(file)
        with self._lock:
            file_lock = self._file_locks.setdefault(key, threading.Lock())
        with file_lock:
            # Another thread may have hashed it while this one waited.
            cached = self.peek(file)
            if cached:
                return cached
            key, st = self._key(file)
            digest = _sha256_of_file(Path(key))
            with self._lock:
                self._entries[key] = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "sha256": digest}
                self._write_locked()
            return digest

    def autov2(self, file: str | os.PathLike) -> str:
        """A1111's "AutoV2" model hash: the first 10 hex digits of the sha256."""
        return self.sha256(file)[:10]


# ---------------------------------------------------------------------------------------------------
# Checkpoints on disk

_DIFFUSERS_UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


@dataclass
class CheckpointInfo:
    """One checkpoint: a single file, or a diffusers folder (a folder with model_index.json).

    `sha256`/`shorthash`/`title` hash the file on first use (through the HashCache, so only once per
    file version). A diffusers folder has no single file to hash, so its sha256 is the sha256 of the
    text "<sha256 of model_index.json><sha256 of the UNet weights file>": it changes when the
    pipeline's layout or its UNet weights change, and stays cheap compared to hashing every component.
    """

    filename: str
    name: str
    model_name: str
    is_diffusers_folder: bool = False
    hash_cache: HashCache | None = field(default=None, repr=False, compare=False)

    def hash_files(self) -> list[Path]:
        """The files the sha256 is computed from."""
        if not self.is_diffusers_folder:
            return [Path(self.filename)]
        folder = Path(self.filename)
        files = [folder / "model_index.json"]
        for candidate in _DIFFUSERS_UNET_WEIGHTS:
            if (folder / "unet" / candidate).is_file():
                files.append(folder / "unet" / candidate)
                break
        return files

    def _hash(self, file: Path, peek_only: bool) -> str | None:
        if self.hash_cache is None:
            return None if peek_only else _sha256_of_file(file)
        return self.hash_cache.peek(file) if peek_only else self.hash_cache.sha256(file)

    def _sha256(self, peek_only: bool) -> str | None:
        digests = [self._hash(f, peek_only) for f in self.hash_files()]
        if any(d is None for d in digests):
            return None
        if not self.is_diffusers_folder:
            return digests[0]
        return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()

    @property
    def sha256(self) -> str:
        return self._sha256(peek_only=False)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"

    @property
    def known_sha256(self) -> str | None:
        """The sha256 if the cache already holds it for the current file version; never hashes."""
        return self._sha256(peek_only=True)

    @property
    def display_title(self) -> str:
        """The title when the hash is already known, else the bare name, as A1111 lists checkpoints
        that were never loaded; lets a UI list a folder of big files without hashing all of them."""
        known = self.known_sha256
        return f"{self.name} [{known[:10]}]" if known else self.name


_TITLE_RE = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class CheckpointRegistry:
    """The checkpoints in the model folders (plus explicitly named files), and lookup by the texts
    users and API clients send: a title "name [hash]", a name, a model name, a file name with or
    without extension, or a hash."""

    def __init__(
        self,
        dirs: Iterable[str | os.PathLike],
        extra_files: Iterable[str | os.PathLike] = (),
        hash_cache: HashCache | None = None,
    ):
        self.dirs = [Path(d) for d in dirs]
        self.extra_files = [Path(f) for f in extra_files]
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._items: list[CheckpointInfo] | None = None
        # files that failed to load, with why: left out of the default choice until they change on disk
        self._unusable: dict[str, tuple[tuple[int, int] | None, str]] = {}

    def mark_unusable(self, info: CheckpointInfo, reason: str) -> None:
        """Remember that `info` cannot load (until its file changes), so defaults skip it."""
        with self._lock:
            self._unusable[info.filename] = (_file_stamp(info.filename), reason)

    def unusable(self) -> dict[str, str]:
        """name -> why, for the listed checkpoints that failed to load and have not changed since."""
        with self._lock:
            marks = dict(self._unusable)
        return {info.name: marks[info.filename][1] for info in self.list()
                if info.filename in marks and marks[info.filename][0] == _file_stamp(info.filename)}

    def resolve(self, text: str) -> CheckpointInfo:
        """`find`, or CheckpointNotFoundError naming what there is."""
        info = self.find(text)
        if info is None:
            names = ", ".join(c.name for c in self.list()) or "none on disk"
            raise CheckpointNotFoundError(f"checkpoint {text!r} not found (available: {names})")
        return info

    def usable(self) -> list[CheckpointInfo]:
        """The checkpoints in list order, less those known not to load: the candidates for the default."""
        bad = self.unusable()
        return [info for info in self.list() if info.name not in bad]

    def _info(self, path: Path, name: str, is_folder: bool) -> CheckpointInfo:
        name = name.replace(os.sep, "/")
        model_name = name if is_folder else name.rsplit(".", 1)[0]
        return CheckpointInfo(
            filename=str(path.absolute()),
            name=name,
            model_name=model_name,
            is_diffusers_folder=is_folder,
            hash_cache=self.hash_cache,
        )

    def _scan_dir(self, root: Path) -> list[CheckpointInfo]:
        found = []
        if (root / "model_index.json").is_file():
            return [self._info(root, root.name, True)]
        # Links are followed (users link model folders in), so remember real paths to stop loops.
        visited = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue  # .git, .cache and the like hold no user checkpoints
                real = os.path.realpath(here / d)
                if real in visited:
                    continue
                visited.add(real)
                if (here / d / "model_index.json").is_file():
                    # A diffusers folder is one checkpoint; its unet/vae files are not checkpoints.
                    found.append(self._info(here / d, str((here / d).relative_to(root)), True))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if f.lower().endswith(CHECKPOINT_EXTENSIONS) and not f.startswith("."):
                    found.append(self._info(here / f, str((here / f).relative_to(root)), False))
        return found

    def refresh(self) -> list[CheckpointInfo]:
        """Rescan the folders (hashes are not computed here) and return the new list."""
        items: list[CheckpointInfo] = []
        for root in self.dirs:
            if root.is_dir():
                items.extend(sorted(self._scan_dir(root), key=lambda i: i.name))
        for f in self.extra_files:
            if f.is_file() or (f / "model_index.json").is_file():
                items.append(self._info(f, f.name, f.is_dir()))
        seen_files: set[str] = set()
        seen_names: set[str] = set()
        unique = []
        for info in items:
            real = os.path.realpath(info.filename)
            if real in seen_files:
                continue
            if info.name in seen_names:
                # Same relative name under two roots: the first root wins, as it is listed first.
                log.warning("checkpoint %s shadowed by an earlier one of the same name", info.filename)
                continue
            seen_files.add(real)
            seen_names.add(info.name)
            unique.append(info)
        unique.sort(key=lambda i: (i.name.lower(), i.name))
        with self._lock:
            self._items = unique
        return list(unique)

    def list(self) -> list[CheckpointInfo]:
        """All checkpoints, sorted by name (scanning on first use)."""
        with self._lock:
            items = self._items
        if items is None:
            items = self.refresh()
        return list(items)

    def find(self, text: str | None) -> CheckpointInfo | None:
        """The checkpoint a user's text means, or None. Accepts what A1111's `sd_model_checkpoint`
        accepts: "name [hash]", name, model name, file name, file name without extension, a short or
        full sha256, and also the absolute path."""
        if not text or not text.strip():
            return None
        text = text.strip()
        items = self.list()

        m = _TITLE_RE.match(text)
        if m:
            by_name = self._match_name(items, m["name"])
            if by_name:
                # The name decides; the hash only picks among same-named candidates. A title saved
                # before the file was re-saved (new hash) still finds the file, as in A1111.
                wanted = m["hash"].lower()
                for info in by_name:
                    known = info.known_sha256
                    if known and known.startswith(wanted):
                        return info
                return by_name[0]
            return self._match_hash(items, m["hash"])

        by_name = self._match_name(items, text)
        if by_name:
            return by_name[0]
        if _HEX_RE.match(text):
            return self._match_hash(items, text)
        return None

    @staticmethod
    def _aliases(info: CheckpointInfo) -> tuple[str, ...]:
        """The names a checkpoint answers to, most specific first: name, model name, file name, file
        name without extension, absolute path."""
        base = info.name.rsplit("/", 1)[-1]
        stem = base if info.is_diffusers_folder else base.rsplit(".", 1)[0]
        return info.name, info.model_name, base, stem, info.filename.replace("\\", "/")

    @classmethod
    def _match_name(cls, items: list[CheckpointInfo], text: str) -> list[CheckpointInfo]:
        """Checkpoints whose alias equals the text: exact spelling before case-insensitive, and a more
        specific alias kind before a less specific one (so "sub/b" beats another folder's "b")."""
        text = text.replace("\\", "/")
        table = [(info, cls._aliases(info)) for info in items]
        for fold in (False, True):
            needle = text.lower() if fold else text
            for kind in range(5):
                hits = [info for info, aliases in table if (aliases[kind].lower() if fold else aliases[kind]) == needle]
                if hits:
                    return hits
        return []

    @staticmethod
    def _match_hash(items: list[CheckpointInfo], text: str) -> CheckpointInfo | None:
        wanted = text.lower()
        # Hashes already known first; only then hash the rest (cached afterwards, so this is paid once).
        for info in items:
            known = info.known_sha256
            if known and known.startswith(wanted):
                return info
        for info in items:
            if info.known_sha256 is None:
                try:
                    if info.sha256.startswith(wanted):
                        return info
                except OSError as e:
                    log.warning("cannot hash %s: %s", info.filename, e)
        return None


# ---------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedCheckpoint:
    """A checkpoint's diffusers components. `components` holds exactly keyword arguments of
    `StableDiffusionPipeline(...)` (sd1/sd2, also inpainting) or `StableDiffusionXLPipeline(...)`
    (sdxl); the img2img and inpaint pipelines of the same family take the same keywords.
    `config_dir` is the diffusers config folder the weights were built with."""

    info: CheckpointInfo
    arch: ModelArch
    components: dict[str, Any]
    config_dir: Path


_COMPONENT_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
_materialized_lock = threading.Lock()
_materialized_root: Path | None = None
_materialized: dict[str, Path] = {}


def _materialized_config_dir(configs_json: str, arch: ModelArch) -> Path:
    """A config folder built from a file's `diffusers_configs` metadata, cached per distinct content.

    The project's tiny test models have shapes no published config has; they carry their own configs
    in the safetensors metadata ({"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler":
    {...}}), and this writes them out as a diffusers folder that `from_single_file(config=...)` reads.
    model_index.json comes from the shipped folder of the detected architecture. The folders live in
    one private temp dir per process (removed at exit), so no other user can plant configs there.
    """
    global _materialized_root
    digest = hashlib.sha256(f"{arch.config_name}\n{configs_json}".encode()).hexdigest()[:32]
    with _materialized_lock:
        cached = _materialized.get(digest)
        if cached is not None and cached.is_dir():
            return cached
        try:
            configs = json.loads(configs_json)
        except ValueError as e:
            raise CheckpointError(f"The file's {DIFFUSERS_CONFIGS_METADATA_KEY} metadata is not JSON: {e}") from e
        if not isinstance(configs, dict) or not configs:
            raise CheckpointError(f"The file's {DIFFUSERS_CONFIGS_METADATA_KEY} metadata must be a JSON object.")
        unknown = set(configs) - set(_COMPONENT_CONFIG_FILES)
        if unknown:
            # Names become paths; only the known component folders may be written.
            raise CheckpointError(f"Unknown components in {DIFFUSERS_CONFIGS_METADATA_KEY}: {sorted(unknown)}")
        if _materialized_root is None:
            _materialized_root = Path(tempfile.mkdtemp(prefix="sdwebui-configs-"))
            atexit.register(shutil.rmtree, _materialized_root, ignore_errors=True)
        target = _materialized_root / digest
        shutil.copytree(arch.config_dir, target, dirs_exist_ok=True)
        for component, config in configs.items():
            if not isinstance(config, dict):
                raise CheckpointError(f"{DIFFUSERS_CONFIGS_METADATA_KEY}[{component!r}] must be a JSON object.")
            out = target / _COMPONENT_CONFIG_FILES[component]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        _materialized[digest] = target
        return target


def checkpoint_config_dir(path: str | os.PathLike, arch: ModelArch | None = None) -> Path:
    """The diffusers config folder `load_checkpoint` uses for a single file: the one materialized from
    its `diffusers_configs` metadata if it has that, else the shipped sd_configs/<arch> folder. Also
    what to pass as `config=` to plain diffusers `from_single_file` for the same result."""
    path = Path(path)
    metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    arch = arch or detect_architecture(path)
    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    return _materialized_config_dir(configs, arch) if configs else arch.config_dir


def _assert_fully_loaded(model: Any, what: str, source: str) -> None:
    """from_single_file leaves weights missing from the file on the meta device without a word; a
    truncated or mismatched checkpoint must fail here, not at the first forward pass."""
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{source}: the {what} weights are incomplete ({len(missing)} tensors missing, e.g. {missing[0]})."
        )


def _drop_prefix(state_dict: dict, prefixes: tuple[str, ...]) -> None:
    # Built components own their tensors now; freeing the file's copies keeps peak memory near 1x.
    for key in [k for k in state_dict if k.startswith(prefixes)]:
        del state_dict[key]


def _scheduler_from_config(config_dir: Path, prediction_type: str, subfolder: str = "scheduler"):
    import diffusers

    config = _read_json(config_dir / subfolder / "scheduler_config.json")
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise CheckpointError(f"Unknown scheduler class {config.get('_class_name')!r} in {config_dir}")
    return cls.from_config(config, prediction_type=prediction_type)


def _tokenizers(arch: ModelArch) -> dict[str, Any]:
    from modules.clip_tokenizer import clip_tokenizer

    if arch.family == "sd1":
        return {"tokenizer": clip_tokenizer()}
    if arch.family == "sd2":
        return {"tokenizer": clip_tokenizer("!")}
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer("!")}


def _pipeline_extras(arch: ModelArch) -> dict[str, Any]:
    if arch.is_sdxl:
        # add_watermarker=False: A1111 does not watermark, and invisible-watermark is no dependency.
        return {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
            "requires_safety_checker": False}


def _normalize_ldm_keys(state_dict: dict) -> None:
    """Early SD1 files store CLIP as `cond_stage_model.transformer.embeddings.*` (no `text_model.`);
    diffusers only recognises the later spelling."""
    prefix = "cond_stage_model.transformer."
    old = [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "text_model.")]
    for key in old:
        state_dict[prefix + "text_model." + key[len(prefix):]] = state_dict.pop(key)


class _EmptyFp32ModulesWarningFilter(logging.Filter):
    """from_single_file(torch_dtype=...) casts with .to(dtype), and diffusers then warns about modules
    to keep in float32 even when that list is empty ("[]"): a false alarm on every load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_warning_filter_installed = False


def _install_warning_filter() -> None:
    global _warning_filter_installed
    if not _warning_filter_installed:
        logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ModulesWarningFilter())
        _warning_filter_installed = True


def _load_single_file(info: CheckpointInfo, torch_dtype, vae_dtype) -> LoadedCheckpoint:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _install_warning_filter()
    source = info.name
    state_dict, extras = _load_state_dict_and_extras(info.filename)
    _normalize_ldm_keys(state_dict)
    metadata = extras.get("metadata", {})
    arch = detect_architecture(state_dict, metadata=metadata)
    if arch.family == "sd2" and not arch.inpainting and _explicit_prediction_type(state_dict.keys(), metadata) is None:
        refined = _sd2_prediction(state_dict, extras.get("global_step"))
        if refined:
            arch = ModelArch(arch.family, arch.inpainting, refined)

    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    config_dir = _materialized_config_dir(configs, arch) if configs else arch.config_dir
    unet_overrides = {}
    if not configs and arch.family == "sd2" and not arch.inpainting and arch.prediction_type == "epsilon":
        # The shipped SD2 folder describes 2.1 768-v; an epsilon SD2 is a 512-base model.
        unet_overrides["sample_size"] = 64

    common = {"config": str(config_dir), "local_files_only": True}
    stage = "UNet"
    try:
        unet = UNet2DConditionModel.from_single_file(
            state_dict, subfolder="unet", torch_dtype=torch_dtype, **common, **unet_overrides
        )
        _assert_fully_loaded(unet, stage, source)
        _drop_prefix(state_dict, ("model.diffusion_model.", "model_ema."))
        stage = "VAE"
        vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", torch_dtype=vae_dtype, **common)
        _assert_fully_loaded(vae, stage, source)
        _drop_prefix(state_dict, ("first_stage_model.", "vae."))
        stage = "text encoder"
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state_dict, subfolder="text_encoder", torch_dtype=torch_dtype, **common
        )
        _assert_fully_loaded(text_encoder, stage, source)
        components = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        if arch.is_sdxl:
            stage = "second text encoder"
            text_encoder_2 = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, state_dict, subfolder="text_encoder_2", torch_dtype=torch_dtype,
                **common,
            )
            _assert_fully_loaded(text_encoder_2, stage, source)
            components["text_encoder_2"] = text_encoder_2
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        if "meta tensor" in str(e):
            # from_single_file casts to torch_dtype before anyone can look; tensors missing from the
            # file are still on the meta device then, and the cast is what fails.
            raise CheckpointError(
                f"{source}: the {stage} weights are incomplete (tensors missing from the file)."
            ) from e
        raise CheckpointError(f"Cannot load the {stage} of {source} as {arch.config_name}: {e}") from e
    finally:
        state_dict.clear()

    components["scheduler"] = _scheduler_from_config(config_dir, arch.prediction_type)
    components.update(_tokenizers(arch))
    components.update(_pipeline_extras(arch))
    return LoadedCheckpoint(info=info, arch=arch, components=_finish(components), config_dir=config_dir)


def _variant(folder: Path) -> str | None:
    """"fp16" when a component folder only has fp16-variant weights (common in hub downloads)."""
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir()]
    plain = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)(\.index\.json)?$")
    if any(plain.match(n) for n in names):
        return None
    return "fp16" if any(".fp16." in n for n in names) else None


def _load_diffusers_folder(info: CheckpointInfo, torch_dtype, vae_dtype) -> LoadedCheckpoint:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(info.filename)
    arch = _detect_diffusers_folder(folder)
    try:
        components: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=torch_dtype, local_files_only=True,
                variant=_variant(folder / "unet"),
            ),
            "vae": AutoencoderKL.from_pretrained(
                folder, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True, variant=_variant(folder / "vae")
            ),
            "text_encoder": CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", dtype=torch_dtype, local_files_only=True,
                variant=_variant(folder / "text_encoder"),
            ),
        }
        if arch.is_sdxl:
            components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", dtype=torch_dtype, local_files_only=True,
                variant=_variant(folder / "text_encoder_2"),
            )
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(f"Cannot load diffusers folder {info.name}: {e}") from e

    components["scheduler"] = _scheduler_from_config(folder, arch.prediction_type)
    tokenizers = _tokenizers(arch)
    for name in tokenizers:
        # The folder's own tokenizer wins (fine-tunes may add tokens); else the shipped CLIP one.
        if (folder / name).is_dir():
            tokenizers[name] = CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True)
    components.update(tokenizers)
    components.update(_pipeline_extras(arch))
    return LoadedCheckpoint(info=info, arch=arch, components=_finish(components), config_dir=folder)


def _finish(components: dict[str, Any]) -> dict[str, Any]:
    import torch

    for value in components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    return components


def load_checkpoint(
    info: CheckpointInfo,
    *,
    torch_dtype: "torch.dtype | None" = None,
    vae_dtype: "torch.dtype | None" = None,
) -> LoadedCheckpoint:
    """Load a checkpoint into diffusers components on the CPU, in eval mode, fully offline.

    torch_dtype defaults to float32 (None means float32, so importing this module needs no torch);
    vae_dtype defaults to torch_dtype. Single files are read with `load_state_dict` (so a `.ckpt` is
    never unpickled beyond tensors) and each component is built by the diffusers model classes'
    `from_single_file(state_dict, config=<folder>, ...)` (CLIP text encoders through diffusers'
    `create_diffusers_clip_model_from_ldm`, which is what `from_single_file` uses for them). The config
    folder is the shipped modules/sd_configs/<arch>, or one built from the file's `diffusers_configs`
    metadata (see `_materialized_config_dir`). Diffusers folders load with `from_pretrained`.
    Tokenizers come from `clip_tokenizer()` unless a diffusers folder has its own.
    """
    import torch

    torch_dtype = torch_dtype or torch.float32
    vae_dtype = vae_dtype or torch_dtype
    if info.is_diffusers_folder:
        return _load_diffusers_folder(info, torch_dtype, vae_dtype)
    return _load_single_file(info, torch_dtype, vae_dtype)
