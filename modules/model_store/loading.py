"""Loading a checkpoint: a single file or a diffusers folder -> the keyword arguments of
`StableDiffusionPipeline(...)` / `StableDiffusionXLPipeline(...)`, fully offline, with the shipped configs
(or the ones a file carries in its `diffusers_configs` metadata) and the shipped CLIP tokenizer.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.model_store.checkpoint_files import (
    DIFFUSERS_CONFIGS_METADATA_KEY,
    CheckpointError,
    ModelArch,
    detect_architecture,
    detect_diffusers_folder,
    explicit_prediction_type,
    load_state_dict_and_extras,
    read_json,
    read_safetensors_metadata,
    sd2_prediction,
    sidecar_prediction_type,
)
from modules.model_store.checkpoints import CheckpointInfo

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


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
    # components the file does not hold -> (what supplies them at lease time: "clip_l", "clip_g", "t5", "vae",
    # "t5_tokenizer"; whether a CLIP needs its projection), see sd_pipelines.use_separate_parts
    separate_parts: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)


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


def materialized_config_dir(configs_json: str, arch: ModelArch) -> Path:
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
    return materialized_config_dir(configs, arch) if configs else arch.config_dir


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

    config = read_json(config_dir / subfolder / "scheduler_config.json")
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise CheckpointError(f"Unknown scheduler class {config.get('_class_name')!r} in {config_dir}")
    return cls.from_config(config, prediction_type=prediction_type)


def _tokenizers(arch: ModelArch) -> dict[str, Any]:
    from modules.prompting.clip_tokenizer import clip_tokenizer

    if arch.family == "sd1":
        return {"tokenizer": clip_tokenizer()}
    if arch.family == "sd2":
        return {"tokenizer": clip_tokenizer("!")}
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer("!")}


def pipeline_extras(arch: ModelArch) -> dict[str, Any]:
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
    state_dict, extras = load_state_dict_and_extras(info.filename)
    _normalize_ldm_keys(state_dict)
    metadata = extras.get("metadata", {})
    arch = detect_architecture(state_dict, metadata=metadata)
    if arch.is_flow:  # FLUX.1 and SD3 single files: flow_files
        from modules.model_store.flow_files import load_flow_file
        _install_warning_filter()
        return load_flow_file(info, arch, state_dict, metadata, torch_dtype, vae_dtype)
    sidecar = sidecar_prediction_type(info.filename)
    if sidecar:
        arch = ModelArch(arch.family, arch.inpainting, sidecar)
    elif arch.family == "sd2" and not arch.inpainting and explicit_prediction_type(state_dict.keys(), metadata) is None:
        refined = sd2_prediction(state_dict, extras.get("global_step"))
        if refined:
            arch = ModelArch(arch.family, arch.inpainting, refined)

    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    config_dir = materialized_config_dir(configs, arch) if configs else arch.config_dir
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
    components.update(pipeline_extras(arch))
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


def _load_flow_folder(info: CheckpointInfo, arch: ModelArch, torch_dtype, vae_dtype) -> LoadedCheckpoint:
    """A FLUX or SD3 diffusers folder: every component its pipeline class reads (transformer, VAE, CLIP and T5
    encoders, tokenizers, flow-matching scheduler), the VAE in `vae_dtype`."""
    import diffusers

    folder = Path(info.filename)
    cls = getattr(diffusers, {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[arch.family])
    try:
        pipe = cls.from_pretrained(folder, dtype=torch_dtype, local_files_only=True,
                                   variant=_variant(folder / "transformer"))
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as e:
        raise CheckpointError(f"Cannot load diffusers folder {info.name}: {e}") from e
    components = {k: v for k, v in pipe.components.items() if v is not None}
    if components["vae"].dtype != vae_dtype:
        components["vae"] = components["vae"].to(vae_dtype)
    return LoadedCheckpoint(info=info, arch=arch, components=_finish(components), config_dir=folder)


def _load_diffusers_folder(info: CheckpointInfo, torch_dtype, vae_dtype) -> LoadedCheckpoint:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(info.filename)
    arch = detect_diffusers_folder(folder)
    if arch.is_flow:
        return _load_flow_folder(info, arch, torch_dtype, vae_dtype)
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
    components.update(pipeline_extras(arch))
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
    folder is the shipped modules/model_store/sd_configs/<arch>, or one built from the file's `diffusers_configs`
    metadata (see `materialized_config_dir`). Diffusers folders load with `from_pretrained`.
    Tokenizers come from `clip_tokenizer()` unless a diffusers folder has its own.
    """
    import torch

    torch_dtype = torch_dtype or torch.float32
    vae_dtype = vae_dtype or torch_dtype
    if info.is_diffusers_folder:
        return _load_diffusers_folder(info, torch_dtype, vae_dtype)
    return _load_single_file(info, torch_dtype, vae_dtype)
