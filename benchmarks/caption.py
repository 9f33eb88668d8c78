"""Caption and VQA time against plain transformers on the same random BLIP-2 (tiny, or a bigger one).

    python benchmarks/caption.py [--size tiny|medium] [--rounds 5] [--device auto]

The project's path (request -> model manager lease -> processor -> generate -> decode) and the plain
`processor(...)` + `model.generate(...)` + `batch_decode` call run on the same loaded weights with the
same settings, alternating so drift hits both. Prints median seconds and their ratio (target <= 1.05).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)


def write_medium_blip2(folder: Path) -> None:
    """A bigger random BLIP-2 (224 px images, 32 query tokens, a 6-layer 512-wide OPT): generation dominates."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    from modules.captioning import tiny

    tokenizer = tiny._bpe_tokenizer()
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=tiny.IMAGE_MEAN,
                                                  image_std=tiny.IMAGE_STD), tokenizer, num_query_tokens=32)
    config = Blip2Config(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                           image_size=224, patch_size=16),
        qformer_config=dict(vocab_size=99, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                            intermediate_size=1024, encoder_hidden_size=256),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=6,
                         num_attention_heads=8, ffn_dim=2048, max_position_embeddings=512, word_embed_proj_dim=512,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder / "BLIP2" / "medium-blip2")
    processor.save_pretrained(folder / "BLIP2" / "medium-blip2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from modules.captioning import (
        VQA_SETTINGS,
        CaptionerRegistry,
        CaptionRequest,
        CaptionSettings,
        VqaRequest,
    )
    from modules.captioning.models import use_captioner
    from modules.captioning.service import (
        CaptionContext,
        run_caption,
        run_vqa,
        vqa_prompt,
    )
    from modules.captioning.tiny import make_tiny_captioners
    from modules.core import devices
    from modules.model_store.model_manager import ModelManager

    tmp = scratch("caption")
    name = "tiny-blip2"
    if args.size == "medium":
        write_medium_blip2(tmp)
        name = "medium-blip2"
    else:
        make_tiny_captioners(tmp)
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype("auto", device)
    vram, ram = devices.default_budgets(device)
    ctx = CaptionContext(CaptionerRegistry([tmp / "BLIP2"]), ModelManager(device, vram, ram), dtype)
    info = ctx.registry.find(name)
    image = Image.fromarray((np.random.RandomState(0).rand(300, 400, 3) * 255).astype("uint8"))
    caption_settings = CaptionSettings(prompt="a photo of", num_beams=5, min_length=8, max_length=30)
    question = "what is in the picture?"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with use_captioner(ctx.manager, info, dtype) as loaded:  # one load: both paths use these weights
        model, processor = loaded.model, loaded.processor

        def plain(prompt, settings):
            inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            with torch.inference_mode():
                out = model.generate(**inputs, **settings.generate_kwargs())
            return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

        cases = {
            "caption": (lambda: run_caption(ctx, CaptionRequest(image, name, caption_settings)),
                        lambda: plain("a photo of", caption_settings)),
            "vqa": (lambda: run_vqa(ctx, VqaRequest(image, question, name)),
                    lambda: plain(vqa_prompt(info, question), VQA_SETTINGS)),
        }
        print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, model {name}, {args.rounds} rounds")
        for label, (ours, theirs) in cases.items():
            ours(), theirs()  # warm-up
            t_ours, t_plain = [], []
            for _ in range(args.rounds):
                for fn, times in ((ours, t_ours), (theirs, t_plain)):
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                    times.append(time.perf_counter() - start)
            a, b = statistics.median(t_ours), statistics.median(t_plain)
            print(f"{label:8s} project {a * 1000:8.1f} ms   plain transformers {b * 1000:8.1f} ms   "
                  f"ratio {a / b:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
