"""Headless batch captioning: `python -m modules.caption DIR --model NAME [...]` writes a caption file beside each image.

The same work as the UI's batch captioning (modules.captioning.service.run_batch), without a server:
models are looked up in MODELS_DIR/BLIP2 and MODELS_DIR/BLIP and loaded through a model manager of its own.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modules.caption", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder of images")
    p.add_argument("--model", default=None, help="captioner folder name (default: the default captioner)")
    p.add_argument("--models-dir", default=None, help="root of BLIP2/ and BLIP/ (default: ./models)")
    p.add_argument("--recursive", action="store_true", help="caption images in sub-folders too")
    p.add_argument("--extension", default=".txt", help='caption file extension (default .txt; kohya uses ".caption")')
    p.add_argument("--prefix", default="", help="text put before every caption")
    p.add_argument("--suffix", default="", help="text put after every caption")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files (default: skip them)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--nucleus", action="store_true", help="nucleus sampling (top-p) instead of beam search only")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--min-length", type=int, default=8)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "full", "half", "bf16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from modules.captioning import (
        BatchCaptionRequest,
        CaptionerError,
        CaptionerRegistry,
        CaptionSettings,
    )
    from modules.captioning.service import (
        CaptionContext,
        check_folder,
        normalize_extension,
        run_batch,
    )
    from modules.core import paths

    models_dir = Path(args.models_dir) if args.models_dir else paths.REPO_ROOT / "models"
    registry = CaptionerRegistry([models_dir / "BLIP2", models_dir / "BLIP"])
    try:
        settings = CaptionSettings(prompt=args.prompt, num_beams=args.num_beams, nucleus=args.nucleus,
                                   top_p=args.top_p, min_length=args.min_length, max_length=args.max_length,
                                   repetition_penalty=args.repetition_penalty, seed=args.seed).validate()
        req = BatchCaptionRequest(folder=check_folder(args.dir), model=args.model, settings=settings,
                                  recursive=args.recursive, extension=normalize_extension(args.extension),
                                  prefix=args.prefix, suffix=args.suffix, overwrite=args.overwrite,
                                  batch_size=max(1, args.batch_size))
        registry.resolve(args.model, purpose="caption")
    except CaptionerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from modules.core import devices
    from modules.model_store.model_manager import ModelManager

    device = devices.resolve_device(args.device)
    vram, ram = devices.default_budgets(device)
    ctx = CaptionContext(registry=registry, manager=ModelManager(device, vram, ram),
                         dtype=devices.resolve_dtype(args.precision, device))
    started = time.perf_counter()
    summary = run_batch(ctx, req)
    print(summary.text())
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
