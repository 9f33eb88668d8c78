"""A training run's options: kohya sd-scripts' flag names for what both have, a TOML file with the same keys
(`--config_file`; flags given on the command line win), and the checks that refuse a run before any work
(each problem named; the CLI exits with 2). torch-free: the API and the UI validate with it at once."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "dreambooth", "embedding", "captioner")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("AdamW", "AdamW8bit", "SGD", "Adafactor", "Prodigy")
PRECISIONS = ("no", "fp16", "bf16")
CAPTIONER_OUTPUT_FORMATS = ("auto", "full", "trained")
# other names an option is known by (the API's JSON and the CLI): `--base` is the captioner method's spelling
ALIASES = {"base": "pretrained_model_name_or_path"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


class TrainConfigError(ValueError):
    """Options a run cannot start with; the message lists every problem."""


@dataclass
class TrainConfig:
    """Every option of a run (kohya's names where kohya has the option); `help` metadata documents each."""
    method: str = field(default="lora", metadata={"help": "lora, dreambooth, embedding or captioner"})
    pretrained_model_name_or_path: str = field(default="", metadata={
        "help": "the base model (also --base): a checkpoint file, a diffusers folder, or a name from the checkpoint "
                "list; for captioner a BLIP or BLIP-2 captioner of the Caption tab (its name or its folder)"})
    train_data_dir: str = field(default="", metadata={
        "help": "the images: kohya's N_token class sub-folders (N repeats; the words are the caption when an "
                "image has no caption file), or images directly"})
    reg_data_dir: str = field(default="", metadata={"help": "regularisation (class) images, same layout"})
    output_dir: str = field(default="", metadata={"help": "where the result goes (default: the model folders)"})
    output_name: str = field(default="", metadata={"help": "the file name of the result, without extension"})
    resolution: int = field(default=512, metadata={"help": "training resolution (side of a square bucket)"})
    enable_bucket: bool = field(default=False, metadata={"help": "aspect-ratio buckets instead of square crops"})
    min_bucket_reso: int = field(default=256, metadata={"help": "smallest bucket side"})
    max_bucket_reso: int = field(default=1024, metadata={"help": "largest bucket side"})
    bucket_reso_steps: int = field(default=64, metadata={"help": "bucket sides are multiples of this"})
    train_batch_size: int = field(default=1, metadata={"help": "images per step per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "steps summed before an update"})
    max_train_steps: int = field(default=0, metadata={"help": "updates to make (0: from max_train_epochs)"})
    max_train_epochs: int = field(default=0, metadata={"help": "epochs to run (when max_train_steps is 0)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "learning rate"})
    unet_lr: float = field(default=0.0, metadata={"help": "the UNet's learning rate (0: learning_rate)"})
    text_encoder_lr: float = field(default=0.0, metadata={
        "help": "the text encoders' learning rate (0: learning_rate)"})
    lr_scheduler: str = field(default="constant", metadata={"help": ", ".join(LR_SCHEDULERS)})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up steps of the schedule"})
    optimizer_type: str = field(default="AdamW", metadata={
        "help": "AdamW, SGD, Adafactor; Prodigy where prodigyopt is installed; AdamW8bit where bitsandbytes works"})
    network_dim: int = field(default=8, metadata={"help": "LoRA rank"})
    network_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    network_train_unet_only: bool = field(default=False, metadata={"help": "LoRA on the UNet only"})
    network_train_text_encoder_only: bool = field(default=False, metadata={"help": "LoRA on the text encoders only"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "dreambooth without LoRA: fine-tune the text encoder too"})
    full_fine_tune: bool = field(default=False, metadata={
        "help": "dreambooth: fine-tune the whole UNet (and a single-file checkpoint out) instead of a LoRA"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    cache_latents: bool = field(default=False, metadata={"help": "encode each image with the VAE once"})
    cache_latents_to_disk: bool = field(default=False, metadata={
        "help": "keep the cached latents on disk (DATA/.latent_cache, reused by later runs on the same images)"})
    cache_text_encoder_outputs: bool = field(default=False, metadata={
        "help": "SDXL: encode each caption once (frozen text encoders and fixed captions only)"})
    min_snr_gamma: float = field(default=0.0, metadata={"help": "min-SNR loss weighting (0: off; 5 is usual)"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (about 0.1 for darker/brighter)"})
    caption_extension: str = field(default=".txt", metadata={"help": "caption files' extension"})
    shuffle_caption: bool = field(default=False, metadata={"help": "shuffle the comma-separated tags"})
    keep_tokens: int = field(default=0, metadata={"help": "tags at the start kept in place when shuffling"})
    caption_dropout_rate: float = field(default=0.0, metadata={"help": "share of steps with an empty caption"})
    seed: int = field(default=42, metadata={"help": "seed of data order, noise and timesteps"})
    save_every_n_steps: int = field(default=0, metadata={"help": "save the result every N steps (0: off)"})
    save_every_n_epochs: int = field(default=0, metadata={"help": "save the result every N epochs (0: off)"})
    save_state: bool = field(default=False, metadata={"help": "save a resumable state with every save"})
    resume: str = field(default="", metadata={"help": "a state folder to continue from"})
    sample_prompts: str = field(default="", metadata={
        "help": "a file of prompts (kohya's --n --w --h --d --l --s --ss options per line)"})
    sample_every_n_steps: int = field(default=0, metadata={"help": "sample images every N steps"})
    sample_every_n_epochs: int = field(default=0, metadata={"help": "sample images every N epochs"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class (prior) images' loss"})
    class_prompt: str = field(default="", metadata={"help": "dreambooth: the class prompt, e.g. 'a photo of a dog'"})
    num_class_images: int = field(default=0, metadata={
        "help": "dreambooth: class images to generate with the base model when reg_data_dir has fewer"})
    clip_skip: int = field(default=1, metadata={"help": "text encoder layer to train on (A1111's Clip skip)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    token_string: str = field(default="", metadata={"help": "embedding: the word to train (default: output_name)"})
    init_word: str = field(default="*", metadata={"help": "embedding: the word its vectors start from"})
    num_vectors_per_token: int = field(default=1, metadata={"help": "embedding: vectors of the embedding"})
    caption_missing_with: str = field(default="", metadata={
        "help": "caption images without a caption file first, with this captioner (a Caption tab name)"})
    val_split: float = field(default=0.0, metadata={
        "help": "captioner: share of the captioned images held out for the evaluation runs (0: none)"})
    val_data_dir: str = field(default="", metadata={
        "help": "captioner: a folder of captioned images to evaluate on instead of a split"})
    train_vision_encoder: bool = field(default=False, metadata={
        "help": "captioner, BLIP v1: train the vision encoder too (BLIP-2's always stays frozen)"})
    lora_language_model: bool = field(default=False, metadata={
        "help": "captioner, BLIP-2: LoRA layers (network_dim, network_alpha) on the frozen language model too"})
    eval_every_n_epochs: int = field(default=1, metadata={
        "help": "captioner: evaluate after every N epochs (0: only before and at the end)"})
    eval_num_beams: int = field(default=3, metadata={"help": "captioner: beams of the evaluation captions"})
    eval_max_length: int = field(default=30, metadata={
        "help": "captioner: at most this many new tokens per evaluation caption"})
    eval_examples: int = field(default=4, metadata={
        "help": "captioner: example captions kept (reference vs before vs now)"})
    output_format: str = field(default="auto", metadata={
        "help": "captioner: full (a whole transformers folder), trained (only what trained, combined with the "
                "base at load time) or auto (full for bases up to 2 GiB of weights)"})
    memory_budget_mb: float = field(default=0.0, metadata={
        "help": "captioner: refuse a run whose estimated memory exceeds this (0: the device's memory)"})
    run_dir: str = field(default="", metadata={"help": "the run's folder (config, log, states, samples)"})
    models_dir: str = field(default="", metadata={"help": "the models folder (checkpoint names, LoRA output)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})

    # -- TOML ---------------------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The run's config as TOML (enough to reproduce it with --config_file)."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{f.name} = {text}")
        return "\n".join(lines) + "\n"

    @property
    def is_lora(self) -> bool:
        return self.method == "lora" or (self.method == "dreambooth" and not self.full_fine_tune)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _types(name: str):
    default = FIELDS[name].default
    return type(default)


def parser(method: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modules.train" + (f" {method}" if method else ""),
                                description="Train a LoRA, a DreamBooth model, a textual inversion embedding or a "
                                            "BLIP / BLIP-2 captioner.")
    p.add_argument("--config_file", help="a TOML file with these options' names as keys (flags given here win)")
    for name, f in FIELDS.items():
        if name == "method":
            continue
        kind = _types(name)
        flags = [f"--{name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == name]
        if kind is bool:
            p.add_argument(*flags, dest=name, action="store_true", default=None, help=f.metadata.get("help"))
        else:
            p.add_argument(*flags, dest=name, type=kind, default=None, help=f.metadata.get("help"))
    return p


def parse_args(argv: list[str]) -> TrainConfig:
    """`METHOD [flags]` -> a checked TrainConfig; TrainConfigError naming unknown flags or bad values."""
    if not argv or argv[0] not in METHODS:
        raise TrainConfigError(f"the first word must be one of {', '.join(METHODS)} (python -m modules.train "
                               "lora --help)")
    method, rest = argv[0], argv[1:]
    p = parser(method)
    known, unknown = p.parse_known_args(rest)
    if unknown:
        raise TrainConfigError(f"unknown options: {' '.join(unknown)} (python -m modules.train {method} --help)")
    values: dict[str, Any] = {}
    if known.config_file:
        values.update(read_toml(Path(known.config_file)))
    values.update({k: v for k, v in vars(known).items() if v is not None and k != "config_file"})
    return from_dict({**values, "method": method})


def _unalias(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for alias, name in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if out.get(name) not in (None, "", value):
                raise TrainConfigError(f"{alias} and {name} name the same option: give one")
            out[name] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainConfigError(f"cannot read the config file {path}: {e}") from None
    data = _unalias(data)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise TrainConfigError(f"unknown options in {path.name}: {', '.join(unknown)}")
    return data


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from option values (the API's JSON, the UI's form); unknown keys and wrong types are named."""
    values = _unalias(values)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TrainConfigError(f"unknown options: {', '.join(unknown)}")
    problems, kwargs = [], {}
    for name, value in values.items():
        kind = _types(name)
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise TypeError
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError):
            problems.append(f"{name} must be a {kind.__name__}, got {value!r}")
            continue
        kwargs[name] = value
    if problems:
        raise TrainConfigError("; ".join(problems))
    return check(TrainConfig(**kwargs))


def check(cfg: TrainConfig) -> TrainConfig:
    """The numbers and names a run cannot start with (what needs the disk or a model is checked by `plan`)."""
    problems = []
    if cfg.method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}")
    if not cfg.pretrained_model_name_or_path:
        problems.append("pretrained_model_name_or_path: name the base model")
    if not cfg.train_data_dir:
        problems.append("train_data_dir: name the folder of training images")
    if not cfg.output_name or not NAME_RE.match(cfg.output_name) or "/" in cfg.output_name or "\\" in cfg.output_name:
        problems.append(f"output_name must be a plain file name (letters, digits, space, . _ -), got {cfg.output_name!r}")
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "network_dim", "bucket_reso_steps",
                "num_vectors_per_token", "clip_skip")
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_train_steps", "max_train_epochs", "save_every_n_steps", "save_every_n_epochs",
                 "sample_every_n_steps", "sample_every_n_epochs", "lr_warmup_steps", "keep_tokens",
                 "num_class_images"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.max_train_steps == 0 and cfg.max_train_epochs == 0:
        problems.append("give max_train_steps or max_train_epochs (steps 0 trains nothing)")
    for name in ("learning_rate", "unet_lr", "text_encoder_lr", "network_alpha", "min_snr_gamma", "noise_offset",
                 "prior_loss_weight", "max_grad_norm"):
        value = getattr(cfg, name)
        if math.isnan(value) or value < 0:
            problems.append(f"{name} must not be negative, got {value}")
    if cfg.learning_rate == 0:
        problems.append("learning_rate must be above 0")
    if not 0 <= cfg.caption_dropout_rate < 1:
        problems.append("caption_dropout_rate must be in [0, 1)")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
    if cfg.optimizer_type not in OPTIMIZERS:
        problems.append(f"optimizer_type must be one of {', '.join(OPTIMIZERS)}")
    if cfg.mixed_precision not in PRECISIONS:
        problems.append(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        problems.append("network_train_unet_only and network_train_text_encoder_only exclude each other")
    if cfg.enable_bucket and not cfg.min_bucket_reso <= cfg.resolution <= cfg.max_bucket_reso:
        problems.append("resolution must lie between min_bucket_reso and max_bucket_reso")
    if cfg.method == "dreambooth" and cfg.num_class_images and not cfg.class_prompt:
        problems.append("num_class_images needs a class_prompt to generate them with")
    if cfg.method != "dreambooth" and (cfg.full_fine_tune or cfg.train_text_encoder):
        problems.append("full_fine_tune and train_text_encoder are dreambooth options")
    problems += _captioner_problems(cfg)
    if problems:
        raise TrainConfigError("; ".join(problems))
    return cfg


# the options of the image-generation methods that a captioner run would silently ignore, and the other way round
NOT_FOR_CAPTIONER = ("reg_data_dir", "enable_bucket", "unet_lr", "text_encoder_lr", "network_train_unet_only",
                     "network_train_text_encoder_only", "cache_latents", "cache_latents_to_disk",
                     "cache_text_encoder_outputs", "min_snr_gamma", "noise_offset", "shuffle_caption",
                     "caption_dropout_rate", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
                     "class_prompt", "num_class_images", "token_string", "num_vectors_per_token",
                     "caption_missing_with")
CAPTIONER_ONLY = ("val_split", "val_data_dir", "train_vision_encoder", "lora_language_model", "output_format",
                  "memory_budget_mb", "eval_num_beams", "eval_max_length", "eval_examples", "eval_every_n_epochs")


def _captioner_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    defaults = TrainConfig()
    if cfg.method != "captioner":
        changed = [n for n in CAPTIONER_ONLY if getattr(cfg, n) != getattr(defaults, n)]
        if changed:
            problems.append(f"{', '.join(changed)}: captioner options (python -m modules.train captioner)")
        return problems
    changed = [n for n in NOT_FOR_CAPTIONER if getattr(cfg, n) != getattr(defaults, n)]
    if changed:
        problems.append(f"{', '.join(changed)}: not options of a captioner run (python -m modules.train captioner "
                        "--help lists them)")
    if math.isnan(cfg.val_split) or not 0 <= cfg.val_split < 1:
        problems.append(f"val_split must be in [0, 1), got {cfg.val_split}")
    if cfg.val_split and cfg.val_data_dir:
        problems.append("give val_split (a held-out share) or val_data_dir (a folder of its own), not both")
    if cfg.output_format not in CAPTIONER_OUTPUT_FORMATS:
        problems.append(f"output_format must be one of {', '.join(CAPTIONER_OUTPUT_FORMATS)}")
    for name in ("eval_num_beams", "eval_max_length"):
        if not 1 <= getattr(cfg, name) <= (16 if name == "eval_num_beams" else 512):
            problems.append(f"{name} must be 1..{16 if name == 'eval_num_beams' else 512}, got {getattr(cfg, name)}")
    for name in ("eval_examples", "eval_every_n_epochs", "memory_budget_mb"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not math.isfinite(cfg.memory_budget_mb):
        problems.append(f"memory_budget_mb must be a number of MB, got {cfg.memory_budget_mb}")
    return problems
