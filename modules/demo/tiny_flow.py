"""Tiny random-weight FLUX.1 and SD3 models (diffusers folders), made by this project's own code for tests and
demos, in the layout their diffusers pipelines save:

- Stable-diffusion/tiny-flux-diffusers/: FLUX.1-dev's design (a CLIP-L-like encoder for the pooled vector, a
  T5-like encoder for the sequence, the double- and single-stream transformer with distilled guidance
  embedded, a 16-channel-latent VAE with a shift factor, and dev's dynamically shifted flow-matching
  schedule), every part a few kB;
- Stable-diffusion/tiny-sd3-diffusers/: SD3's design (two projected CLIP encoders, T5, the MMDiT transformer,
  a shifted flow-matching schedule).

The T5 tokenizer is built here too (a small Unigram vocabulary in T5's layout: `<pad>` 0, `</s>` 1, `<unk>` 2,
a `</s>` after every text), since T5's own vocabulary is not shipped with the project.

    from modules.demo.tiny_flow import make_tiny_flow_models
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_FLUX_DIFFUSERS = "tiny-flux-diffusers"
TINY_SD3_DIFFUSERS = "tiny-sd3-diffusers"
TINY_FLUX_SEED = 20
TINY_SD3_SEED = 30

# Words the tiny T5 vocabulary knows whole; anything else is spelled with single characters.
_WORDS = ("a photo of the an and in on with at cat dog red blue green house tree sky painting portrait woman man "
          "highly detailed cube sks landscape mountain city night light dark style art digital beautiful").split()

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
               eos_token_id=1)
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 4, 8))
# 16 latent channels, as both families' VAEs have (FLUX packs 2x2 of them into one 64-wide token)
TINY_FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                     use_post_quant_conv=False)
# SD3: CLIP-L-like (32) and CLIP-G-like (48) encoders, their hidden states joined (80) and padded to T5's width
# (96) as SD3's 768 + 1280 are padded to 4096; pooled outputs joined (32 + 32).
TINY_SD3_T5 = dict(TINY_T5, d_model=96, d_kv=12, num_heads=8)
TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)


def t5_tokenizer():
    """A T5-layout tokenizer over a tiny Unigram vocabulary (see the module docstring)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.:;!?()[]<>-_'\"")
    pieces = ["▁"] + [f"▁{w}" for w in _WORDS] + [f"▁{c}" for c in chars] + chars
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(len(p))) for p in dict.fromkeys(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def _t5(config: dict, vocab_size: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, **config)).eval()


def _flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def build_tiny_flux(seed: int = TINY_FLUX_SEED) -> dict[str, Any]:
    """Tiny FLUX.1-dev-style components (FluxPipeline's), float32."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.demo.tiny_models import TINY_TEXT_ENCODER
    from modules.prompting.clip_tokenizer import clip_tokenizer

    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER).eval()
    torch.manual_seed(seed + 1000)
    vae = AutoencoderKL(**TINY_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159).eval()
    torch.manual_seed(seed + 2000)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)).eval()
    return {
        "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": clip_tokenizer(),
        "text_encoder_2": _t5(TINY_T5, len(tokenizer_2), seed + 3000), "tokenizer_2": tokenizer_2,
        # FLUX.1-dev's schedule: shifted by the image's token count (0.5 at 256 tokens .. 1.15 at 4096)
        "scheduler": _flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                     base_image_seq_len=256, max_image_seq_len=4096),
    }


def build_tiny_sd3(seed: int = TINY_SD3_SEED) -> dict[str, Any]:
    """Tiny SD3-style components (StableDiffusion3Pipeline's), float32."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from modules.demo.tiny_models import (
        TINY_SDXL_TEXT_ENCODER,
        TINY_SDXL_TEXT_ENCODER_2,
    )
    from modules.prompting.clip_tokenizer import clip_tokenizer

    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval()
    torch.manual_seed(seed + 1000)
    vae = AutoencoderKL(**TINY_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609).eval()
    torch.manual_seed(seed + 2000)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER)).eval()
    torch.manual_seed(seed + 2500)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2)).eval()
    return {
        "transformer": transformer, "vae": vae,
        "text_encoder": text_encoder, "tokenizer": clip_tokenizer(),
        "text_encoder_2": text_encoder_2, "tokenizer_2": clip_tokenizer("!"),
        "text_encoder_3": _t5(TINY_SD3_T5, len(tokenizer_3), seed + 3000), "tokenizer_3": tokenizer_3,
        "scheduler": _flow_scheduler(shift=3.0),  # SD3's
    }


def write_flow_folder(folder: Path, components: dict[str, Any]) -> None:
    """The components as a diffusers folder (FluxPipeline or StableDiffusion3Pipeline's save_pretrained)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from modules.core.fileio import atomic_folder
    from modules.demo.tiny_models import TINY_MODELS_VERSION, VERSION_MARKER_FILE

    cls = StableDiffusion3Pipeline if "text_encoder_3" in components else FluxPipeline
    pipe = cls(**components)
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / VERSION_MARKER_FILE).write_text(TINY_MODELS_VERSION + "\n", encoding="utf-8")


def make_tiny_flow_models(root: Path) -> dict[str, Path]:
    """Write the tiny FLUX and SD3 folders under `root` (the checkpoints folder); current ones are kept."""
    from modules.demo.tiny_models import _folder_is_current, _step

    paths = {TINY_FLUX_DIFFUSERS: root / TINY_FLUX_DIFFUSERS, TINY_SD3_DIFFUSERS: root / TINY_SD3_DIFFUSERS}
    for name, build in ((TINY_FLUX_DIFFUSERS, build_tiny_flux), (TINY_SD3_DIFFUSERS, build_tiny_sd3)):
        if not _folder_is_current(paths[name]):
            with _step(name, root):
                write_flow_folder(paths[name], build())
    return paths
