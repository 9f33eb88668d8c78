"""FLUX single files in fp8: memory and transformer step time against the same weights held in float32.

    python benchmarks/flux_fp8.py [--rounds 3] [--double 1] [--single 2] [--size 256]

A random transformer with FLUX.1's real widths (3072 wide, 24 heads of 128; `--double`/`--single` blocks, FLUX.1
has 19 and 38) is written as a BFL-layout single file in float8_e4m3fn (every tensor, as fp8 releases are) under benchmarks/.out/, then loaded as the studio's loader does (fp8 layers stay fp8 in memory and
are cast up per layer as they run). Prints the transformer's bytes in memory against bf16 and float32, and the
seconds of one transformer step (a
`--size` image, 512 T5 tokens) with fp8 storage against the same fp8-rounded weights held in float32: the price
of casting each layer up, which the smaller memory buys.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)


def write_files(folder: Path, double: int, single: int) -> dict[str, Path]:
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from modules.model_store import flux_files
    paths = {"fp8": folder / f"flux-shaped-{double}-{single}-fp8.safetensors"}
    if all(p.is_file() for p in paths.values()):
        return paths
    print(f"writing FLUX-shaped files ({double} double + {single} single blocks) to {folder}...", flush=True)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    bfl = flux_files.to_bfl(model.state_dict(), dict(model.config))
    # as fp8 releases are (flux1-dev-fp8): every tensor in float8_e4m3fn
    save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in bfl.items()}, str(paths["fp8"]))
    return paths


def load_transformer(path: Path):
    """The file's transformer as the studio's loader builds it, all in float32 (keep_fp8_layers is then applied
    or not), and the file's dtype of every parameter."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from modules.model_store import flux_files
    bfl = load_file(str(path))
    config = flux_files.transformer_config(bfl)
    weights = flux_files.to_diffusers(bfl)
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    dtypes = {k: v.dtype for k, v in weights.items()}
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return model.eval(), dtypes


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def step_inputs(model, size: int):
    import torch
    g = torch.Generator().manual_seed(1)
    tokens = (size // 16) ** 2
    config = model.config
    return dict(hidden_states=torch.randn(1, tokens, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(512, 3), return_dict=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    import torch

    paths = write_files(scratch("flux-fp8"), args.double, args.single)
    from modules.model_store import text_encoders
    stored, dtypes = load_transformer(paths["fp8"])
    fp32_bytes = sum(p.numel() * 4 for p in stored.parameters())
    kept = text_encoders.keep_fp8_layers(stored, dtypes, torch.float32)
    bf16_bytes = fp32_bytes // 2  # a bf16 file's weights held at their own precision
    full, _ = load_transformer(paths["fp8"])  # the same fp8 values, held in float32
    print(f"transformer bytes: fp8 file {nbytes(stored) / 2**30:.2f} GiB ({kept} layers in fp8), "
          f"bf16 {bf16_bytes / 2**30:.2f} GiB, float32 {fp32_bytes / 2**30:.2f} GiB; "
          f"fp8/bf16 = {nbytes(stored) / bf16_bytes:.3f}, fp8/float32 = {nbytes(stored) / fp32_bytes:.3f}")
    inputs = step_inputs(full, args.size)
    times: dict[str, list[float]] = {"fp8 storage": [], "float32": []}
    with torch.inference_mode():
        a = stored(**inputs)[0]
        b = full(**inputs)[0]
        print(f"outputs differ by at most {float((a - b).abs().max()):.2e} (same values, cast up per layer)")
        for _ in range(args.rounds):
            for name, model in (("fp8 storage", stored), ("float32", full)):
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"transformer step, {args.size}x{args.size}: fp8 storage {med['fp8 storage']:.2f} s, float32 "
          f"{med['float32']:.2f} s, ratio {med['fp8 storage'] / med['float32']:.3f} ({args.rounds} rounds, medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
