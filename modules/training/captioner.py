"""The `captioner` method: fine-tuning a BLIP-2 or BLIP v1 captioner on images with caption files beside them (the
folders LoRA training reads, `N_words` repeat folders included), with evaluation runs on a held-out split.

What trains: BLIP-2's Q-Former, its query tokens and the language projection (the vision encoder and the language
model stay frozen; `lora_language_model` adds peft LoRA layers to the language model's attention); BLIP v1's text
decoder (and with `train_vision_encoder` its vision encoder). The loop is the LoRA trainer's (`engine.Trainer`:
accelerate's mixed precision, gradient accumulation and DDP, deterministic data order, exact resume, states,
NaN/OOM handling); the loss is the language-modelling loss of the caption given the image (transformers' own, the
image tokens and the prompt masked), the caption a file's line (a random one where it has several, seeded by the
sample's place).

Evaluation: before training, after every `eval_every_n_epochs` epochs and at the end, the held-out images
(`val_split` of the captioned ones, or `val_data_dir`) are captioned the way the Caption tab captions (the
service's `generate_text`, beam search) and scored with modules/captioning/metrics.py (BLEU-1..4, ROUGE-L, CIDEr)
against their caption files' lines. Each evaluation is a progress line (`eval`), a row of RUN_DIR/eval.csv, and
RUN_DIR/eval_examples.json keeps a few captions (reference vs before training vs now).

Output (a folder in models/BLIP2 or models/BLIP, listed as a captioner at once): `output_format` full writes a
whole transformers folder (LoRA merged in); trained writes only the trained tensors (`trained.safetensors`, LoRA
pairs unmerged) with `captioner.json` naming the base, its sha256 and size -- the model manager combines them with
the base at load time (modules/captioning/models.py). auto: full for bases up to 2 GiB of weights.

Planning is torch-free (the server and the UI refuse bad input at once): the base must be a BLIP / BLIP-2
captioner, there must be caption files, enough images for the split, and the estimated memory (weights, gradients
and AdamW's moments of what trains, from the safetensors headers) must fit the budget.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modules.captioning import CaptionerRegistry, CaptionSettings, metrics
from modules.captioning.models import (
    KIND_BLIP,
    KIND_BLIP2,
    MANIFEST_FILE,
    TRAINED_WEIGHTS_FILE,
    CaptionerInfo,
    read_captioner_info,
    read_manifest,
    weight_files,
    weights_size,
)
from modules.core.fileio import atomic_folder, atomic_write_text
from modules.training import dataset as datasets
from modules.training import engine, outputs
from modules.training.config import TrainConfig, TrainConfigError
from modules.training.plan import RunPlan, _check_optimizer, default_run_dir

SUBDIRS = {KIND_BLIP2: "BLIP2", KIND_BLIP: "BLIP"}
FULL_MAX_BYTES = 2 * 2**30  # output_format auto: a whole folder up to this much base weight, else trained only
LORA_TARGETS = {"opt": ["q_proj", "k_proj", "v_proj", "out_proj"], "t5": ["q", "k", "v", "o"]}
CAPTION_MAX_TOKENS = 96  # a training caption's tokens at most (longer ones are cut)
EVAL_BATCH = 8
EVAL_TABLE = "eval.csv"
EVAL_EXAMPLES = "eval_examples.json"
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class CaptionerPlan(RunPlan):
    val: list = field(default_factory=list)  # the held-out ImageItems the evaluations caption
    val_source: str = ""  # "val_split 0.1", "val_data_dir DIR" or "" (no evaluation)
    output_format: str = "full"  # "full" or "trained"
    memory: dict = field(default_factory=dict)  # the estimate: params, trainable params, bytes, budget

    @property
    def output_kind(self) -> str:
        return "captioner"

    def summary(self) -> dict:
        out = super().summary()
        out.update({"val_images": len(self.val), "val_source": self.val_source, "output_format": self.output_format,
                    "memory_estimate_mb": round(self.memory.get("bytes", 0) / 2**20),
                    "trainable_params": self.memory.get("trainable_params", 0),
                    "total_params": self.memory.get("total_params", 0)})
        return out


def captioner_registry(cfg: TrainConfig) -> CaptionerRegistry:
    roots = [Path(cfg.models_dir) / sub for sub in ("BLIP2", "BLIP")] if cfg.models_dir else []
    return CaptionerRegistry(roots)


def find_base(cfg: TrainConfig) -> CaptionerInfo:
    """The captioner `pretrained_model_name_or_path` (`--base`) names -- a Caption-tab name or a folder -- or
    TrainConfigError saying what it is instead and which captioners exist."""
    text = cfg.pretrained_model_name_or_path
    registry = captioner_registry(cfg)
    given = Path(text).expanduser()
    info = registry.find(text)
    if info is None and given.is_dir():
        info = read_captioner_info(given)
        if info is not None and info.trained_from and not (given / "config.json").is_file():
            info = replace(info, base_path=Path("?"))  # trained tensors only: refused below
    if info is None:
        names = ", ".join(i.name for i in registry.list() if i.can_caption) or "none"
        what = ("a diffusers folder" if (given / "model_index.json").is_file() else
                "a checkpoint file" if given.is_file() or text.endswith((".safetensors", ".ckpt")) else "")
        raise TrainConfigError(f"base {text!r} is not a captioner{f' ({what})' if what else ''}: name a BLIP or "
                               f"BLIP-2 captioner of models/BLIP or models/BLIP2 (captioners: {names})")
    if not info.can_caption:
        raise TrainConfigError(f"base {info.name} is a {info.kind} model (image search), not a captioner: train a "
                               "BLIP or BLIP-2 captioner")
    if info.base_path is not None:
        raise TrainConfigError(f"base {info.name} is saved as trained weights over {info.trained_from}: train "
                               f"from {info.trained_from}, or from a whole-folder fine-tune (output_format full)")
    if not weight_files(info.path):
        raise TrainConfigError(f"base {info.name}: no weights (*.safetensors) in {info.path}")
    return info


def tensor_table(folder: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element) of every tensor in a folder's safetensors files (headers only)."""
    table: dict[str, tuple[tuple[int, ...], int]] = {}
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                table[name] = (tuple(entry["shape"]), _DTYPE_BYTES.get(entry["dtype"], 4))
    return table


def trained_prefixes(kind: str, cfg: TrainConfig) -> tuple[str, ...]:
    if kind == KIND_BLIP2:
        return ("qformer.", "query_tokens", "language_projection.")
    return ("text_decoder.",) + (("vision_model.",) if cfg.train_vision_encoder else ())


def estimate_memory(info: CaptionerInfo, cfg: TrainConfig, cast_frozen: bool) -> dict[str, int]:
    """Parameters, trainable parameters and the bytes a run needs (weights; gradients and AdamW's two moments of
    what trains in fp32; 10% for activations and buffers), read from the safetensors headers."""
    table = tensor_table(info.path)
    if not table:  # .bin weights only: from the file sizes (fp32 assumed)
        total = weights_size(info.path) // 4
        return {"total_params": total, "trainable_params": total, "bytes": int(1.1 * 16 * total)}
    prefixes = trained_prefixes(info.kind, cfg)
    total = trainable = 0
    frozen_bytes = 0
    for name, (shape, _) in table.items():
        n = math.prod(shape) if shape else 1
        total += n
        if name.startswith(prefixes):
            trainable += n
        else:
            frozen_bytes += n * (2 if cast_frozen else 4)
            if cfg.lora_language_model and name.startswith("language_model.") and len(shape) == 2 and any(
                    name.endswith(f".{t}.weight") for t in LORA_TARGETS.get(info.language_model, [])):
                trainable += cfg.network_dim * (shape[0] + shape[1])
    states = {"SGD": 2, "Adafactor": 2, "AdamW8bit": 2}.get(cfg.optimizer_type, 3)  # weights+grads(+moments)
    needed = int(1.1 * (frozen_bytes + (1 + states) * 4 * trainable))
    return {"total_params": total, "trainable_params": trainable, "bytes": needed}


def memory_budget(cfg: TrainConfig, device=None) -> tuple[int | None, str]:
    """(bytes, what they are) a run must fit: memory_budget_mb, else the GPU's memory (where torch is loaded and a
    GPU is there, or `device` is one), else the machine's RAM."""
    if cfg.memory_budget_mb:
        return int(cfg.memory_budget_mb * 2**20), f"the memory budget (memory_budget_mb {cfg.memory_budget_mb:g})"
    torch = sys.modules.get("torch")
    if cfg.device != "cpu" and torch is not None:
        try:
            if device is not None and getattr(device, "type", "") == "cuda":
                return int(torch.cuda.get_device_properties(device).total_memory), f"the memory of {device}"
            if device is None and torch.cuda.is_available():
                return int(torch.cuda.get_device_properties(0).total_memory), "the GPU's memory"
        except Exception:  # no usable GPU after all: the RAM is the budget
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's memory"
    except (ValueError, OSError, AttributeError):
        return None, ""


def check_memory(info: CaptionerInfo, cfg: TrainConfig, estimate: dict, device=None) -> None:
    budget, what = memory_budget(cfg, device)
    if budget is not None and estimate["bytes"] > budget:
        raise TrainConfigError(
            f"base {info.name} is too large for the memory budget: training it needs about "
            f"{estimate['bytes'] / 2**30:.1f} GiB ({estimate['total_params'] / 1e6:.1f}M parameters, "
            f"{estimate['trainable_params'] / 1e6:.1f}M of them trained), {what} is {budget / 2**30:.1f} GiB: choose "
            "a smaller captioner, mixed_precision fp16/bf16 with output_format trained, the SGD or Adafactor "
            "optimizer, or a larger memory_budget_mb")


def _split(items: list, share: float, seed: int) -> tuple[list, list]:
    """(train, held out): `share` of the images (at least one), drawn by the seed, each image whole (its repeats
    stay with it)."""
    ordered = sorted(items, key=lambda i: str(i.path))
    n_val = max(1, round(share * len(ordered)))
    held = set(random.Random(f"{seed}-val").sample(range(len(ordered)), n_val))
    return ([it for k, it in enumerate(ordered) if k not in held], [it for k, it in enumerate(ordered) if k in held])


def make_plan(cfg: TrainConfig, world_size: int = 1) -> CaptionerPlan:
    """Check a captioner run against the disk and the base; TrainConfigError / DatasetError name the problem."""
    try:
        return _make_plan(cfg, world_size)
    except (TrainConfigError, datasets.DatasetError):
        raise
    except (ValueError, OSError) as e:  # a path the OS refuses (a NUL byte, too long, no permission)
        raise TrainConfigError(f"a path of the options cannot be used: {e}") from None


def _make_plan(cfg: TrainConfig, world_size: int) -> CaptionerPlan:
    info = find_base(cfg)
    if cfg.lora_language_model and info.kind != KIND_BLIP2:
        raise TrainConfigError(f"lora_language_model is a BLIP-2 option; {info.name} is BLIP v1 (its text decoder "
                               "trains whole)")
    if cfg.lora_language_model and info.language_model not in LORA_TARGETS:
        raise TrainConfigError(f"lora_language_model: no LoRA targets known for a {info.language_model} language "
                               f"model (known: {', '.join(LORA_TARGETS)})")
    if cfg.train_vision_encoder and info.kind != KIND_BLIP:
        raise TrainConfigError(f"train_vision_encoder is a BLIP v1 option; BLIP-2's vision encoder ({info.name}) "
                               "stays frozen")
    _check_optimizer(cfg)
    base_bytes = weights_size(info.path)
    fmt = cfg.output_format if cfg.output_format != "auto" else ("full" if base_bytes <= FULL_MAX_BYTES else "trained")
    if cfg.output_dir:
        folder = Path(cfg.output_dir).expanduser()
    elif cfg.models_dir:
        folder = Path(cfg.models_dir) / SUBDIRS[info.kind]
    else:
        raise TrainConfigError("output_dir: say where the captioner goes (or give models_dir)")
    if folder.exists() and not folder.is_dir():
        raise TrainConfigError(f"output_dir {folder} is a file, not a folder")
    output = folder / cfg.output_name
    if output.exists():
        if output.resolve() == info.path:
            raise TrainConfigError(f"output_name {cfg.output_name} is the base itself: choose another name")
        if not output.is_dir() or (read_manifest(output) is None and any(output.iterdir())):
            raise TrainConfigError(f"{output} exists and is not a captioner this trainer made: choose another "
                                   "output_name")
    run_dir = default_run_dir(cfg, output)

    data = datasets.scan(cfg)
    captioned = [i for i in data.train_items if i.caption_source == "file"]
    uncaptioned = [i for i in data.train_items if i.caption_source != "file"]
    if not captioned:
        raise datasets.DatasetError(
            f"no caption files ({cfg.caption_extension}) beside the images in {cfg.train_data_dir}: a captioner "
            "learns from them (the Caption tab's batch captioning writes a first draft to correct)")
    warnings = list(data.warnings) + [f"no caption file: {i.path} (not trained on)" for i in uncaptioned]
    val, source = [], ""
    if cfg.val_data_dir:
        vdata = datasets.scan(replace(cfg, train_data_dir=cfg.val_data_dir, reg_data_dir=""))
        val = [i for i in vdata.train_items if i.caption_source == "file"]
        if not val:
            raise datasets.DatasetError(f"no caption files ({cfg.caption_extension}) beside the images in "
                                        f"val_data_dir {cfg.val_data_dir}: the evaluation needs references")
        source = f"val_data_dir {cfg.val_data_dir}"
    elif cfg.val_split:
        n_val = max(1, round(cfg.val_split * len(captioned)))
        if len(captioned) - n_val < 1:
            raise datasets.DatasetError(
                f"val_split {cfg.val_split} holds out {n_val} of the {len(captioned)} captioned image(s) in "
                f"{cfg.train_data_dir}, leaving none to train on: it needs at least {n_val + 1} (or give "
                "val_data_dir)")
        captioned, val = _split(captioned, cfg.val_split, cfg.seed)
        source = f"val_split {cfg.val_split}"
    train = datasets.DatasetPlan(items=captioned, skipped=list(data.skipped), warnings=warnings)
    global_batch = cfg.train_batch_size * world_size
    train.validate_batch(global_batch)
    batches = train.steps_per_epoch(global_batch)
    steps_per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    total = cfg.max_train_steps or cfg.max_train_epochs * steps_per_epoch
    cast = fmt == "trained" and cfg.mixed_precision != "no"
    estimate = estimate_memory(info, cfg, cast)
    check_memory(info, cfg, estimate)
    return CaptionerPlan(cfg=cfg, base=info, family=info.kind, data=train, world_size=world_size,
                         batches_per_epoch=batches, steps_per_epoch=steps_per_epoch, total_steps=total,
                         output_path=output, run_dir=run_dir, val=val, val_source=source, output_format=fmt,
                         memory={**estimate, "base_bytes": base_bytes})


def caption_lines(item) -> list[str]:
    return [line.strip() for line in item.caption.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- the trainer

class CaptionerTrainer(engine.Trainer):
    """engine.Trainer's loop over a captioner: its own setup, loss, evaluations and output."""

    # ---------------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        import torch
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        from modules.captioning.models import load_captioner

        cfg, plan = self.cfg, self.plan
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                       cpu=cfg.device == "cpu")
        acc = self.accelerator
        if acc.num_processes != plan.world_size:
            raise engine.TrainingFailed(f"planned for {plan.world_size} processes, running {acc.num_processes}")
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.progress = engine.Progress(plan.run_dir, enabled=acc.is_main_process, stream=self._progress_stream)
        if self.device.type == "cuda":  # the plan checked the RAM; the run needs the GPU's memory too
            check_memory(plan.base, cfg, plan.memory, self.device)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        # frozen parts in half precision only where only the trained tensors are saved (a whole folder keeps
        # the base's own weights bit for bit)
        cast = plan.output_format == "trained" and self.weight_dtype != torch.float32
        loaded = load_captioner(plan.base, self.weight_dtype if cast else torch.float32)
        model, self.processor = loaded.model, loaded.processor
        self.info = plan.base
        torch.manual_seed(cfg.seed)  # the initial LoRA weights
        model.requires_grad_(False)
        self.lora_targets: list[str] = []
        if cfg.lora_language_model:
            self.lora_targets = LORA_TARGETS[plan.base.language_model]
            outputs.add_lora(model.language_model, cfg.network_dim, cfg.network_alpha, self.lora_targets)
        prefixes = trained_prefixes(plan.base.kind, cfg)
        for name, p in model.named_parameters():
            if name.startswith(prefixes) or "lora_" in name:
                p.requires_grad_(True)
                p.data = p.data.float()
        for name in ("vision_model",) if plan.base.kind == KIND_BLIP2 or not cfg.train_vision_encoder else ():
            _keep_in_eval(getattr(model, name))  # frozen: no dropout, whatever the loop's train() says
        model.to(self.device)
        if cfg.gradient_checkpointing:  # non-reentrant: recomputation sees the same dropout, gradients unchanged
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainee = engine.Trainee(models={"captioner": model},
                                      groups=[{"params": params, "lr": cfg.learning_rate}])
        self.optimizer = engine._optimizer(cfg, self.trainee.groups)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=plan.total_steps)
        model_w, self.optimizer = acc.prepare(model, self.optimizer)
        self.wrapped = {"captioner": model_w}
        self.evals: list[dict] = []
        self.before: list[str] | None = None
        self._base_sha256: str | None = None

    @property
    def model(self):
        return self.trainee.models["captioner"]

    # ------------------------------------------------------------------------------------------------ data
    def _caption(self, item, epoch: int, batch: int, place: int) -> str:
        lines = caption_lines(item)
        if len(lines) == 1:
            return lines[0]
        return random.Random(f"{self.cfg.seed}-{epoch}-{batch}-{place}").choice(lines)

    def _batch(self, items, captions: list[str]) -> dict:
        """The model's inputs and labels: the caption's tokens (and its end) are predicted, the image tokens,
        the BOS and the padding are not."""
        import numpy as np
        import torch

        from modules.captioning.service import open_rgb

        images = [open_rgb(it.path) for it in items]
        tok = self.processor.tokenizer
        model = self.model
        pixel_values = None
        if self.info.kind == KIND_BLIP:
            enc = tok(captions, padding="longest", truncation=True, max_length=CAPTION_MAX_TOKENS,
                      return_tensors="pt")
            ids = enc["input_ids"].clone()
            ids[:, 0] = model.config.text_config.bos_token_id  # BLIP's decoder starts at [DEC], as generate does
            labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
            batch = {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}
        elif getattr(model.config, "use_decoder_only_language_model", True):
            if getattr(self, "_prompt_length", None) is None:  # the image tokens + BOS every caption follows
                self._prompt_length = len(self.processor(images=images[:1], text=[""])["input_ids"][0])
            prompt = range(self._prompt_length)
            enc = self.processor(images=images, text=captions, return_tensors=None)
            texts, pixel_values = enc["input_ids"], enc["pixel_values"]
            eos = tok.eos_token_id
            seqs = [list(t[:len(prompt) + CAPTION_MAX_TOKENS]) + [eos] for t in texts]
            width = max(len(s) for s in seqs)
            pad = tok.pad_token_id if tok.pad_token_id is not None else eos
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.full((len(seqs), width), -100, dtype=torch.long)
            for k, s in enumerate(seqs):
                ids[k, :len(s)] = torch.tensor(s)
                mask[k, :len(s)] = 1
                labels[k, len(prompt):len(s)] = torch.tensor(s[len(prompt):])
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        else:  # FlanT5: the encoder reads the image tokens (and an empty prompt), the decoder the caption
            enc = self.processor(images=images, text=[""] * len(images), return_tensors="pt")
            pixel_values = enc["pixel_values"]
            target = tok(captions, padding="longest", truncation=True, max_length=CAPTION_MAX_TOKENS,
                         return_tensors="pt")
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
            batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        if pixel_values is None:
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if not hasattr(pixel_values, "to"):
            pixel_values = torch.as_tensor(np.stack([np.asarray(p) for p in pixel_values]))
        vision_dtype = next(model.vision_model.parameters()).dtype
        batch["pixel_values"] = pixel_values.to(self.device, vision_dtype)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------------ loss
    def _loss(self, micro: int):
        import torch

        epoch, b, items, places = self._micro_batch(micro)
        captions = [self._caption(it, epoch, b, place) for it, place in zip(items, places)]
        batch = self._batch(items, captions)
        # dropout draws from the global generator: seeded by the micro-step, so a resumed run draws the same
        torch.manual_seed(engine._seed_of("dropout", self.cfg.seed, micro, self.rank))
        with self.accelerator.autocast():
            out = self.wrapped["captioner"](**batch)
        return out.loss.float(), epoch

    def fixed_loss(self) -> float:
        """The loss of micro-batch 0 in eval mode (no dropout), without a gradient."""
        import torch
        model = self.wrapped["captioner"]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self._loss(0)[0])
        finally:
            model.train(was)

    # ------------------------------------------------------------------------------------------ evaluation
    def caption_images(self, paths: list[Path]) -> list[str]:
        """Captions of images by the weights being trained, as the Caption tab makes them (beam search)."""
        import torch

        from modules.captioning.models import LoadedCaptioner
        from modules.captioning.service import generate_text, open_rgb

        model = self.accelerator.unwrap_model(self.wrapped["captioner"])
        was = model.training
        model.eval()
        loaded = LoadedCaptioner(self.info, model, self.processor, quantized=False)
        settings = CaptionSettings(num_beams=self.cfg.eval_num_beams, min_length=1,
                                   max_length=self.cfg.eval_max_length).validate()
        out: list[str] = []
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for start in range(0, len(paths), EVAL_BATCH):
                    images = [open_rgb(p) for p in paths[start:start + EVAL_BATCH]]
                    out += generate_text(loaded, images, "", settings)
        finally:
            model.train(was)
        return out

    def evaluate(self, tag: str, step: int, epoch: int) -> dict | None:
        """Caption the held-out images, score them, keep the row and the examples; every process waits for it."""
        if not self.plan.val:
            return None
        acc = self.accelerator
        acc.wait_for_everyone()
        self.last_eval_step = step  # on every process: they decide alike when to evaluate (and so wait alike)
        entry = None
        if acc.is_main_process:
            started = time.perf_counter()
            predictions = self.caption_images([it.path for it in self.plan.val])
            references = [caption_lines(it) for it in self.plan.val]
            scores = metrics.caption_scores(predictions, references)
            entry = {"tag": tag, "step": step, "epoch": epoch, **scores,
                     "seconds": round(time.perf_counter() - started, 3)}
            self.evals.append(entry)
            k = min(self.cfg.eval_examples, len(predictions))
            if self.before is None:
                self.before = predictions[:k]
            examples = [{"image": str(it.path), "reference": references[i][0], "before": self.before[i],
                         "now": predictions[i]} for i, it in enumerate(self.plan.val[:k])]
            self._write_eval_files(examples)
            self.progress.emit("eval", tag=tag, step=step, epoch=epoch, metrics=scores, examples=examples,
                               images=len(predictions))
        acc.wait_for_everyone()
        return entry

    def _write_eval_files(self, examples: list[dict] | None) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["tag", "step", "epoch", *METRIC_NAMES])
        for row in self.evals:
            writer.writerow([row["tag"], row["step"], row["epoch"], *(f"{row[m]:.6f}" for m in METRIC_NAMES)])
        atomic_write_text(self.plan.run_dir / EVAL_TABLE, buf.getvalue())
        if examples is not None:
            atomic_write_text(self.plan.run_dir / EVAL_EXAMPLES, json.dumps(examples, indent=1))

    def _on_start(self, step: int, resumed: dict | None) -> None:
        self.last_eval_step = None
        if resumed:  # every process reads the same state
            self.evals = list(resumed.get("evals") or [])
            self.before = resumed.get("eval_before")
            self.last_eval_step = self.evals[-1]["step"] if self.evals else None
            if self.evals and self.accelerator.is_main_process:
                self._write_eval_files(None)  # the table so far, in this run's folder
        if self.last_eval_step is None:
            self.evaluate("before", step, step * self.cfg.gradient_accumulation_steps // self.plan.batches_per_epoch)

    def _on_epoch(self, step: int, epoch: int) -> None:
        n = self.cfg.eval_every_n_epochs
        if n and epoch % n == 0:
            self.evaluate(f"epoch {epoch}", step, epoch)

    def _on_end(self, step: int, epoch: int) -> None:
        if self.last_eval_step != step:
            self.evaluate("final", step, epoch)

    def _state_extra(self) -> dict:
        return {"evals": self.evals, "eval_before": self.before}

    def _oom(self, e) -> engine.TrainingFailed:
        msg = ("out of memory while training the captioner: lower train_batch_size, turn on gradient_checkpointing, "
               "use mixed_precision fp16/bf16 (with output_format trained the frozen parts are kept in it), or "
               "choose a smaller captioner")
        self.progress.emit("error", message=msg, kind="oom")
        return engine.TrainingFailed(msg, engine.EXIT_OOM)

    # ------------------------------------------------------------------------------------------------ output
    def base_sha256(self) -> str:
        """sha256 of the base's weights file (of the list "name sha256" of its shards where it has several)."""
        if self._base_sha256 is None:
            from modules.model_store.hashing import sha256_of_file

            files = weight_files(self.info.path)
            if len(files) == 1:
                self._base_sha256 = sha256_of_file(files[0])
            else:
                import hashlib
                lines = "".join(f"{f.name} {sha256_of_file(f)}\n" for f in files)
                self._base_sha256 = hashlib.sha256(lines.encode()).hexdigest()
        return self._base_sha256

    def trained_tensors(self, model) -> dict:
        """What trained, by the plain model's names; a LoRA layer as its pair `M.lora_A.weight`, `M.lora_B.weight`."""
        out = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            out[key] = p.detach().float().cpu().contiguous()
        return out

    def merged_state_dict(self, model) -> dict:
        """The whole model's tensors by the plain model's names, LoRA layers merged (W + alpha/rank * B @ A)."""
        state = model.state_dict()
        scale = self.cfg.network_alpha / self.cfg.network_dim
        out = {}
        for key, tensor in state.items():
            if ".lora_A." in key or ".lora_B." in key:
                continue
            if ".base_layer." in key:
                module, _, leaf = key.partition(".base_layer.")
                plain = f"{module}.{leaf}"
                if leaf == "weight":
                    a = state[f"{module}.lora_A.default.weight"].float()
                    b = state[f"{module}.lora_B.default.weight"].float()
                    tensor = (tensor.float() + scale * (b @ a)).to(tensor.dtype)
                out[plain] = tensor.detach().cpu()
            else:
                out[key] = tensor.detach().cpu()
        return out

    def manifest(self, step: int, epoch: int) -> dict[str, Any]:
        info, cfg = self.info, self.cfg
        return {
            "format": self.plan.output_format, "kind": info.kind, "language_model": info.language_model,
            "base": info.name, "base_path": str(info.path), "base_sha256": self.base_sha256(),
            "base_bytes": weights_size(info.path),
            "weights": TRAINED_WEIGHTS_FILE if self.plan.output_format == "trained" else None,
            "trained": [p.rstrip(".") for p in trained_prefixes(info.kind, cfg)],
            "lora": ({"rank": cfg.network_dim, "alpha": cfg.network_alpha, "targets": self.lora_targets,
                      "module": "language_model"} if self.lora_targets else None),
            "step": step, "epoch": epoch, "output_name": cfg.output_name, "trained_at": time.time(),
            "metrics": {k: v for k, v in (self.evals[-1] if self.evals else {}).items() if k in METRIC_NAMES},
            "trained_by": "python -m modules.train captioner",
        }

    def save_output(self, step: int, epoch: int, final: bool) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        plan, cfg = self.plan, self.cfg
        path = plan.output_path if final else plan.output_path.with_name(f"{cfg.output_name}-step{step:06d}")
        model = self.accelerator.unwrap_model(self.wrapped["captioner"])
        manifest = self.manifest(step, epoch)
        with atomic_folder(path) as tmp:
            self.processor.save_pretrained(tmp)
            if plan.output_format == "trained":
                outputs.write_safetensors(tmp / TRAINED_WEIGHTS_FILE, self.trained_tensors(model), {
                    "base": self.info.name, "base_sha256": manifest["base_sha256"], "format": "captioner-trained"})
            elif self.lora_targets:
                clean = type(model)(model.config)
                clean.load_state_dict(self.merged_state_dict(model))
                clean.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        self.progress.emit("saved", path=str(path), step=step, final=final, format=plan.output_format)
        return path


def _keep_in_eval(module) -> None:
    """A frozen part stays in eval mode (no dropout) when the model around it is put in train mode, as LAVIS
    keeps BLIP-2's frozen vision encoder."""
    module.eval()
    module.train = lambda mode=True: module
