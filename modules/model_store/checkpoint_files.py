"""Checkpoint files as they lie on disk: the errors of reading them, `ModelArch` and `detect_architecture`
(SD1/SD2/SDXL, inpainting, prediction type), safetensors headers read without tensor data, and state
dicts, where pickles (`.ckpt`, `.pt`, `.bin`) are only ever opened with `torch.load(weights_only=True)`.
torch is imported inside the functions that need it, so detection by header stays cheap at start-up.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.core.paths import SD_CONFIGS_DIR

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_CONFIGS_METADATA_KEY = "diffusers_configs"

UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
# ComfyUI's observation for telling SD 2.x 768-v weights from 512-base weights (see sd2_prediction).
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


FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
FLOW_FAMILIES = ("sd3", "flux")  # rectified-flow transformers: flow-matching samplers, no UNet
PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}  # diffusers folders' model_index


@dataclass(frozen=True)
class ModelArch:
    family: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    inpainting: bool
    prediction_type: str  # "epsilon" | "v_prediction" ("flow" for sd3 and flux)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}")
        allowed = ("flow",) if self.family in FLOW_FAMILIES else PREDICTION_TYPES
        if self.prediction_type not in allowed:
            raise ValueError(f"unknown prediction type {self.prediction_type!r} for {self.family}")

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def config_name(self) -> str:
        """The folder under modules/model_store/sd_configs/ holding this architecture's diffusers configs."""
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


def explicit_prediction_type(keys: Iterable[str], metadata: Mapping[str, str] | None) -> str | None:
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


def sidecar_config(path: str | os.PathLike) -> Path | None:
    """A1111's per-checkpoint config: `NAME.yaml` beside `NAME.safetensors` / `NAME.ckpt`, if there is one."""
    path = Path(path)
    if path.is_dir():
        return None
    yaml_path = path.with_suffix(".yaml")
    return yaml_path if yaml_path.is_file() else None


def sidecar_prediction_type(path: str | os.PathLike) -> str | None:
    """The prediction type an A1111 sidecar config gives (`model.params.parameterization: "v"` is
    v-prediction; LDM's default, as in SD 1's v1-inference.yaml, is epsilon), or None without one. It is how
    A1111 users tell an SD2 768-v model from a 512-base one, so it outranks every guess."""
    yaml_path = sidecar_config(path)
    if yaml_path is None:
        return None
    import yaml
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"Cannot read the config {yaml_path.name} beside the checkpoint: {e}") from e
    params = ((config or {}).get("model") or {}).get("params") or {} if isinstance(config, dict) else {}
    value = str(params.get("parameterization", "eps")).strip().lower() if isinstance(params, dict) else "eps"
    if value not in ("eps", "v"):
        raise CheckpointError(f"{yaml_path.name}: parameterization {value!r} is not supported (eps or v).")
    return "v_prediction" if value == "v" else "epsilon"


def _describe_unknown(keys: list[str]) -> str:
    """A short guess at what a non-SD file is, for the error message."""
    if any(k.startswith("lora_") or ".lora_" in k or ".lora." in k for k in keys):
        return "it looks like a LoRA; put it in the Lora folder"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys) and not any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return "it looks like a VAE; put it in the VAE folder"
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

    Prediction type: an A1111 sidecar config (`NAME.yaml`, see `sidecar_prediction_type`) wins, then an
    explicit marker in the file (see `explicit_prediction_type`). Otherwise SD1, SDXL and
    every inpainting model are epsilon, and SD2 defaults to v_prediction: the flagship SD 2.0-v / 2.1
    releases and most SD2 fine-tunes are 768-v models, and diffusers makes the same default (an SD2
    single file maps to stabilityai/stable-diffusion-2-1). Shapes cannot tell 512-base from 768-v (the
    networks are identical); `load_checkpoint`, which has the weights, refines this (`sd2_prediction`).
    """
    if isinstance(shapes, (str, os.PathLike)):
        path = Path(shapes)
        if path.is_dir():
            return detect_diffusers_folder(path)
        if path.suffix.lower() == ".safetensors":
            file_shapes, file_metadata = read_safetensors_header(path)
            arch = detect_architecture(file_shapes, metadata={**file_metadata, **(metadata or {})})
        else:
            state_dict, _ = load_state_dict_and_extras(path)
            arch = detect_architecture(state_dict, metadata=metadata)
        sidecar = sidecar_prediction_type(path)
        return dataclasses.replace(arch, prediction_type=sidecar) if sidecar else arch

    keys = list(shapes.keys())
    from modules.model_store import flux_files, sd3_files
    if flux_files.is_flux_transformer(keys):
        return ModelArch(family="flux", inpainting=False, prediction_type="flow")
    if sd3_files.is_sd3_transformer(keys):
        return ModelArch(family="sd3", inpainting=False, prediction_type="flow")
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

    prediction = explicit_prediction_type(keys, metadata)
    if prediction is None:
        prediction = "v_prediction" if family == "sd2" and not inpainting else "epsilon"
    return ModelArch(family=family, inpainting=inpainting, prediction_type=prediction)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def detect_diffusers_folder(folder: Path) -> ModelArch:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UnsupportedCheckpointError(f"{folder} is not a diffusers folder (no model_index.json).")
    index = read_json(index_path)
    class_name = str(index.get("_class_name", ""))
    if class_name in FLOW_PIPELINES:
        if index.get("transformer", [None])[0] is None:
            raise UnsupportedCheckpointError(f"{folder}: the {class_name} folder has no transformer.")
        return ModelArch(family=FLOW_PIPELINES[class_name], inpainting=False, prediction_type="flow")
    if not class_name.startswith("StableDiffusion") or "unet" not in index:
        raise UnsupportedCheckpointError(f"{folder} holds a {class_name or 'unknown'} pipeline, not Stable Diffusion.")
    unet = read_json(folder / "unet" / "config.json")
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
        text_config = read_json(text_encoder_config) if text_encoder_config.is_file() else {}
        # SD2's OpenCLIP-H encoder: 1024 wide, and exact GELU where SD1's OpenAI CLIP uses quick_gelu
        open_clip = text_config.get("hidden_act") == "gelu"
        family = "sd2" if open_clip or 1024 in (text_config.get("hidden_size"), cross_attention_dim) else "sd1"
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    prediction = "epsilon"
    if scheduler_config.is_file():
        prediction = read_json(scheduler_config).get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedCheckpointError(f"{folder}: prediction type {prediction!r} is not supported.")
    return ModelArch(family=family, inpainting=in_channels == 9, prediction_type=prediction)


def sd2_prediction(state_dict: Mapping[str, Any], global_step: int | None) -> str | None:
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


def load_state_dict_and_extras(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
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
    return load_state_dict_and_extras(path)[0]
