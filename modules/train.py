"""Headless training: `python -m modules.train lora|dreambooth|embedding|captioner [flags]` (kohya sd-scripts' flag
names; `--help` after the method lists them). `captioner` fine-tunes a BLIP / BLIP-2 captioner on captioned images:

    python -m modules.train captioner --base blip2-opt-2.7b --train_data_dir DIR --val_split 0.1 \
        --output_name my-captioner --max_train_epochs 5 --learning_rate 1e-5 --mixed_precision bf16

The Train tab and the API start this same command as a child process and read its progress: JSON lines on stdout
(also kept in RUN_DIR/progress.jsonl). Multi-process runs:

    torchrun --standalone --nproc_per_node 2 -m modules.train lora ...
    accelerate launch --multi_gpu --num_processes 2 -m modules.train lora ...

Exit codes: 0 done or stopped (with a resumable state), 2 bad input (the message says what; nothing was done),
3 NaN/inf loss, 4 out of memory, 1 any other failure.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _error(message: str, kind: str = "bad_input") -> None:
    print(json.dumps({"event": "error", "kind": kind, "message": message}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)


def _lock(run_dir: Path) -> Path:
    """One run per run folder: a second one is refused while the first one's process lives."""
    from modules.training.config import TrainConfigError

    lock = run_dir / "run.lock"
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            alive = pid > 0 and pid != os.getpid()
        except (ValueError, ProcessLookupError, PermissionError):
            alive = False  # a stale lock of a process that is gone
        if alive:
            raise TrainConfigError(f"a run is already training in {run_dir} (process {pid})")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    return lock


def plan_from_argv(argv: list[str], world: int = 1):
    """argv -> (config, plan, sample prompts), every check that needs no model weights done."""
    from modules.core import paths
    from modules.training import samples
    from modules.training.config import parse_args
    from modules.training.plan import make_plan

    cfg = parse_args(argv)
    if not cfg.models_dir:
        cfg = replace(cfg, models_dir=str(paths.REPO_ROOT / "models"))
    plan = make_plan(cfg, world)
    prompts = samples.read_prompts(cfg.sample_prompts, cfg.resolution) if cfg.sample_prompts else []
    if (cfg.sample_every_n_steps or cfg.sample_every_n_epochs) and not prompts:
        from modules.training.config import TrainConfigError
        raise TrainConfigError("sample_every_n_steps/epochs need sample_prompts (a file of prompts)")
    return cfg, plan, prompts


def _caption_missing(cfg, plan, progress) -> None:
    from modules.captioning import CaptionerError, CaptionerRegistry, CaptionRequest
    from modules.captioning.service import CaptionContext, open_rgb, run_caption
    from modules.model_store.model_manager import ModelManager
    from modules.training import dataset
    from modules.training.config import TrainConfigError

    missing = plan.data.missing_captions()
    if not missing:
        return
    import torch

    models_dir = Path(cfg.models_dir)
    registry = CaptionerRegistry([models_dir / "BLIP2", models_dir / "BLIP"])
    try:
        registry.resolve(cfg.caption_missing_with, purpose="caption")
    except CaptionerError as e:
        raise TrainConfigError(f"caption_missing_with: {e}") from None
    ctx = CaptionContext(registry=registry, manager=ModelManager("cpu" if cfg.device == "cpu" else
                                                                 ("cuda" if torch.cuda.is_available() else "cpu"),
                                                                 vram_budget=2**62, ram_budget=2**62),
                         dtype=torch.float32)
    progress.emit("captioning", images=len(missing), captioner=cfg.caption_missing_with)
    written = dataset.write_missing_captions(
        plan.data, lambda path: run_caption(ctx, CaptionRequest(image=open_rgb(path), model=cfg.caption_missing_with)),
        cfg.caption_extension)
    ctx.manager.unload_all()
    progress.emit("captioned", files=[str(p) for p in written])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from modules.core import console
    from modules.training.config import TrainConfigError
    from modules.training.dataset import DatasetError

    console.quiet_libraries()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if len(argv) > 1 and argv[1] in ("-h", "--help"):
            from modules.training.config import parser
            parser(argv[0]).print_help()
            return 0
        cfg, plan, prompts = plan_from_argv(argv, world)
    except (TrainConfigError, DatasetError) as e:
        _error(str(e))
        return 2

    from accelerate import PartialState

    from modules.training import engine, samples
    from modules.training.plan import make_plan

    state = PartialState(cpu=cfg.device == "cpu")
    progress = engine.Progress(plan.run_dir, enabled=state.is_main_process)
    lock = None
    try:
        if state.is_main_process:
            lock = _lock(plan.run_dir)
            (plan.run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
            progress.emit("plan", **plan.summary())
        with state.main_process_first():
            if state.is_main_process and cfg.caption_missing_with:
                _caption_missing(cfg, plan, progress)
            if cfg.num_class_images:
                device = "cpu" if cfg.device == "cpu" or state.device.type == "cpu" else str(state.device)
                folder = samples.ensure_class_images(plan.run_dir.parent / "class_images", plan.base, cfg.class_prompt,
                                                     cfg.num_class_images, cfg.resolution, cfg.seed, device, progress)
                cfg = replace(cfg, reg_data_dir=str(folder))
            if cfg.num_class_images or cfg.caption_missing_with:
                plan = make_plan(cfg, world, class_images_made=bool(cfg.num_class_images))
        if cfg.method == "captioner":
            from modules.training.captioner import CaptionerTrainer
            trainer = CaptionerTrainer(plan)
        else:
            trainer = engine.Trainer(plan)
        engine.install_stop_handler(trainer)
        sampler = samples.Sampler(prompts, plan.run_dir / "samples") if prompts else None
        result = trainer.run(sampler)
    except (TrainConfigError, DatasetError) as e:
        _error(str(e))
        return 2
    except engine.TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    print(f"{result['state']} at step {result['step']}" + (f": {result['output']}" if result.get("output") else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
