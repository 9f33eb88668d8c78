"""Everything a run is checked against before any work (torch-free, so the server and the UI can answer at once):
the base model exists and can be trained, the data folder holds images, the numbers fit the dataset, the options
fit the model family and the installed packages, and where the results go."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

from modules.model_store.checkpoints import CheckpointInfo
from modules.training import dataset as datasets
from modules.training import models
from modules.training.config import TrainConfig, TrainConfigError

OUTPUT_SUBDIRS = {"lora": "Lora", "checkpoint": "Stable-diffusion", "embedding": "embeddings"}
SDXL_ONLY = ("cache_text_encoder_outputs",)


@dataclass
class RunPlan:
    cfg: TrainConfig
    base: CheckpointInfo
    family: str
    data: datasets.DatasetPlan
    world_size: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    output_path: Path
    run_dir: Path

    @property
    def global_batch(self) -> int:
        return self.cfg.train_batch_size * self.world_size

    @property
    def output_kind(self) -> str:
        if self.cfg.method == "embedding":
            return "embedding"
        return "lora" if self.cfg.is_lora else "checkpoint"

    def summary(self) -> dict:
        return {"base_model": self.base.name, "family": self.family, "method": self.cfg.method,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "epochs": math.ceil(self.total_steps / self.steps_per_epoch) if self.steps_per_epoch else 0,
                "samples_per_step": self.global_batch * self.cfg.gradient_accumulation_steps,
                "output": str(self.output_path), "run_dir": str(self.run_dir),
                "dataset": datasets.summary(self.data, self.global_batch)}


def output_folder(cfg: TrainConfig, kind: str) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    if cfg.models_dir:
        return Path(cfg.models_dir) / OUTPUT_SUBDIRS[kind]
    raise TrainConfigError("output_dir: say where the result goes (or give models_dir)")


def default_run_dir(cfg: TrainConfig, output: Path) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else output.parent / "training_runs" / cfg.output_name


def _check_optimizer(cfg: TrainConfig) -> None:
    needs = {"Prodigy": ("prodigyopt", "pip install prodigyopt"),
             "AdamW8bit": ("bitsandbytes", "pip install bitsandbytes (it needs a CUDA GPU)")}
    if cfg.optimizer_type in needs:
        module, how = needs[cfg.optimizer_type]
        if importlib.util.find_spec(module) is None:
            raise TrainConfigError(f"optimizer_type {cfg.optimizer_type} needs the {module} package, which is not "
                                   f"installed: {how}, or choose AdamW, SGD or Adafactor")


def make_plan(cfg: TrainConfig, world_size: int = 1, *, class_images_made: bool = False) -> RunPlan:
    """Check a run against the disk and the model; TrainConfigError / DatasetError name the problem.
    `class_images_made`: reg_data_dir is the folder of the class images generated for num_class_images."""
    if cfg.method == "captioner":  # a BLIP / BLIP-2 captioner, not a Stable Diffusion checkpoint
        from modules.training import captioner
        return captioner.make_plan(cfg, world_size)
    info = models.find_base(cfg)
    family = models.family_of(info)
    for name in SDXL_ONLY:
        if getattr(cfg, name) and family != "sdxl":
            raise TrainConfigError(f"{name} is an SDXL option; the base model {info.name} is {family}")
    if cfg.cache_text_encoder_outputs and (cfg.shuffle_caption or cfg.caption_dropout_rate or
                                           cfg.train_text_encoder or (cfg.is_lora and not cfg.network_train_unet_only)
                                           or cfg.method == "embedding"):
        raise TrainConfigError("cache_text_encoder_outputs needs fixed captions and frozen text encoders "
                               "(network_train_unet_only, no shuffle_caption, no caption_dropout_rate)")
    if cfg.reg_data_dir and cfg.num_class_images and not class_images_made:
        raise TrainConfigError("give reg_data_dir (your own class images) or num_class_images (generated), not both")
    if cfg.method == "embedding" and family == "sdxl" and cfg.clip_skip > 1:
        raise TrainConfigError("clip_skip is not used by SDXL embeddings")
    _check_optimizer(cfg)
    kind = "embedding" if cfg.method == "embedding" else ("lora" if cfg.is_lora else "checkpoint")
    folder = output_folder(cfg, kind)
    if folder.exists() and not folder.is_dir():
        raise TrainConfigError(f"output_dir {folder} is a file, not a folder")
    output = folder / f"{cfg.output_name}.safetensors"
    run_dir = default_run_dir(cfg, output)
    data = datasets.scan(cfg)
    global_batch = cfg.train_batch_size * world_size
    data.validate_batch(global_batch)
    batches = data.steps_per_epoch(global_batch)
    steps_per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    total = cfg.max_train_steps or cfg.max_train_epochs * steps_per_epoch
    return RunPlan(cfg=cfg, base=info, family=family, data=data, world_size=world_size, batches_per_epoch=batches,
                   steps_per_epoch=steps_per_epoch, total_steps=total, output_path=output, run_dir=run_dir)
