"""FLUX txt2img speed against plain diffusers on a full-size-shaped random FLUX.1-dev transformer.

    python benchmarks/flux.py [--rounds 3] [--steps 2] [--size 256] [--double 1] [--single 2] [--schnell]

The transformer has FLUX.1's real widths (3072 wide, 24 heads of 128, T5 width 4096, CLIP pooled 768, 64 latent
channels in, distilled guidance embedded; `--schnell`: without it, 256 T5 tokens) but only `--double`
double-stream and `--single` single-stream blocks (FLUX.1 has 19 and 38: the full model is 12B parameters, 48 GB
in float32), so a step's cost per block is the real one. The text encoders and VAE are small (they run once per
image, not per step). The folder is made once under benchmarks/.out/models/Stable-diffusion/flux-shaped/.

Prints seconds per image for the project (txt2img through the processing loop, on the model manager's copy) and
for plain diffusers' FluxPipeline over the same modules with the same prompt embeddings, generators and
scheduler, alternating runs so drift hits both, and their ratio (target <= 1.02).
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

MARKER = "flux-shaped.txt"


def make_folder(folder: Path, double: int, single: int, schnell: bool) -> None:
    recipe = f"double={double} single={single} schnell={schnell}\n"
    if (folder / MARKER).is_file() and (folder / MARKER).read_text() == recipe:
        return
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from modules.core.fileio import atomic_folder
    from modules.demo.tiny_flow import t5_tokenizer
    from modules.prompting.clip_tokenizer import clip_tokenizer

    print(f"making {folder} (random, FLUX.1's widths, {double} double + {single} single blocks)...", flush=True)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=double, num_single_layers=single,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=not schnell,
                                         axes_dims_rope=(16, 56, 56))
    tokenizer_2 = t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=12,
                                                num_hidden_layers=1, vocab_size=49408, max_position_embeddings=77,
                                                projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=64,
                                             num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)
    dynamic = {} if schnell else dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                      base_image_seq_len=256, max_image_seq_len=4096)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0 if schnell else 3.0, **dynamic)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(recipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--schnell", action="store_true")
    args = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from modules import generation
    from modules.model_store import sd_pipelines

    torch.set_num_threads(os.cpu_count() or 1)
    root = MODELS / "Stable-diffusion"
    make_folder(root / "flux-shaped", args.double, args.single, args.schnell)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = generation.local_context([root], scratch("flux"), device=device, ram_budget=20 * 2**30,
                                   vram_budget=int(torch.cuda.mem_get_info()[0] * 0.8) if device == "cuda" else 0)
    info = ctx.registry.find("flux-shaped")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ctx.dtype = dtype
    t0 = time.perf_counter()
    with sd_pipelines.use_checkpoint(ctx.manager, info, dtype=dtype) as bundle:
        components = dict(bundle.components)
        params = sum(p.numel() for p in bundle.denoiser.parameters())
    print(f"load: {time.perf_counter() - t0:.1f} s; transformer {params / 1e9:.2f}B parameters, {dtype}, {device}")
    plain = FluxPipeline(**{k: v for k, v in components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})
    plain.set_progress_bar_config(disable=True)
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    settings = {"sd_model_checkpoint": "flux-shaped", "live_previews_enable": False}
    req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, sampler_name="Euler", steps=args.steps,
                                                        cfg_scale=1.0, width=args.size, height=args.size, seed=1,
                                                        save_images=False))
    length = 256 if args.schnell else 512
    with torch.inference_mode():
        embeds, pooled, _ = plain.encode_prompt(prompt, None, num_images_per_prompt=1, max_sequence_length=length)

    def ours():
        generation.run_txt2img(ctx, req, None, settings)

    def theirs():
        plain(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=args.steps, guidance_scale=3.5,
              height=args.size, width=args.size, generator=[torch.Generator().manual_seed(1)], output_type="pil",
              max_sequence_length=length)

    ours(), theirs()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"project": [], "diffusers": []}
    for _ in range(args.rounds):
        for name, fn in (("project", ours), ("diffusers", theirs)):
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    p, d = statistics.median(times["project"]), statistics.median(times["diffusers"])
    tokens = (args.size // 16) ** 2
    print(f"FLUX-shaped txt2img {args.size}x{args.size} ({tokens} image + {length} text tokens), {args.steps} steps, "
          f"{args.double} double + {args.single} single blocks, {args.rounds} rounds (median):")
    print(f"  project   {p:.2f} s/image   {['%.2f' % x for x in times['project']]}")
    print(f"  diffusers {d:.2f} s/image   {['%.2f' % x for x in times['diffusers']]}")
    print(f"  ratio project/diffusers = {p / d:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
