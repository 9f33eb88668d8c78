"""txt2img speed against plain diffusers on the same full-size (random SD1.5) checkpoint, and server start time.

    python benchmarks/txt2img.py [--rounds 3] [--steps 4] [--size 256] [--models DIR]

Prints seconds per image for the project and for the plain diffusers pipeline (same modules, same
scheduler, same generators), alternating runs so drift hits both, their ratio (target <= 1.02), and the
server's start-to-ready time (target <= 4 s, with no model loaded before a request needs one).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, REPO, scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)


def generation_speed(models: Path, rounds: int, steps: int, size: int) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from modules import generation
    from modules.model_store import sd_pipelines

    torch.set_num_threads(os.cpu_count() or 1)
    out = scratch("txt2img")
    ctx = generation.local_context([models / "Stable-diffusion"], out, ram_budget=16 * 2**30)
    registry, manager = ctx.registry, ctx.manager
    settings = {"sd_model_checkpoint": "sd15-random.safetensors", "live_previews_enable": False}
    info = registry.find("sd15-random.safetensors")
    t0 = time.perf_counter()
    with sd_pipelines.use_checkpoint(manager, info, dtype=torch.float32) as bundle:
        components = bundle.components
    print(f"checkpoint load (single file, shipped sd1 config): {time.perf_counter() - t0:.1f} s")
    plain = StableDiffusionPipeline(**{k: v for k, v in components.items() if k != "scheduler"},
                                    scheduler=EulerDiscreteScheduler.from_config(
                                        components["scheduler"].config, timestep_spacing="linspace"))
    plain.set_progress_bar_config(disable=True)
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, sampler_name="Euler", steps=steps,
                                                        width=size, height=size, seed=1, save_images=False))

    def ours():
        generation.run_txt2img(ctx, req, None, settings)

    def theirs():
        plain(prompt, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
              generator=[torch.Generator().manual_seed(1)], output_type="pil")

    ours(), theirs()  # warm-up (allocator, kernels)
    times = {"project": [], "diffusers": []}
    for _ in range(rounds):
        for name, fn in (("project", ours), ("diffusers", theirs)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    p, d = statistics.median(times["project"]), statistics.median(times["diffusers"])
    print(f"txt2img {size}x{size}, {steps} steps, Euler, {rounds} rounds (median):")
    print(f"  project   {p:.2f} s/image   {['%.2f' % x for x in times['project']]}")
    print(f"  diffusers {d:.2f} s/image   {['%.2f' % x for x in times['diffusers']]}")
    print(f"  ratio project/diffusers = {p / d:.3f}  (target <= 1.02)")


def start_time(models: Path, repeats: int = 3) -> None:
    import requests
    results = []
    for i in range(repeats):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        data = scratch(f"start-data-{i}")
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "webui.py"), "--api", "--port", str(port),
                                 "--data-dir", str(data), "--models-dir", str(models)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.02)
            ready = time.perf_counter() - t
            loaded = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/memory").json()["models"]
            results.append(ready)
            print(f"  start {i + 1}: ready in {ready:.2f} s, models loaded at ready: {len(loaded)}")
        finally:
            proc.terminate()
            proc.wait()
    print(f"server start-to-ready (UI + API): median {statistics.median(results):.2f} s  (target <= 4 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    from modules.demo import tiny_models
    tiny_models.make_tiny_models(args.models, full_size=not args.skip_generation)
    start_time(args.models)
    if not args.skip_generation:
        generation_speed(args.models, args.rounds, args.steps, args.size)


if __name__ == "__main__":
    main()
