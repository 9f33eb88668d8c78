"""Headless batch captioning: `python -m modules.caption DIR --model NAME [...]` writes a caption file beside each image.

The same work as the UI's batch captioning (modules.captioning.service.run_batch), without a server:
models are looked up in MODELS_DIR/BLIP2 and MODELS_DIR/BLIP and loaded through a model manager of its own.

    python -m modules.caption evaluate DIR --model NAME [--extension .txt] [--output scores.json]
    python -m modules.caption evaluate --vqa-json qa.json --model NAME

scores a captioner the way the Caption tab's Evaluation does (modules.captioning.service.run_evaluate): the
images of DIR (and its sub-folders) against the reference captions beside them (one per line) with BLEU-1..4,
ROUGE-L and CIDEr, or the answers to a JSON list of {image, question, answers} with the VQA accuracy.
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


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modules.caption evaluate",
                                description="Score a captioner: BLEU-1..4, ROUGE-L and CIDEr against reference "
                                            "captions, or VQA accuracy on a question/answer file.")
    p.add_argument("dir", nargs="?", default=None, help="folder of images with reference caption files beside them")
    p.add_argument("--vqa-json", default=None, help='instead: a JSON list of {"image", "question", "answers"}')
    p.add_argument("--model", default=None, help="captioner folder name (default: the default captioner)")
    p.add_argument("--models-dir", default=None, help="root of BLIP2/ and BLIP/ (default: ./models)")
    p.add_argument("--extension", default=".txt", help="reference caption files' extension (default .txt)")
    p.add_argument("--prompt", default="", help='text the captions continue, e.g. "a photo of"')
    p.add_argument("--num-beams", type=int, default=5)
    p.add_argument("--min-length", type=int, default=8)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--output", default=None, help="also write the scores and predictions to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "full", "half", "bf16"])
    return p


def evaluate_main(argv: list[str]) -> int:
    args = build_evaluate_parser().parse_args(argv)
    import json

    from modules.captioning import (
        CaptionerError,
        CaptionerRegistry,
        CaptionSettings,
        EvaluateRequest,
    )
    from modules.captioning.service import (
        check_folder,
        normalize_extension,
        run_evaluate,
    )
    from modules.core import paths

    models_dir = Path(args.models_dir) if args.models_dir else paths.REPO_ROOT / "models"
    registry = CaptionerRegistry([models_dir / "BLIP2", models_dir / "BLIP"])
    try:
        if bool(args.dir) == bool(args.vqa_json):
            raise CaptionerError("give a folder of captioned images or --vqa-json FILE (one of the two)")
        settings = CaptionSettings(prompt=args.prompt, num_beams=args.num_beams, min_length=args.min_length,
                                   max_length=args.max_length).validate()
        if args.vqa_json:
            if not Path(args.vqa_json).is_file():
                raise CaptionerError(f"VQA file {args.vqa_json!r} does not exist")
            req = EvaluateRequest(folder=Path("."), model=args.model, settings=settings, vqa_json=Path(args.vqa_json))
            registry.resolve(args.model, purpose="vqa")
        else:
            req = EvaluateRequest(folder=check_folder(args.dir), model=args.model, settings=settings,
                                  extension=normalize_extension(args.extension))
            registry.resolve(args.model, purpose="caption")
    except CaptionerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = local_context(registry, args)
    started = time.perf_counter()
    try:
        result = run_evaluate(ctx, req)
    except (CaptionerError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:14s} {value:.4f}")
    print(f"{'count':14s} {result['count']}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    if args.output:
        from modules.core.fileio import atomic_write_text
        atomic_write_text(Path(args.output), json.dumps(result, indent=1))
    return 0


def local_context(registry, args):
    """A captioning context of the command's own: a model manager on --device with the default budgets."""
    from modules.captioning.service import CaptionContext
    from modules.core import devices
    from modules.model_store.model_manager import ModelManager

    device = devices.resolve_device(args.device)
    vram, ram = devices.default_budgets(device)
    return CaptionContext(registry=registry, manager=ModelManager(device, vram, ram),
                          dtype=devices.resolve_dtype(args.precision, device))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    from modules.captioning import (
        BatchCaptionRequest,
        CaptionerError,
        CaptionerRegistry,
        CaptionSettings,
    )
    from modules.captioning.service import (
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
    ctx = local_context(registry, args)
    started = time.perf_counter()
    summary = run_batch(ctx, req)
    print(summary.text())
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
