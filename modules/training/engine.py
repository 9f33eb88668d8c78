"""The training loop, on accelerate: mixed precision, gradient accumulation, device placement and DDP are
accelerate's; what is ours is the data order, the loss and the files.

Determinism (what makes `--resume` exact and a 2-process run equal a 1-process run with twice the batch): every
random draw of a sample -- its noise, noise offset, timestep, caption shuffle and dropout -- comes from a
generator seeded by (seed, micro-step, the sample's place in the global batch), never from a global RNG; the
data order of an epoch depends only on (seed, epoch). Process r of N takes places r, r+N, ... of each global
batch, so the processes together see exactly the global batch one process would.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules.core.fileio import atomic_folder, atomic_write_text
from modules.training import dataset as datasets
from modules.training import models, outputs
from modules.training.config import TrainConfigError
from modules.training.plan import RunPlan

log = logging.getLogger("webui.training")

ENCODER_PARTS = ("text_encoder", "text_encoder_2")  # the components' names of the text encoders, in order
EXIT_BAD_INPUT, EXIT_NAN, EXIT_OOM, EXIT_FAILED = 2, 3, 4, 1
STATE_FILE = "state.json"


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------------ progress

class Progress:
    """JSON lines on stdout (what the server reads) and in the run's progress.jsonl; only process 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.path = run_dir / "progress.jsonl"
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.stream.write(line + "\n")
        self.stream.flush()


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def _peak_memory(device) -> int:
    import torch
    if getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------- the trainer

@dataclass
class Trainee:
    """What a run trains: named parameter groups of the (unwrapped) models, and how to save the result."""
    models: dict[str, Any] = field(default_factory=dict)  # part name -> model holding trainable params
    groups: list[dict] = field(default_factory=list)  # optimizer param groups
    token_ids: list[list[int]] = field(default_factory=list)  # embedding: the new token ids per encoder
    original_embeddings: list[Any] = field(default_factory=list)


def _optimizer(cfg, groups):
    import torch
    name = cfg.optimizer_type
    if name == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=0.0 if cfg.method == "embedding" else 1e-2)
    if name == "SGD":
        return torch.optim.SGD(groups)
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "Prodigy":
        import prodigyopt
        return prodigyopt.Prodigy(groups)
    if name == "AdamW8bit":
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(groups)
    raise TrainConfigError(f"unknown optimizer {name}")


class Trainer:
    def __init__(self, plan: RunPlan, progress_stream=None, stop_check: Callable[[], bool] | None = None):
        self.plan = plan
        self.cfg = plan.cfg
        self.stop_requested = False
        self._stop_check = stop_check
        self._progress_stream = progress_stream

    # ---------------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        import torch
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        cfg = self.cfg
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                       cpu=cfg.device == "cpu")
        acc = self.accelerator
        if acc.num_processes != self.plan.world_size:
            raise TrainingFailed(f"planned for {self.plan.world_size} processes, running {acc.num_processes}")
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.progress = Progress(self.plan.run_dir, enabled=acc.is_main_process, stream=self._progress_stream)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        torch.manual_seed(cfg.seed)  # the initial LoRA weights
        self.base = models.load_base(self.plan.base, self.plan.family)
        comps = self.base.components
        self.noise_scheduler = DDPMScheduler.from_config(comps["scheduler"].config)
        self.vae = comps["vae"].requires_grad_(False).to(self.device, torch.float32)
        self.trainee = self._trainee()
        for name, model in [("unet", comps["unet"])] + [(f"te{i}", e) for i, (_, e) in enumerate(self.base.encoders)]:
            if model not in self.trainee.models.values():
                model.requires_grad_(False).to(self.device, self.weight_dtype)
        if cfg.gradient_checkpointing:
            comps["unet"].enable_gradient_checkpointing()
            for part, model in self.trainee.models.items():
                if part.startswith("text_encoder") and hasattr(model, "gradient_checkpointing_enable"):
                    model.gradient_checkpointing_enable()
        self.optimizer = _optimizer(cfg, self.trainee.groups)
        from diffusers.optimization import get_scheduler
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.plan.total_steps)
        names = list(self.trainee.models)
        prepared = acc.prepare(*[self.trainee.models[n] for n in names], self.optimizer)
        self.wrapped = dict(zip(names, prepared[:-1]))
        self.optimizer = prepared[-1]
        self.latents = datasets.LatentCache(Path(cfg.train_data_dir) / ".latent_cache"
                                            if cfg.cache_latents_to_disk else None)
        self._vae_id = None
        self._text_cache: dict[str, Any] = {}

    def _trainee(self) -> Trainee:
        import torch

        cfg, base, comps = self.cfg, self.base, self.base.components
        t = Trainee()
        unet_lr = cfg.unet_lr or cfg.learning_rate
        te_lr = cfg.text_encoder_lr or cfg.learning_rate
        parts = {"unet": comps["unet"]}
        for i, (_, encoder) in enumerate(base.encoders):
            parts[ENCODER_PARTS[i]] = encoder
        if cfg.method == "embedding":
            import copy
            for i, name in enumerate(("tokenizer", "tokenizer_2")[:len(base.encoders)]):
                comps[name] = copy.deepcopy(comps[name])  # the run's own: the shipped tokenizer is shared
            for i, (tokenizer, encoder) in enumerate(base.encoders):
                ids = self._add_tokens(tokenizer, encoder)
                encoder.requires_grad_(False)
                emb = encoder.get_input_embeddings()
                emb.weight.requires_grad_(True)
                t.token_ids.append(ids)
                t.original_embeddings.append(emb.weight.detach().clone())
                name = ENCODER_PARTS[i]
                t.models[name] = encoder.to(self.device, torch.float32)
                t.groups.append({"params": [emb.weight], "lr": cfg.learning_rate})
            comps["unet"].requires_grad_(False)
            return t
        if cfg.is_lora:
            train_unet = not cfg.network_train_text_encoder_only
            train_te = not cfg.network_train_unet_only
            for name, model in parts.items():
                if (name == "unet" and not train_unet) or (name != "unet" and not train_te):
                    continue
                targets = outputs.UNET_TARGETS if name == "unet" else outputs.TEXT_ENCODER_TARGETS
                outputs.add_lora(model, cfg.network_dim, cfg.network_alpha, targets)
                params = outputs.lora_parameters(model)
                for p in params:
                    p.data = p.data.float()
                model.to(self.device)
                t.models[name] = model
                t.groups.append({"params": params, "lr": unet_lr if name == "unet" else te_lr})
            return t
        # full DreamBooth fine-tune
        unet = comps["unet"].requires_grad_(True).to(self.device, torch.float32)
        t.models["unet"] = unet
        t.groups.append({"params": list(unet.parameters()), "lr": unet_lr})
        if cfg.train_text_encoder:
            for name, model in parts.items():
                if name != "unet":
                    model.requires_grad_(True).to(self.device, torch.float32)
                    t.models[name] = model
                    t.groups.append({"params": list(model.parameters()), "lr": te_lr})
        return t

    def token_words(self) -> list[str]:
        token = self.cfg.token_string or self.cfg.output_name
        n = self.cfg.num_vectors_per_token
        return [token] + [f"{token}_{i}" for i in range(1, n)]

    def _add_tokens(self, tokenizer, encoder) -> list[int]:
        """The embedding's words as new tokens of this (run's own) tokenizer, their rows started from init_word."""
        import torch

        words = self.token_words()
        added = tokenizer.add_tokens(words)
        if added != len(words):
            raise TrainConfigError(f"token_string {words[0]!r} is already a word of the tokenizer: choose another "
                                   "(a made-up word such as 'sks' or the embedding's file name)")
        ids = tokenizer.convert_tokens_to_ids(words)
        init = tokenizer(self.cfg.init_word, add_special_tokens=False).input_ids or [tokenizer.unk_token_id]
        encoder.resize_token_embeddings(len(tokenizer))
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for j, token_id in enumerate(ids):
                weight[token_id] = weight[init[j % len(init)]]
        return ids

    # ------------------------------------------------------------------------------------------------ data
    def _vae_fingerprint(self) -> str:
        import torch
        if self._vae_id is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy())
            self._vae_id = h.hexdigest()[:16]
        return self._vae_id

    def _latent(self, item):
        import numpy as np
        import torch

        key = None
        if self.cfg.cache_latents:
            key = datasets.latent_key(item, self._vae_fingerprint())
            cached = self.latents.get(key)
            if cached is not None:
                return cached
        image, _, _ = datasets.load_image(item)
        x = torch.from_numpy(np.asarray(image, dtype="float32").copy()).permute(2, 0, 1) / 127.5 - 1
        g = torch.Generator(device="cpu").manual_seed(_seed_of("latent", item.content_hash, item.bucket))
        with torch.no_grad():
            dist = self.vae.encode(x[None].to(self.device)).latent_dist
            sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(self.device)
            latent = (sample * self.vae.config.scaling_factor)[0].cpu()
        if key is not None:
            self.latents.put(key, latent)
        return latent

    def _captions(self, items, places: list[int], epoch: int, batch: int) -> list[str]:
        cfg = self.cfg
        out = []
        for item, place in zip(items, places):
            rng = random.Random(f"{cfg.seed}-{epoch}-{batch}-{place}")
            caption = datasets.process_caption(item.caption, shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                               dropout_rate=cfg.caption_dropout_rate, rng=rng)
            if cfg.method == "embedding":
                caption = self._with_token(caption)
            out.append(caption)
        return out

    def _with_token(self, caption: str) -> str:
        """Textual inversion: the embedding's word stands for all its vectors (as in a prompt); a caption without
        the word gets it in front, as A1111's "[name], [filewords]" template does."""
        import re

        words = self.token_words()
        pattern = re.compile(rf"(?<![\w]){re.escape(words[0])}(?![\w])")
        if not pattern.search(caption):
            caption = f"{words[0]}, {caption}" if caption else words[0]
        return pattern.sub(" ".join(words), caption)

    def _encoders(self):
        encs = []
        for i, (tokenizer, encoder) in enumerate(self.base.encoders):
            name = ENCODER_PARTS[i]
            encs.append((tokenizer, self.wrapped.get(name, encoder)))
        return encs

    def _encode(self, captions: list[str]):
        import torch

        frozen = not any(n.startswith("text_encoder") for n in self.trainee.models)
        if self.cfg.cache_text_encoder_outputs:
            missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
            if missing:
                with torch.no_grad():
                    h, p = models.encode(self.base, self._encoders(), missing, self.cfg.clip_skip, self.device)
                for j, c in enumerate(missing):
                    self._text_cache[c] = (h[j], None if p is None else p[j])
            hs = torch.stack([self._text_cache[c][0] for c in captions])
            ps = None if self._text_cache[captions[0]][1] is None else torch.stack(
                [self._text_cache[c][1] for c in captions])
            return hs, ps
        ctx = torch.no_grad() if frozen else contextlib.nullcontext()
        with ctx:
            return models.encode(self.base, self._encoders(), captions, self.cfg.clip_skip, self.device)

    def _micro_batch(self, micro: int):
        """(latents, captions, weights, time ids, places) of this process's share of global micro-batch `micro`."""
        plan = self.plan
        epoch, b = divmod(micro, plan.batches_per_epoch)
        if b == 0 or not hasattr(self, "_epoch_batches") or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, plan.data.epoch_batches(plan.global_batch, epoch, self.cfg.seed))
        batch = self._epoch_batches[1][b]
        places = list(range(self.rank, len(batch), self.world)) or [len(batch) - 1]
        items = [plan.data.items[batch[p]] for p in places]
        return epoch, b, items, places

    # ------------------------------------------------------------------------------------------------ loss
    def _loss(self, micro: int):
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        epoch, b, items, places = self._micro_batch(micro)
        latents = torch.stack([self._latent(it) for it in items]).to(self.device)
        noise, offsets, timesteps = [], [], []
        T = self.noise_scheduler.config.num_train_timesteps
        for place in places:
            g = torch.Generator(device="cpu").manual_seed(_seed_of(cfg.seed, micro, place))
            noise.append(torch.randn(latents.shape[1:], generator=g))
            offsets.append(torch.randn(latents.shape[1], 1, 1, generator=g))
            timesteps.append(int(torch.randint(0, T, (1,), generator=g)))
        noise = torch.stack(noise).to(self.device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.stack(offsets).to(self.device)
        t = torch.tensor(timesteps, device=self.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        hidden, pooled = self._encode(self._captions(items, places, epoch, b))
        unet = self.wrapped.get("unet", self.base.unet)
        kwargs = {}
        if self.plan.family == "sdxl":
            ids = []
            for it in items:  # SDXL's size conditioning: original size, crop corner, target size (no image read)
                top, left = datasets.crop_for(it.size, it.bucket)
                ids.append([it.size[1], it.size[0], top, left, it.bucket[1], it.bucket[0]])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.weight_dtype),
                                           "time_ids": torch.tensor(ids, device=self.device, dtype=self.weight_dtype)}
        with self.accelerator.autocast():
            pred = unet(noisy.to(self.weight_dtype), t, hidden.to(self.weight_dtype), **kwargs).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            from diffusers.training_utils import compute_snr
            snr = compute_snr(self.noise_scheduler, t)
            weight = torch.clamp(snr, max=cfg.min_snr_gamma)
            weight = weight / (snr + 1) if self.noise_scheduler.config.prediction_type == "v_prediction" else \
                weight / snr
            loss = loss * weight
        sample_weights = torch.tensor([cfg.prior_loss_weight if it.is_reg else 1.0 for it in items],
                                      device=self.device)
        return (loss * sample_weights).mean(), epoch

    # ------------------------------------------------------------------------------------------------ state
    def _trainable_state(self) -> dict:
        state = {}
        if self.cfg.method == "embedding":
            for i, ids in enumerate(self.trainee.token_ids):
                name = ENCODER_PARTS[i]
                weight = self.trainee.models[name].get_input_embeddings().weight
                state[f"{name}.embedding"] = weight[ids].detach().float().cpu().clone()
            return state
        for name, model in self.trainee.models.items():
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    state[f"{name}.{pname}"] = p.detach().cpu().clone()
        return state

    def _load_trainable(self, state: dict) -> None:
        import torch
        with torch.no_grad():
            if self.cfg.method == "embedding":
                for i, ids in enumerate(self.trainee.token_ids):
                    name = ENCODER_PARTS[i]
                    weight = self.trainee.models[name].get_input_embeddings().weight
                    weight[ids] = state[f"{name}.embedding"].to(weight.device, weight.dtype)
                return
            for name, model in self.trainee.models.items():
                for pname, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(state[f"{name}.{pname}"].to(p.device, p.dtype))

    def save_state(self, step: int, micro: int, extra: dict) -> Path | None:
        """A resumable state of the last completed update, as one folder that appears whole (or not at all)."""
        import torch
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        states = self.plan.run_dir / "states"
        target = states / f"step-{step:06d}"
        with atomic_folder(target) as tmp:
            save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                       tmp / "optimizer.pt")
            (tmp / STATE_FILE).write_text(json.dumps({
                "step": step, "micro": micro, "total_steps": self.plan.total_steps, "seed": self.cfg.seed,
                "global_batch": self.plan.global_batch, "method": self.cfg.method,
                "output_name": self.cfg.output_name, **extra}, indent=1))
        atomic_write_text(states / "latest.txt", target.name)
        for old in sorted(states.glob("step-*"))[:-2]:  # keep the last two complete states
            import shutil
            shutil.rmtree(old, ignore_errors=True)
        self.progress.emit("state", path=str(target), step=step)
        return target

    def _resume(self) -> dict:
        import torch
        from safetensors.torch import load_file

        folder = resolve_state(Path(self.cfg.resume))
        info = json.loads((folder / STATE_FILE).read_text())
        if info.get("method") != self.cfg.method:
            raise TrainConfigError(f"resume: {folder} is a {info.get('method')} state, not {self.cfg.method}")
        if info.get("global_batch") != self.plan.global_batch:
            raise TrainConfigError(f"resume: {folder} was trained with {info.get('global_batch')} samples per batch "
                                   f"(train_batch_size x processes), this run has {self.plan.global_batch}")
        self._load_trainable(load_file(str(folder / "trainable.safetensors")))
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        self.accelerator.step = info["micro"]
        return info

    # ------------------------------------------------------------------------------------------------ output
    def save_output(self, step: int, epoch: int, final: bool) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        plan, cfg = self.plan, self.cfg
        path = plan.output_path if final else plan.output_path.with_name(
            f"{cfg.output_name}-step{step:06d}.safetensors")
        if plan.output_kind == "lora":
            meta = outputs.lora_metadata(cfg, plan.data, plan.family, plan.base, step=step, epoch=epoch,
                                         started_at=self.started_at,
                                         v_parameterization=self.noise_scheduler.config.prediction_type
                                         == "v_prediction")
            parts = {n: self.accelerator.unwrap_model(m) for n, m in self.trainee.models.items()}
            outputs.save_lora(path, parts, plan.family, cfg, meta)
        elif plan.output_kind == "embedding":
            vectors = [v for v in self._trainable_state().values()]
            outputs.save_embedding(path, vectors, plan.family, {
                "step": str(step), "sd_checkpoint_name": plan.base.name, "token": self.token_words()[0]})
        else:
            from modules.model_store.checkpoint_files import read_safetensors_metadata
            base_meta = {} if plan.base.is_diffusers_folder else read_safetensors_metadata(plan.base.filename)
            comps = dict(self.base.components)
            for n, m in self.trainee.models.items():
                comps[n] = self.accelerator.unwrap_model(m)
            outputs.save_checkpoint(path, comps, base_meta, {"trained_from": plan.base.name, "ss_steps": str(step)})
        self.progress.emit("saved", path=str(path), step=step, final=final)
        return path

    # ------------------------------------------------------------------------------------------------ loop
    def _should_stop(self) -> bool:
        import torch
        flag = self.stop_requested or bool(self._stop_check and self._stop_check())
        if self.world > 1:
            flags = self.accelerator.gather(torch.tensor([1.0 if flag else 0.0], device=self.device))
            return bool(flags.max() > 0)
        return flag

    def _restore_embeddings(self) -> None:
        """Textual inversion trains only the new tokens' rows: every other row goes back to its original."""
        import torch
        with torch.no_grad():
            for i, ids in enumerate(self.trainee.token_ids):
                name = ENCODER_PARTS[i]
                weight = self.trainee.models[name].get_input_embeddings().weight
                keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
                keep[ids] = False
                weight[keep] = self.trainee.original_embeddings[i].to(weight.device, weight.dtype)[keep]

    def fixed_loss(self) -> float:
        """The loss of micro-batch 0 (fixed images, captions, noise and timesteps), without a gradient."""
        import torch
        with torch.no_grad():
            return float(self._loss(0)[0])

    def run(self, sampler=None) -> dict:
        import torch

        from modules.core.devices import is_oom_error

        if not hasattr(self, "accelerator"):
            self._setup()
        plan, cfg, acc = self.plan, self.cfg, self.accelerator
        self.started_at = time.time()
        step, loss_avg = 0, None
        info = None
        if cfg.resume:
            info = self._resume()
            step, loss_avg = info["step"], info.get("loss_avg")
            self.started_at = info.get("started_at", self.started_at)
        self.progress.emit("start", total_steps=plan.total_steps, step=step, steps_per_epoch=plan.steps_per_epoch,
                           samples_per_step=plan.global_batch * cfg.gradient_accumulation_steps,
                           processes=self.world, device=str(self.device), base_model=plan.base.name,
                           output=str(plan.output_path))
        models_trained = list(self.wrapped.values())
        params = [p for g in self.trainee.groups for p in g["params"]]
        for m in models_trained:
            m.train()
        accum = cfg.gradient_accumulation_steps
        micro = step * accum
        self._on_start(step, info)
        first_step, t0 = step, time.perf_counter()
        epoch = micro // plan.batches_per_epoch
        last_epoch_saved = epoch
        outputs_written: list[str] = []
        try:
            while step < plan.total_steps:
                with acc.accumulate(*models_trained):
                    loss, epoch = self._loss(micro)
                    losses = acc.gather(loss.detach()[None]) if self.world > 1 else loss.detach()[None]
                    if not torch.isfinite(losses).all():
                        self._on_nan(step, micro, loss_avg)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro += 1
                if not acc.sync_gradients:
                    continue
                if cfg.method == "embedding":
                    self._restore_embeddings()
                self.lr_scheduler.step()
                step += 1
                value = float(losses.mean())
                loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
                rate = (step - first_step) / max(time.perf_counter() - t0, 1e-9)
                epoch_now = micro // plan.batches_per_epoch
                self.progress.emit("step", step=step, total_steps=plan.total_steps, epoch=epoch_now,
                                   loss=value, loss_avg=loss_avg, lr=self.lr_scheduler.get_last_lr()[0],
                                   it_s=rate, eta_s=(plan.total_steps - step) / rate if rate else None,
                                   peak_memory=_peak_memory(self.device))
                epoch_done = epoch_now > last_epoch_saved
                if epoch_done:
                    self._on_epoch(step, epoch_now)
                extra = {"loss_avg": loss_avg, "started_at": self.started_at, "epoch": epoch_now,
                         **self._state_extra()}
                due_state = cfg.save_state and (
                    (cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0) or
                    (cfg.save_every_n_epochs and epoch_done and epoch_now % cfg.save_every_n_epochs == 0))
                if step < plan.total_steps:
                    if (cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0) or (
                            cfg.save_every_n_epochs and epoch_done and epoch_now % cfg.save_every_n_epochs == 0):
                        path = self.save_output(step, epoch_now, final=False)
                        if path:
                            outputs_written.append(str(path))
                    if due_state:
                        self.save_state(step, micro, extra)
                if sampler is not None and step < plan.total_steps and (
                        (cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0) or
                        (cfg.sample_every_n_epochs and epoch_done and epoch_now % cfg.sample_every_n_epochs == 0)):
                    self._sample(sampler, step)
                if epoch_done:
                    last_epoch_saved = epoch_now
                if step < plan.total_steps and self._should_stop():
                    state = self.save_state(step, micro, extra)
                    path = self.save_output(step, epoch_now, final=False)
                    self.progress.emit("stopped", step=step, state=str(state) if state else None,
                                       output=str(path) if path else None)
                    return {"state": "stopped", "step": step}
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(e) from None
        except RuntimeError as e:
            if is_oom_error(e):
                raise self._oom(e) from None
            raise
        epoch_now = micro // plan.batches_per_epoch
        self._on_end(step, epoch_now)
        extra = {"loss_avg": loss_avg, "started_at": self.started_at, "epoch": epoch_now, **self._state_extra()}
        if cfg.save_state:
            self.save_state(step, micro, extra)
        if sampler is not None and (cfg.sample_every_n_steps or cfg.sample_every_n_epochs):
            self._sample(sampler, step)
        path = self.save_output(step, epoch_now, final=True)
        self.progress.emit("done", step=step, output=str(path) if path else None, outputs=outputs_written)
        return {"state": "done", "step": step, "output": str(path) if path else None}

    # hooks of the loop (the captioner trainer evaluates in them; nothing happens here)
    def _on_start(self, step: int, resumed: dict | None) -> None:
        """Before the first step (of this process's share of the run); `resumed` is the state's info."""

    def _on_epoch(self, step: int, epoch: int) -> None:
        """After the update that completed epoch `epoch` (before that step's saves)."""

    def _on_end(self, step: int, epoch: int) -> None:
        """After the last update, before the final state and result are saved."""

    def _state_extra(self) -> dict:
        """What a state keeps besides the weights, optimizer and step (read back by `_on_start`)."""
        return {}

    def _sample(self, sampler, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for m in self.wrapped.values():
                m.eval()
            try:
                for path in sampler(self, step):
                    self.progress.emit("sample", path=str(path), step=step)
            finally:
                for m in self.wrapped.values():
                    m.train()
        self.accelerator.wait_for_everyone()

    def _on_nan(self, step: int, micro: int, loss_avg) -> None:
        state = self.save_state(step, micro, {"loss_avg": loss_avg, "started_at": self.started_at,
                                              "epoch": micro // self.plan.batches_per_epoch})
        cause = ("mixed precision (fp16) overflowing: try bf16 or mixed_precision no, a lower learning_rate, or "
                 "a VAE that works in fp16" if self.cfg.mixed_precision == "fp16"
                 else f"a learning rate ({self.cfg.learning_rate}) too high for this optimizer, or broken weights "
                      "in the base model")
        msg = (f"loss became NaN or inf at step {step + 1}: the likely cause is {cause}. The state of the last good "
               f"step {step} is saved" + (f" in {state}" if state else "") + " (--resume it after the fix)")
        self.progress.emit("error", message=msg, kind="nan", state=str(state) if state else None)
        raise TrainingFailed(msg, EXIT_NAN)

    def _oom(self, e) -> TrainingFailed:
        msg = ("out of memory while training: lower train_batch_size, turn on gradient_checkpointing and "
               "cache_latents, lower the resolution, or use mixed_precision fp16/bf16")
        self.progress.emit("error", message=msg, kind="oom")
        return TrainingFailed(msg, EXIT_OOM)


def resolve_state(path: Path) -> Path:
    """A state folder, or a run folder (its latest state)."""
    if (path / STATE_FILE).is_file():
        return path
    latest = path / "states" / "latest.txt"
    if latest.is_file():
        folder = path / "states" / latest.read_text().strip()
        if (folder / STATE_FILE).is_file():
            return folder
    raise TrainConfigError(f"resume: {path} holds no saved state (a run folder or one of its states/step-* folders)")


def install_stop_handler(trainer: Trainer) -> None:
    """SIGTERM (the server's Stop, `kill`) asks the loop to stop at the next step with a resumable state."""
    def handler(signum, frame):
        trainer.stop_requested = True
    signal.signal(signal.SIGTERM, handler)
    if os.name == "posix":
        signal.signal(signal.SIGINT, handler)

