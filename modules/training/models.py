"""The base model of a run: finding it (a checkpoint file, a diffusers folder or a name from the checkpoint list),
loading it with the model store's own loader (the same weights generation uses), and encoding captions the way
generation encodes prompts (Clip skip, SDXL's penultimate layers and pooled output)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.model_store import checkpoint_files, checkpoints, loading
from modules.training.config import TrainConfig, TrainConfigError

CHECKPOINT_SUBDIR = "Stable-diffusion"


def checkpoint_registry(cfg: TrainConfig) -> checkpoints.CheckpointRegistry:
    dirs = [Path(cfg.models_dir) / CHECKPOINT_SUBDIR] if cfg.models_dir else []
    extra = []
    given = Path(cfg.pretrained_model_name_or_path).expanduser()
    if given.is_file() or (given / "model_index.json").is_file():
        extra.append(given)
    return checkpoints.CheckpointRegistry(dirs, extra)


def find_base(cfg: TrainConfig) -> checkpoints.CheckpointInfo:
    """The CheckpointInfo the run's `pretrained_model_name_or_path` names, or TrainConfigError naming what exists."""
    registry = checkpoint_registry(cfg)
    registry.refresh()
    given = Path(cfg.pretrained_model_name_or_path).expanduser()
    if given.exists() and not (given.is_file() or (given / "model_index.json").is_file()):
        raise TrainConfigError(f"base model {cfg.pretrained_model_name_or_path}: neither a checkpoint file nor a "
                               "diffusers folder (no model_index.json)")
    text = given.name if given.exists() else cfg.pretrained_model_name_or_path
    info = registry.find(str(given.absolute())) if given.exists() else None
    info = info or registry.find(text)
    if info is None:
        names = ", ".join(c.name for c in registry.list()) or "none"
        raise TrainConfigError(f"base model {cfg.pretrained_model_name_or_path!r} not found (checkpoints: {names})")
    return info


def family_of(info: checkpoints.CheckpointInfo) -> str:
    """sd1, sd2 or sdxl, read from the weights (no full load); TrainConfigError for what cannot be trained."""
    try:
        arch = checkpoint_files.detect_architecture(info.filename)
    except checkpoint_files.CheckpointError as e:
        raise TrainConfigError(f"base model {info.name}: {e}") from None
    if arch.family not in ("sd1", "sd2", "sdxl"):
        raise TrainConfigError(f"base model {info.name}: {arch.family} checkpoints cannot be trained here")
    if arch.inpainting:
        raise TrainConfigError(f"base model {info.name}: an inpainting checkpoint; train on its base model")
    return arch.family


@dataclass
class BaseModel:
    info: checkpoints.CheckpointInfo
    family: str
    components: dict[str, Any]
    config_dir: Path

    @property
    def unet(self):
        return self.components["unet"]

    @property
    def vae(self):
        return self.components["vae"]

    @property
    def encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs: one for SD1/SD2, two for SDXL."""
        pairs = [(self.components["tokenizer"], self.components["text_encoder"])]
        if "text_encoder_2" in self.components:
            pairs.append((self.components["tokenizer_2"], self.components["text_encoder_2"]))
        return pairs

    @property
    def prediction_type(self) -> str:
        return self.components["scheduler"].config.get("prediction_type", "epsilon")


def load_base(info: checkpoints.CheckpointInfo, family: str) -> BaseModel:
    import torch

    loaded = loading.load_checkpoint(info, torch_dtype=torch.float32)
    return BaseModel(info=info, family=family, components=dict(loaded.components), config_dir=loaded.config_dir)


def tokenize(tokenizer, captions: list[str]):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(base: BaseModel, encoders: list, captions: list[str], clip_skip: int, device) -> tuple[Any, Any]:
    """(encoder_hidden_states, pooled or None) for the captions, as generation conditions on a prompt:
    SD1/SD2 the last layer (or the one Clip skip picks, through the final layer norm), SDXL the penultimate
    layer of both encoders concatenated and the second encoder's projected pooled output."""
    import torch

    if base.family != "sdxl":
        tokenizer, encoder = encoders[0]
        ids = tokenize(tokenizer, captions).to(device)
        if clip_skip <= 1:
            return encoder(ids)[0], None
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-clip_skip]
        model = getattr(encoder, "module", encoder)  # DDP wraps what it trains
        model = getattr(model, "text_model", model)
        return model.final_layer_norm(hidden), None
    hidden_states, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden_states.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
    return torch.cat(hidden_states, dim=-1), pooled
