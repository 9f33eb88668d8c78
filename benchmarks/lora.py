"""Per-image cost of LoRAs: one and three LoRAs against none, on the full-size random SD1.5 checkpoint.

    python benchmarks/lora.py [--rounds 2] [--steps 2] [--size 256] [--rank 16] [--models DIR]

Writes three random kohya-format LoRAs (every attention projection of the UNet and text encoder) into a
scratch Lora folder, then times txt2img with no LoRA, one, and three, alternating so drift hits all three
alike, and prints seconds per image and the overhead of each against none (target: under 5%); then times
the merge and restore alone, the part of the overhead that is not sampling noise.
The LoRA files are loaded once (the model manager caches them); each request merges and unmerges them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", type=Path, default=MODELS)
    args = parser.parse_args()

    import torch

    from modules import generation, networks
    from modules.demo import tiny_models
    from modules.demo.tiny_networks import kohya_lora_state
    from modules.model_store import sd_pipelines

    torch.set_num_threads(os.cpu_count() or 1)
    if not (args.models / "Stable-diffusion" / f"{tiny_models.SD15_RANDOM}.safetensors").exists():
        tiny_models.make_tiny_models(args.models, full_size=True)
    out = scratch("lora")
    lora_dir = args.models / "Lora"  # beside the checkpoints (git-ignored), made once
    ctx = generation.local_context([args.models / "Stable-diffusion"], out, lora_dirs=[lora_dir],
                                   ram_budget=32 * 2**30)
    registry, manager = ctx.registry, ctx.manager
    info = registry.find(tiny_models.SD15_RANDOM)
    lora_dir = args.models / "Lora"  # beside the checkpoints (git-ignored), made once
    with sd_pipelines.use_checkpoint(manager, info, dtype=torch.float32) as bundle:
        for i in range(3):
            path = lora_dir / f"bench-lora-{i}.safetensors"
            if not path.exists():
                state = kohya_lora_state(bundle.components, rank=args.rank, seed=100 + i, scale=0.01)
                tiny_models._write_safetensors(path, state, {})
    nets = ctx.networks
    nets.loras.refresh()  # the LoRA files were just written
    prompts = {
        "none": "a lighthouse at dusk",
        "1 LoRA": "a lighthouse at dusk <lora:bench-lora-0:0.8>",
        "3 LoRAs": "a lighthouse at dusk <lora:bench-lora-0:0.8> <lora:bench-lora-1:0.5> <lora:bench-lora-2:0.3>",
    }

    def once(prompt: str) -> float:
        req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=args.steps, width=args.size,
                                                            height=args.size, seed=1, save_images=False))
        started = time.perf_counter()
        res = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": info.name, "return_grid": False})
        assert not res.info["warnings"], res.info["warnings"]
        return time.perf_counter() - started

    for prompt in prompts.values():
        once(prompt)  # warm-up: loads the checkpoint and each LoRA file once
    times: dict[str, list[float]] = {k: [] for k in prompts}
    for _ in range(args.rounds):
        for key, prompt in prompts.items():
            times[key].append(once(prompt))
    none = statistics.median(times["none"])
    print(f"full-size random SD1.5, {args.size}x{args.size}, {args.steps} steps, rank-{args.rank} LoRAs, "
          f"median of {args.rounds} rounds, {torch.get_num_threads()} CPU threads")
    for key in prompts:
        t = statistics.median(times[key])
        print(f"{key:8s} {t:7.2f} s/image  overhead {100 * (t - none) / none:+.1f}%   "
              f"rounds {['%.2f' % x for x in times[key]]}")
    lora_loads = [r["loads"] for r in manager.report() if r["kind"] == "lora"]
    print(f"LoRA files loaded from disk: {lora_loads} (once each: later requests are cache hits)")

    # The part of that overhead which is the merge itself, timed alone (the whole-image figures above also
    # carry the run-to-run spread of sampling): merging into and restoring the checkpoint's weights.
    with sd_pipelines.use_checkpoint(manager, info, dtype=torch.float32) as bundle:
        for key, prompt in list(prompts.items())[1:]:
            resolved = nets.resolve(prompt)
            with nets.leased(manager, resolved, []) as applied:
                merge, restore = [], []
                for _ in range(7):
                    started = time.perf_counter()
                    with networks.applied_loras(bundle, applied, []):
                        merged = time.perf_counter()
                    merge.append(merged - started)
                    restore.append(time.perf_counter() - merged)
            m, r = statistics.median(merge), statistics.median(restore)
            print(f"{key:8s} merge {1000 * m:5.0f} ms + restore {1000 * r:4.0f} ms per request "
                  f"= {100 * (m + r) / none:.1f}% of a no-LoRA image")


if __name__ == "__main__":
    main()
