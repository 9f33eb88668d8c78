"""Training speed against its floor: the studio's trainer (modules/training) against a plain diffusers + peft LoRA
loop written the way diffusers' own training example does it, on the same model, data, batch, rank and precision.

    python benchmarks/train.py [--steps 6] [--warmup 2] [--size 256] [--rank 16] [--tiny]

Default: the full-size random SD 1.5 (SD 1.5's real shapes, made once by the tiny-model maker under
benchmarks/.out/models, about 2 GB) at 256x256, batch 1, LoRA rank 16 on the UNet, fp32 on the CPU (or the GPU
where there is one). Each variant runs in a process of its own (so peak memory is its own); the first `warmup`
steps are not timed. Prints seconds per step, the ratio ours/plain (target: at most 1.05), peak memory, and the
speed-up cached latents give (`--cache_latents`, the VAE encodes each image once).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, REPO, scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)

OUT = scratch("train")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dataset(size: int) -> Path:
    import numpy as np
    from PIL import Image
    folder = OUT / f"data-{size}" / "1_sks cube"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        path = folder / f"img{i}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
            (folder / f"img{i}.txt").write_text("sks cube, a photo")
    return folder.parent


def _checkpoint(tiny: bool) -> tuple[Path, str]:
    from modules.demo import tiny_models
    tiny_models.make_tiny_models(MODELS, full_size=not tiny)
    return MODELS, "tiny-sd15.safetensors" if tiny else "sd15-random.safetensors"


def worker_ours(args) -> dict:
    from modules.training import config, engine, plan
    models, name = _checkpoint(args.tiny)
    cfg = config.from_dict({
        "method": "lora", "pretrained_model_name_or_path": name, "models_dir": str(models),
        "train_data_dir": str(_dataset(args.size)), "output_dir": str(OUT / "ours"), "output_name": "bench",
        "run_dir": str(OUT / "ours-run"), "resolution": args.size, "max_train_steps": args.warmup + args.steps,
        "network_dim": args.rank, "network_alpha": args.rank, "network_train_unet_only": True,
        "learning_rate": 1e-4, "cache_latents": args.cache_latents, "seed": 0})
    times: list[float] = []

    class Clock:
        def write(self, line):
            if '"event": "step"' in line:
                times.append(time.perf_counter())

        def flush(self):
            pass

    trainer = engine.Trainer(plan.make_plan(cfg), progress_stream=Clock())
    trainer._setup()
    start = time.perf_counter()
    trainer.run()
    stamps = [start] + times
    per_step = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    return {"per_step": per_step, "peak_rss": _peak_rss()}


def worker_plain(args) -> dict:
    """diffusers' train_text_to_image_lora recipe, reduced to its loop: frozen VAE/TE/UNet, peft LoRA on the UNet,
    AdamW, VAE encode and text encode every step, MSE on the noise."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image

    from modules.model_store import checkpoints, loading
    models, name = _checkpoint(args.tiny)
    registry = checkpoints.CheckpointRegistry([models / "Stable-diffusion"])
    comps = loading.load_checkpoint(registry.resolve(name)).components
    unet, vae, te, tok = comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for m in (unet, vae, te):
        m.requires_grad_(False).to(device)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                "ff.net.0.proj", "ff.net.2"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(comps["scheduler"].config)
    data = _dataset(args.size) / "1_sks cube"
    images = [np.asarray(Image.open(data / f"img{i}.png").convert("RGB"), np.float32) for i in range(2)]
    unet.train()
    per_step = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x = torch.from_numpy(images[step % 2].copy()).permute(2, 0, 1)[None].to(device) / 127.5 - 1
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(["sks cube, a photo"], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
        pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step.append(time.perf_counter() - t0)
    return {"per_step": per_step[args.warmup:], "peak_rss": _peak_rss()}


def run_worker(kind: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--size", str(args.size), "--rank", str(args.rank), *(["--tiny"] if args.tiny else []), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="the tiny model (a quick check that the script runs)")
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--worker", choices=["ours", "plain"])
    args = p.parse_args()
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_plain)(args)
        print(json.dumps(result))
        return
    _checkpoint(args.tiny)  # made once, before anything is timed
    plain = run_worker("plain", args)
    ours = run_worker("ours", args)
    cached = run_worker("ours", args, ["--cache_latents"])
    med = {k: statistics.median(v["per_step"]) for k, v in (("plain", plain), ("ours", ours), ("cached", cached))}
    model = "tiny SD1.5" if args.tiny else "full-size random SD1.5"
    print(f"LoRA rank {args.rank}, {model}, {args.size}x{args.size}, batch 1, fp32, {args.steps} timed steps")
    for k in ("plain", "ours", "cached"):
        r = {"plain": plain, "ours": ours, "cached": cached}[k]
        print(f"  {k:7s} {med[k]:.3f} s/step (median; steps {', '.join(f'{x:.2f}' for x in r['per_step'])}), "
              f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    print(f"ratio ours/plain: {med['ours'] / med['plain']:.3f} (target <= 1.05)")
    print(f"cached latents speed-up: {med['ours'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()
