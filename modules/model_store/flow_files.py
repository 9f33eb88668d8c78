"""Loading FLUX.1 and SD3 single files (the rectified-flow families) into their pipelines' components.

The transformer is converted by the project's own tables (`flux_files`, `sd3_files`: BFL's and Stability AI's
layouts, sizes from the shapes); the text encoders and VAE a file holds (ComfyUI's and SAI's all-in-one files)
are built here, and the ones it lacks are named in `LoadedCheckpoint.separate_parts` for the lease to add from the
text-encoder and VAE folders, where the manager shares each file between checkpoints
(`sd_pipelines.use_separate_parts`). T5's tokenizer is never in a file and always comes that way.

Weights are cast to the compute dtype, except that the layers a file stores in fp8 keep their fp8 weights in
memory and are cast up as they run (`text_encoders.keep_fp8_layers`): half the memory of fp16, the pixels of the
weights cast up. Configs: a file's own `diffusers_configs` metadata (the tiny test files), else the shipped
sd_configs/flux or sd_configs/sd3 folder (VAE, CLIP and scheduler); the transformer's and T5's from the shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modules.model_store.checkpoint_files import (
    DIFFUSERS_CONFIGS_METADATA_KEY,
    CheckpointError,
    ModelArch,
    read_json,
)


@dataclass(frozen=True)
class FlowFileSpec:
    name: str  # for messages
    layout: Any  # flux_files or sd3_files: split_parts, transformer_config, to_diffusers
    transformer_class: str  # the diffusers class
    # file part -> (component, text-encoder kind, CLIP with a projection, config component); T5 has no config
    encoders: dict[str, tuple[str, str, bool, str]]
    clip_tokenizers: dict[str, str]  # tokenizer component -> clip_tokenizer pad token ("" for the default)
    t5_tokenizer: str  # the component T5's tokenizer fills


def _spec(family: str) -> FlowFileSpec:
    from modules.model_store import flux_files, sd3_files
    if family == "flux":
        return FlowFileSpec("FLUX.1", flux_files, "FluxTransformer2DModel",
                            {"clip_l": ("text_encoder", "clip_l", False, "text_encoder"),
                             "t5xxl": ("text_encoder_2", "t5", False, "")},
                            {"tokenizer": ""}, "tokenizer_2")
    return FlowFileSpec("Stable Diffusion 3", sd3_files, "SD3Transformer2DModel",
                        {"clip_l": ("text_encoder", "clip_l", True, "text_encoder"),
                         "clip_g": ("text_encoder_2", "clip_g", True, "text_encoder_2"),
                         "t5xxl": ("text_encoder_3", "t5", False, "")},
                        {"tokenizer": "", "tokenizer_2": "!"}, "tokenizer_3")


def load_flow_file(info, arch: ModelArch, state_dict: dict, metadata: dict, torch_dtype, vae_dtype):
    """A FLUX.1 or SD3 single file (its tensors in `state_dict`, which is emptied) -> `LoadedCheckpoint`."""
    import diffusers
    from accelerate import init_empty_weights

    from modules.model_store import text_encoders
    from modules.model_store.loading import (
        LoadedCheckpoint,
        _assert_fully_loaded,
        _finish,
        materialized_config_dir,
    )
    from modules.model_store.sd_vae import _vae_from_state_dict
    from modules.prompting.clip_tokenizer import clip_tokenizer

    spec, source = _spec(arch.family), info.name
    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    config_dir = materialized_config_dir(configs, arch) if configs else arch.config_dir
    parts = spec.layout.split_parts(state_dict)
    state_dict.clear()
    stage = "transformer"
    try:
        config = spec.layout.transformer_config(parts["transformer"])
        weights = spec.layout.to_diffusers(parts.pop("transformer"))
        file_dtypes = {k: v.dtype for k, v in weights.items()}
        with init_empty_weights():
            transformer = getattr(diffusers, spec.transformer_class)(**config)
        transformer.load_state_dict({k: v.to(torch_dtype) for k, v in weights.items()}, strict=True, assign=True)
        del weights
        text_encoders.keep_fp8_layers(transformer, file_dtypes, torch_dtype)
        components: dict[str, Any] = {"transformer": transformer}
        components.update({name: clip_tokenizer(pad) if pad else clip_tokenizer()
                           for name, pad in spec.clip_tokenizers.items()})
        for part, (component, kind, projection, config_name) in spec.encoders.items():
            if part not in parts:
                continue
            stage = f"{text_encoders.KIND_NAMES[kind]} text encoder"
            if kind == "t5":
                components[component] = text_encoders.load_t5(parts.pop(part), torch_dtype, source)
            else:
                clip_config = text_encoders.clip_config(kind, metadata, config_name)
                components[component] = text_encoders.load_clip(parts.pop(part), clip_config, torch_dtype, source,
                                                                 projection=projection)
        if "vae" in parts:
            stage = "VAE"
            components["vae"] = _vae_from_state_dict(parts.pop("vae"), config_dir, vae_dtype)
            _assert_fully_loaded(components["vae"], stage, source)
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as e:
        raise CheckpointError(f"Cannot load the {stage} of {source} as a {spec.name} file: {e}") from e
    scheduler_config = read_json(config_dir / "scheduler" / "scheduler_config.json")
    if arch.family == "flux" and not config["guidance_embeds"]:
        scheduler_config.update(shift=1.0, use_dynamic_shifting=False)  # FLUX.1-schnell's fixed shift of 1
    components["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    separate = {component: (kind, projection) for component, kind, projection, _ in spec.encoders.values()
                if component not in components}
    if "vae" not in components:
        separate["vae"] = ("vae", False)
    separate[spec.t5_tokenizer] = ("t5_tokenizer", False)  # never in a file
    return LoadedCheckpoint(info=info, arch=arch, components=_finish(components), config_dir=config_dir,
                            separate_parts=separate)
