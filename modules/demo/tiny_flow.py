"""Tiny random-weight FLUX.1 and SD3 models (diffusers folders), made by this project's own code for tests and
demos, in the layout their diffusers pipelines save:

- Stable-diffusion/tiny-flux-diffusers/: FLUX.1-dev's design (a CLIP-L-like encoder for the pooled vector, a
  T5-like encoder for the sequence, the double- and single-stream transformer with distilled guidance
  embedded, a 16-channel-latent VAE with a shift factor, and dev's dynamically shifted flow-matching
  schedule), every part a few kB;
- Stable-diffusion/tiny-sd3-diffusers/: SD3's design (two projected CLIP encoders, T5, the MMDiT transformer
  with SD3.5's q/k norms and SD3.5 Medium's second attention, a shifted flow-matching schedule), and the same
  weights as Stability AI's all-in-one single file, Stable-diffusion/tiny-sd3.safetensors;
- the FLUX folder's weights as single files, as people download them: Stable-diffusion/tiny-flux.safetensors in
  ComfyUI's all-in-one layout (BFL transformer, CLIP-L, T5, VAE), Stable-diffusion/tiny-flux-transformer-fp8
  .safetensors (BFL's transformer-only layout, float8_e4m3fn) with text_encoder/tiny-clip-l.safetensors,
  text_encoder/tiny-t5xxl.safetensors and VAE/tiny-flux-ae.safetensors beside it.

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
# heads of 32 split 4/14/14 by the rotary axes, FLUX.1's 16/56/56 of 128 scaled down (single files carry no
# config: the loader reads the split from the head size)
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 14, 14))
# 16 latent channels, as both families' VAEs have (FLUX packs 2x2 of them into one 64-wide token)
TINY_FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                     use_post_quant_conv=False)
# SD3: CLIP-L-like (32) and CLIP-G-like (48) encoders, their hidden states joined (80) and padded to T5's width
# (96) as SD3's 768 + 1280 are padded to 4096; pooled outputs joined (32 + 32).
TINY_SD3_T5 = dict(TINY_T5, d_model=96, d_kv=12, num_heads=8)
# SD3.5's design: q/k RMS norms (single files take the head size from them) and, as SD3.5 Medium, a second
# self-attention in the first block
TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
                            dual_attention_layers=(0,))


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


TINY_SD3_FILE = "tiny-sd3.safetensors"
TINY_FLUX_FILE = "tiny-flux.safetensors"
TINY_FLUX_TRANSFORMER_FILE = "tiny-flux-transformer-fp8.safetensors"
TINY_CLIP_L_FILE = "tiny-clip-l.safetensors"
TINY_T5_FILE = "tiny-t5xxl.safetensors"
TINY_FLUX_VAE_FILE = "tiny-flux-ae.safetensors"


def flux_file_parts(components: dict[str, Any]) -> dict[str, dict]:
    """The FLUX components' tensors in the single-file layouts: "transformer" (BFL), "clip_l" and "t5xxl"
    (transformers' names), "vae" (LDM names, no prefix)."""
    from modules.model_store import flux_files
    from modules.model_store.ldm_convert import vae_to_ldm

    transformer, vae = components["transformer"], components["vae"]
    vae_ldm = vae_to_ldm(vae.state_dict(), dict(vae.config))
    t5 = {k: v for k, v in components["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    # CLIP-L as its files name it (`text_model.*`; transformers 5's CLIPTextModel drops that level)
    clip = {"text_model." + k.removeprefix("text_model."): v
            for k, v in components["text_encoder"].state_dict().items() if not k.endswith("position_ids")}
    return {"transformer": flux_files.to_bfl(transformer.state_dict(), dict(transformer.config)),
            "clip_l": clip, "t5xxl": t5, "vae": {k.removeprefix("first_stage_model."): v for k, v in vae_ldm.items()}}


def make_tiny_flux_files(models_root: Path) -> dict[str, Path]:
    """The tiny FLUX folder's weights as single files (see the module docstring) under `models_root`; current
    ones are kept. The CLIP-L and VAE configs ride in the files' metadata (their shapes are not the published
    ones); the transformer's and T5's are read from the weights, as for real files."""
    import json

    import torch

    from modules.demo.tiny_models import _is_current, _step, _write_safetensors
    from modules.model_store import flux_files

    root = Path(models_root)
    paths = {
        TINY_FLUX_FILE: root / "Stable-diffusion" / TINY_FLUX_FILE,
        TINY_FLUX_TRANSFORMER_FILE: root / "Stable-diffusion" / TINY_FLUX_TRANSFORMER_FILE,
        TINY_CLIP_L_FILE: root / "text_encoder" / TINY_CLIP_L_FILE,
        TINY_T5_FILE: root / "text_encoder" / TINY_T5_FILE,
        TINY_FLUX_VAE_FILE: root / "VAE" / TINY_FLUX_VAE_FILE,
    }
    if all(_is_current(p) for p in paths.values()):
        return paths
    with _step("tiny FLUX single files", root):
        components = build_tiny_flux()
        parts = flux_file_parts(components)
        configs = {"vae": dict(components["vae"].config), "text_encoder": components["text_encoder"].config.to_dict(),
                   "scheduler": dict(components["scheduler"].config)}
        meta = {"diffusers_configs": json.dumps(configs, sort_keys=True, default=list)}
        prefixes = {"transformer": flux_files.TRANSFORMER_PREFIX, "clip_l": flux_files.CLIP_L_PREFIX,
                    "t5xxl": flux_files.T5_PREFIX, "vae": "vae."}
        everything = {prefixes[name] + k: v.contiguous() for name, part in parts.items() for k, v in part.items()}
        _write_safetensors(paths[TINY_FLUX_FILE], everything, meta)
        _write_safetensors(paths[TINY_FLUX_TRANSFORMER_FILE],
                           {k: v.to(torch.float8_e4m3fn).contiguous() for k, v in parts["transformer"].items()}, {})
        clip_meta = {"diffusers_configs": json.dumps({"text_encoder": configs["text_encoder"]}, sort_keys=True,
                                                      default=list)}
        _write_safetensors(paths[TINY_CLIP_L_FILE], {k: v.contiguous() for k, v in parts["clip_l"].items()}, clip_meta)
        _write_safetensors(paths[TINY_T5_FILE], {k: v.contiguous() for k, v in parts["t5xxl"].items()}, {})
        vae_meta = {"diffusers_configs": json.dumps({"vae": configs["vae"]}, sort_keys=True, default=list)}
        _write_safetensors(paths[TINY_FLUX_VAE_FILE], {k: v.contiguous() for k, v in parts["vae"].items()}, vae_meta)
    return paths


def make_tiny_sd3_file(models_root: Path) -> Path:
    """Stable-diffusion/tiny-sd3.safetensors: the tiny SD3 folder's weights in Stability AI's all-in-one layout
    (`model.diffusion_model.joint_blocks.*`, `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`,
    `first_stage_model.*`); the CLIP, VAE and scheduler configs ride in its metadata."""
    import json

    from modules.demo.tiny_models import _is_current, _step, _write_safetensors
    from modules.model_store import sd3_files
    from modules.model_store.ldm_convert import vae_to_ldm

    path = Path(models_root) / "Stable-diffusion" / TINY_SD3_FILE
    if _is_current(path):
        return path
    with _step("tiny SD3 single file", path.parent):
        c = build_tiny_sd3()
        transformer = c["transformer"]
        state = {sd3_files.TRANSFORMER_PREFIX + k: v
                 for k, v in sd3_files.to_sai(transformer.state_dict(), dict(transformer.config)).items()}
        for part, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            prefix = sd3_files.PART_PREFIXES[part]
            state.update({prefix + k: v for k, v in c[component].state_dict().items() if not k.endswith("position_ids")})
        state.update({sd3_files.PART_PREFIXES["t5xxl"] + k: v for k, v in c["text_encoder_3"].state_dict().items()
                      if k != "encoder.embed_tokens.weight"})
        state.update(vae_to_ldm(c["vae"].state_dict(), dict(c["vae"].config)))  # first_stage_model.*
        configs = {"vae": dict(c["vae"].config), "text_encoder": c["text_encoder"].config.to_dict(),
                   "text_encoder_2": c["text_encoder_2"].config.to_dict(), "scheduler": dict(c["scheduler"].config)}
        _write_safetensors(path, {k: v.contiguous() for k, v in state.items()},
                           {"diffusers_configs": json.dumps(configs, sort_keys=True, default=list)})
    return path
