"""Memory and time of the Checkpoint Merger: a weighted sum of two random full-size SD 1.5 checkpoints.

    python benchmarks/merge.py [--models DIR] [--format safetensors|ckpt] [--half] [--compare] [--keep]

Makes two random SD 1.5-shaped single files (SD 1.5's real shapes in the LDM layout, fp16, about 2 GB each, by
the tiny-model maker's full-size recipe with two seeds) under the git-ignored benchmarks/.models/merge/ (reused
when present), then merges them (weighted sum, M = 0.5, metadata on) in a child process of its own and prints its
peak memory against one checkpoint's file size (target: under 1.5x), and the seconds. The inputs are hashed first
(their sha256 goes into the metadata; cached in benchmarks/.out/merge/ for later runs) and timed apart.
`--compare` also runs the whole-dict way (safetensors' load_file of both, merge, save_file) for contrast.

Peak RSS (VmHWM) counts file pages a process has mapped as well as its own memory. The merger reads its inputs
with plain reads (no mmap), so its RSS is nearly all anonymous memory: the interpreter, torch and a few tensors
at a time. RssAnon / RssFile are sampled every 10 ms (the kernel keeps no peak of them); the sampled peaks can
miss a spike shorter than that, VmHWM cannot. A memory-mapped reader (safe_open) would show every page of both
inputs it touched in RssFile (reclaimable page cache, but counted in RSS until unmapped).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)

MODELS = REPO / "benchmarks" / ".models" / "merge"  # git-ignored
SEEDS = {"random-a": 2, "random-b": 12}


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """The highest VmRSS / RssAnon / RssFile seen, sampled on a thread every `every` seconds."""

    def __init__(self, every: float = 0.01):
        self.peak: dict[str, int] = {}
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in _status().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self._stop.wait(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for key, value in _status().items():
            self.peak[key] = max(self.peak.get(key, 0), value)


def make(path: Path, seed: int) -> None:
    from modules.core import console
    from modules.demo import tiny_models

    console.quiet_libraries()
    tiny_models.write_full_size_sd15(path, seed=seed)


def child_ours(args) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as the merge needs it)

    from modules.model_store import checkpoints, hashing, merging, sd_vae

    out = scratch("merge")
    baseline = _status()
    cache = hashing.HashCache(out / "cache.json")
    registry = checkpoints.CheckpointRegistry([args.models], hash_cache=cache)
    vaes = sd_vae.VaeRegistry(out / "no-vaes", cache)
    started = time.perf_counter()
    for info in registry.list():
        info.sha256  # the recipe's hashes (cached for later runs)
    hashed = time.perf_counter() - started
    req = merging.MergeRequest("random-a", "random-b", multiplier=0.5, custom_name="merged", overwrite=True,
                               checkpoint_format=args.format, save_as_half=args.half)
    with Sampler() as sampler:
        started = time.perf_counter()
        result = merging.merge_checkpoints(registry, vaes, req, output_dir=out)
        seconds = time.perf_counter() - started
    size = result.path.stat().st_size
    if not args.keep:
        result.path.unlink()
    return {"seconds": seconds, "hash_seconds": hashed, "baseline": baseline, "peak": sampler.peak,
            "VmHWM": _status()["VmHWM"], "output_bytes": size}


def child_whole(args) -> dict:
    """The whole-dict way, for contrast: both files loaded, merged, saved at once."""
    import torch
    from safetensors.torch import load_file, save_file

    out = scratch("merge")
    baseline = _status()
    with Sampler() as sampler:
        started = time.perf_counter()
        a = load_file(str(args.models / "random-a.safetensors"))
        b = load_file(str(args.models / "random-b.safetensors"))
        for key in a:
            a[key] = (a[key].float() * 0.5 + b[key].float() * 0.5).to(torch.float16)
        del b
        path = out / "merged-whole.safetensors"
        save_file(a, str(path))
        seconds = time.perf_counter() - started
    path.unlink()
    return {"seconds": seconds, "baseline": baseline, "peak": sampler.peak, "VmHWM": _status()["VmHWM"]}


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--models", str(args.models), "--format", args.format]
    cmd += ["--half"] if args.half else []
    cmd += ["--keep"] if args.keep else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    parser.add_argument("--half", action="store_true", help="save as float16 (the inputs are fp16 already)")
    parser.add_argument("--compare", action="store_true", help="also run the whole-dict merge for contrast")
    parser.add_argument("--keep", action="store_true", help="keep the merged file in benchmarks/.out/merge/")
    parser.add_argument("--child", choices=("ours", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.make:
        make(args.make, args.seed)
        return
    if args.child:
        result = child_ours(args) if args.child == "ours" else child_whole(args)
        print(json.dumps(result))
        return

    args.models.mkdir(parents=True, exist_ok=True)
    for name, seed in SEEDS.items():
        path = args.models / f"{name}.safetensors"
        if not path.exists():
            print(f"making {path} (random SD 1.5 shapes, fp16, about 2 GB; once)", flush=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make", str(path), "--seed", str(seed)], check=True, cwd=REPO)
            print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    size = (args.models / "random-a.safetensors").stat().st_size
    rows = [("merger (streamed)" if args.format == "safetensors" else "merger (.ckpt output: built whole)",
             run_child("ours", args))]
    if args.compare:
        rows.append(("whole dicts (load_file, save_file)", run_child("whole", args)))
    lines = [f"weighted sum of two random SD 1.5 checkpoints (fp16, {gb(size)} each) -> {args.format}"
             + (" fp16" if args.half else ""), ""]
    for label, r in rows:
        peak, base = r["peak"], r["baseline"]
        lines.append(f"{label}: {r['seconds']:.1f} s" + (f" (+ {r['hash_seconds']:.1f} s hashing the inputs)"
                                                          if "hash_seconds" in r else ""))
        lines.append(f"  peak RSS (VmHWM) {gb(r['VmHWM'])} = {r['VmHWM'] / size:.2f}x one checkpoint "
                     f"(after imports: {gb(base['VmRSS'])})")
        lines.append(f"  sampled peaks: RssAnon {gb(peak.get('RssAnon', 0))} = {peak.get('RssAnon', 0) / size:.2f}x, "
                     f"RssFile {gb(peak.get('RssFile', 0))}")
    print("\n".join(lines))
    (scratch("merge") / f"result-{args.format}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
