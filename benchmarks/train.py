"""Training speed against its floor: the studio's trainer (modules/training) against a plain diffusers + peft LoRA
loop written the way diffusers' own training example does it, on the same model, data, batch, rank and precision.

    python benchmarks/train.py [--steps 6] [--warmup 2] [--size 256] [--rank 16] [--tiny]
    python benchmarks/train.py --case captioner [--steps 6] [--warmup 2] [--batch 2] [--repeat 1] [--threads 0] [--tiny]

Default: the full-size random SD 1.5 (SD 1.5's real shapes, made once by the tiny-model maker under
benchmarks/.out/models, about 2 GB) at 256x256, batch 1, LoRA rank 16 on the UNet, fp32 on the CPU (or the GPU
where there is one). Each variant runs in a process of its own (so peak memory is its own); the first `warmup`
steps are not timed. Prints seconds per step, the ratio ours/plain (target: at most 1.05), peak memory, and the
speed-up cached latents give (`--cache_latents`, the VAE encodes each image once).

`--case captioner`: the captioner method (Q-Former, query tokens and language projection of a BLIP-2 train) against
a plain transformers + accelerate loop on the same model, images, captions and batch: Accelerator.prepare, the
processor's inputs with the caption's tokens as labels, accelerator.backward, clipping, AdamW. The model is a
random BLIP-2 of moderate size made once under benchmarks/.out/models/BLIP2 (ViT 384x6 at 224 px, Q-Former 384x6
with 32 queries, OPT 512x6; about 60M parameters; `--tiny`: the test suite's tiny BLIP-2). No evaluation runs.
On a small shared machine one run's median moves by 10% from one process to the next; use
`--steps 20 --repeat 3` (the variants alternate) and, on 2 cores, `--threads 1`, and read the paired ratios.
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


# ------------------------------------------------------------------------------------------------ captioner

CAPTIONS = ["a photo of a red cat sitting on a blue chair", "a painting of a green tree in the mountains at dusk"]


def _captioner(tiny: bool) -> tuple[Path, str]:
    """(models folder, name) of the benchmark's BLIP-2: made once, kept under benchmarks/.out/models/BLIP2."""
    from modules.captioning.tiny import build_tiny_blip2, make_tiny_captioners
    if tiny:
        make_tiny_captioners(MODELS)
        return MODELS, "tiny-blip2"
    folder = MODELS / "BLIP2" / "bench-blip2"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import Blip2Config, Blip2ForConditionalGeneration

        from modules.core.fileio import atomic_folder
        _, processor = build_tiny_blip2()
        processor.num_query_tokens = 32
        processor.image_processor.size = {"height": 224, "width": 224}
        tok = processor.tokenizer
        config = Blip2Config(
            vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                               image_size=224, patch_size=16),
            qformer_config=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                                encoder_hidden_size=384, cross_attention_frequency=2, vocab_size=99),
            text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=512, num_hidden_layers=6,
                             num_attention_heads=8, ffn_dim=2048, max_position_embeddings=256,
                             word_embed_proj_dim=512, bos_token_id=2, eos_token_id=2, pad_token_id=1),
            num_query_tokens=32, image_token_index=tok.convert_tokens_to_ids("<image>"))
        torch.manual_seed(0)
        with atomic_folder(folder) as tmp:
            Blip2ForConditionalGeneration(config).save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return MODELS, "bench-blip2"


def _caption_data(batch: int) -> Path:
    import numpy as np
    from PIL import Image
    folder = OUT / "captions" / "1_things"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(max(2, batch)):
        path = folder / f"img{i}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
            (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder.parent


def worker_ours_captioner(args) -> dict:
    from modules.training import config, plan
    from modules.training.captioner import CaptionerTrainer
    models, name = _captioner(args.tiny)
    cfg = config.from_dict({
        "method": "captioner", "base": name, "models_dir": str(models), "train_data_dir": str(_caption_data(args.batch)),
        "output_dir": str(OUT / "ours-captioner"), "output_name": "bench", "run_dir": str(OUT / "ours-captioner-run"),
        "max_train_steps": args.warmup + args.steps, "train_batch_size": args.batch, "learning_rate": 1e-5,
        "seed": 0})
    times: list[tuple[float, float]] = []

    class Clock:
        def write(self, line):
            if '"event": "step"' in line:
                times.append((time.perf_counter(), time.process_time()))

        def flush(self):
            pass

    trainer = CaptionerTrainer(plan.make_plan(cfg), progress_stream=Clock())
    trainer._setup()
    start = (time.perf_counter(), time.process_time())
    trainer.run()
    stamps = [start] + times
    return {"per_step": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][args.warmup:],
            "cpu_per_step": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][args.warmup:], "peak_rss": _peak_rss()}


def worker_plain_captioner(args) -> dict:
    """transformers' BLIP-2 fine-tuning recipe on accelerate, reduced to its loop: the vision encoder and the language
    model frozen, the Q-Former side trained with AdamW, the caption's tokens (and an EOS) as labels."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    models, name = _captioner(args.tiny)
    path = models / "BLIP2" / name
    processor = AutoProcessor.from_pretrained(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if n.startswith(("qformer.", "query_tokens", "language_projection.")):
            p.requires_grad_(True)
    acc = Accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    model, opt = acc.prepare(model, opt)
    model.train()
    data = _caption_data(args.batch) / "1_things"
    files = sorted(data.glob("*.png"))
    prefix = len(processor(images=[Image.open(files[0]).convert("RGB")], text=[""])["input_ids"][0])
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    per_step, cpu_per_step = [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        chosen = [files[(step * args.batch + k) % len(files)] for k in range(args.batch)]
        images = [Image.open(f).convert("RGB") for f in chosen]
        captions = [f.with_suffix(".txt").read_text() for f in chosen]
        enc = processor(images=images, text=captions, return_tensors=None)
        ids = [list(x) + [eos] for x in enc["input_ids"]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, :prefix] = -100
        pixels = torch.as_tensor(np.stack([np.asarray(x) for x in enc["pixel_values"]]))
        with acc.accumulate(model):
            out = model(pixel_values=pixels.to(acc.device), input_ids=input_ids.to(acc.device),
                        attention_mask=mask.to(acc.device), labels=labels.to(acc.device))
            acc.backward(out.loss)
            acc.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        per_step.append(time.perf_counter() - t0)
        cpu_per_step.append(time.process_time() - c0)
    return {"per_step": per_step[args.warmup:], "cpu_per_step": cpu_per_step[args.warmup:], "peak_rss": _peak_rss()}


WORKERS = {"ours": worker_ours, "plain": worker_plain, "ours-captioner": worker_ours_captioner,
           "plain-captioner": worker_plain_captioner}


def run_worker(kind: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--size", str(args.size), "--rank", str(args.rank), "--batch", str(args.batch),
           "--threads", str(args.threads), *(["--tiny"] if args.tiny else []), *extra]
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
    p.add_argument("--case", choices=["lora", "captioner"], default="lora")
    p.add_argument("--batch", type=int, default=2, help="captioner: images per step")
    p.add_argument("--repeat", type=int, default=1, help="captioner: alternated runs of each variant")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in each worker (0: torch's default). 1 steadies the figures on a small "
                        "shared machine, where two threads contend with everything else running")
    p.add_argument("--worker", choices=list(WORKERS))
    args = p.parse_args()
    if args.worker:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.case == "captioner":
        captioner_case(args)
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


def captioner_case(args) -> None:
    _captioner(args.tiny)  # made once, before anything is timed
    runs: dict[str, list[dict]] = {"plain": [], "ours": []}
    for _ in range(args.repeat):  # alternated, so a busy moment of a shared machine hits both
        runs["plain"].append(run_worker("plain-captioner", args))
        runs["ours"].append(run_worker("ours-captioner", args))
    steps = {k: [x for r in v for x in r["per_step"]] for k, v in runs.items()}
    cpu = {k: statistics.median([x for r in v for x in r["cpu_per_step"]]) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in steps.items()}
    model = "tiny BLIP-2" if args.tiny else "random BLIP-2 (ViT 384x6, Q-Former 384x6, OPT 512x6)"
    print(f"captioner (Q-Former side trained), {model}, batch {args.batch}, fp32, {args.steps} timed steps x "
          f"{args.repeat}")
    for k in ("plain", "ours"):
        peak = max(r["peak_rss"] for r in runs[k])
        print(f"  {k:7s} {med[k]:.3f} s/step (median; fastest {min(steps[k]):.3f}; steps "
              f"{', '.join(f'{x:.2f}' for x in steps[k])}), peak RSS {peak / 2**30:.2f} GiB")
    print(f"ratio ours/plain: {med['ours'] / med['plain']:.3f} (target <= 1.05); fastest steps: "
          f"{min(steps['ours']) / min(steps['plain']):.3f}; CPU time per step (median, what other processes on a "
          f"shared machine disturb least): {cpu['ours']:.3f} / {cpu['plain']:.3f} = {cpu['ours'] / cpu['plain']:.3f}")
    paired = [statistics.median(o["per_step"]) / statistics.median(q["per_step"])
              for o, q in zip(runs["ours"], runs["plain"])]
    print(f"ratio of each back-to-back pair of runs: {', '.join(f'{x:.3f}' for x in paired)} "
          f"(median {statistics.median(paired):.3f})")


if __name__ == "__main__":
    main()
