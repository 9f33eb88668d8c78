"""What a run trains and what it writes: LoRA layers from peft on the UNet and the text encoder(s), and the files
the rest of the world loads -- a kohya-layout LoRA with kohya's `ss_*` metadata (peft's weights through diffusers'
own PEFT -> kohya converter), a single-file checkpoint in the LDM layout for a full DreamBooth, and an A1111
embedding. Every file is written atomically (a temp file renamed into place)."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

from modules.core.fileio import atomic_open
from modules.model_store import ldm_convert

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def add_lora(model, rank: int, alpha: float, targets: list[str]):
    """peft LoRA layers on `model`'s target Linear layers (B starts at zero: no effect until trained); only they
    require grad."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    return inject_adapter_in_model(config, model)


def lora_parameters(model) -> list:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def _text_model_key(key: str) -> str:
    """transformers 5 names CLIP's modules without the `text_model.` level that kohya's names carry."""
    return key if key.startswith("text_model.") else "text_model." + key


def kohya_state_dict(parts: dict[str, Any], family: str, alpha: float) -> dict:
    """kohya-layout tensors from peft-injected models: `parts` maps "unet" / "text_encoder" / "text_encoder_2"
    to a model. SD1/SD2 name the text encoder `lora_te_`, SDXL `lora_te1_`/`lora_te2_` and its UNet modules by
    their LDM names, as kohya's scripts write them."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state: dict = {}
    for prefix, model in parts.items():
        state = get_peft_model_state_dict(model)
        for key, tensor in state.items():
            if prefix == "unet":
                if family == "sdxl":
                    module, _, tail = key.partition(".lora_")
                    key = ldm_convert.unet_key_to_ldm(module + ".weight", dict(model.config)).removesuffix(
                        ".weight") + ".lora_" + tail
            else:
                key = _text_model_key(key)
            peft_state[f"{prefix}.{key}"] = tensor.detach().float().cpu().contiguous()
    kohya = convert_state_dict_to_kohya(peft_state)
    out = {}
    for key, tensor in kohya.items():
        if family != "sdxl" and key.startswith("lora_te1_"):
            key = "lora_te_" + key.removeprefix("lora_te1_")
        if key.endswith(".alpha"):
            tensor = torch_tensor(alpha)  # the converter writes alpha = rank; kohya keeps the run's alpha
        out[key] = tensor
    return out


def torch_tensor(value: float):
    import torch
    return torch.tensor(float(value))


def addnet_hash(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: over the file safetensors would write with only
    the `ss_*` metadata, the sha256 of everything after the header, and the legacy 8-hex hash of 64 KiB at 1 MiB."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = struct.unpack("<Q", data[:8])[0]
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
    with atomic_open(path, "wb") as f:
        f.write(data)


def lora_metadata(cfg, plan, family: str, base_info, *, step: int, epoch: int, started_at: float,
                  v_parameterization: bool = False) -> dict[str, str]:
    """kohya's training metadata (`ss_*`) for a LoRA file."""
    try:
        base_hash = base_info.sha256
    except OSError:
        base_hash = ""
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(v_parameterization),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(float(cfg.network_alpha)),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_num_train_images": str(plan.num_train_images),
        "ss_num_reg_images": str(plan.num_reg_images),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.unet_lr or cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": cfg.optimizer_type,
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_seed": str(cfg.seed),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_min_bucket_reso": str(cfg.min_bucket_reso),
        "ss_max_bucket_reso": str(cfg.max_bucket_reso),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(k), "count": v}
                                                  for i, (k, v) in enumerate(sorted(plan.buckets().items()))}}),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_network_train_unet_only": str(cfg.network_train_unet_only),
        "ss_network_train_text_encoder_only": str(cfg.network_train_text_encoder_only),
        "ss_tag_frequency": json.dumps(plan.tag_frequency()),
        "ss_dataset_dirs": json.dumps(plan.dataset_dirs()),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_sd_model_name": base_info.name,
        "ss_new_sd_model_hash": base_hash,
        "ss_output_name": cfg.output_name,
        "ss_training_comment": f"trained by the studio's {cfg.method} trainer",
    }
    return meta


def save_lora(path: Path, parts: dict, family: str, cfg, metadata: dict[str, str]) -> dict:
    tensors = kohya_state_dict(parts, family, cfg.network_alpha)
    model_hash, legacy = addnet_hash(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    write_safetensors(path, tensors, metadata)
    return metadata


def save_checkpoint(path: Path, components: dict, base_metadata: dict[str, str], extra: dict[str, str]) -> None:
    """A full fine-tune as one single file in the LDM layout (the project's converter); a base that carried its
    diffusers configs in its metadata passes them on, so the new file loads the same way."""
    state = ldm_convert.ldm_state_dict(components)
    metadata = dict(extra)
    if "diffusers_configs" in base_metadata:
        metadata["diffusers_configs"] = base_metadata["diffusers_configs"]
    write_safetensors(path, state, metadata)


def save_embedding(path: Path, vectors: list, family: str, metadata: dict[str, str]) -> None:
    """A1111's safetensors embedding layout: `emb_params` (SD1/SD2), `clip_l` + `clip_g` (SDXL)."""
    if family == "sdxl":
        tensors = {"clip_l": vectors[0], "clip_g": vectors[1]}
    else:
        tensors = {"emb_params": vectors[0]}
    write_safetensors(path, {k: v.detach().float().cpu() for k, v in tensors.items()}, metadata)
