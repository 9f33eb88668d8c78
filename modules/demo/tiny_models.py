"""Tiny random-weight Stable Diffusion checkpoints, made by this project's own code for tests and demos.

`make_tiny_models(dir)` writes, in the A1111 models/ layout:
- Stable-diffusion/tiny-sd15.safetensors: an SD1-layout single file (written by ldm_convert) whose
  safetensors metadata carries its own diffusers configs (`diffusers_configs`), since no published
  config has these shapes;
- Stable-diffusion/tiny-sd15-diffusers/: the same weights as a diffusers folder (with tokenizer);
- Stable-diffusion/tiny-sd15-inpainting.safetensors: the same recipe with a 9-channel UNet;
- Stable-diffusion/tiny-sdxl.safetensors and tiny-sdxl-diffusers/: a tiny SDXL (two text encoders, a
  pooled output and size conditioning) as an SDXL-layout single file and as a diffusers folder;
- Stable-diffusion/tiny-sd2.safetensors and tiny-sd2-diffusers/ (epsilon, as SD 2.x-base 512),
  tiny-sd2-v.safetensors and tiny-sd2-v-diffusers/ (v-prediction, as SD 2.x 768-v) and
  tiny-sd2-inpainting.safetensors (SD 2's inpainting layout: 9 UNet input channels): SD2's layout, an
  OpenCLIP-H-shaped text encoder (exact GELU, "!" padding, the penultimate layer's output: the single files
  hold one more text layer than the encoder uses, as SD2's 24 of which diffusers' config keeps 23), linear
  attention projections in the UNet, and DDIM with the prediction type in the configs;
- Stable-diffusion/tiny-flux-diffusers/ and tiny-sd3-diffusers/: tiny FLUX.1-dev- and SD3-style folders
  (`tiny_flow`);
- VAE/tiny-vae.safetensors: another VAE of the tiny SD1 shape, as VAE files come (LDM keys, no configs);
- ESRGAN/tiny-esrgan-4x.safetensors and RealESRGAN/tiny-realesrgan-x2.pth: tiny upscalers (`tiny_upscalers`);
- with full_size: Stable-diffusion/sd15-random.safetensors, SD 1.5's real shapes, random, fp16, and no
  embedded configs, so loading it goes through the shipped sd_configs/sd1 folder.

The shapes follow diffusers' own pipeline tests (`get_dummy_components`), except that the VAE has
four levels so the latent is 1/8 of the image, as in real SD. The text encoder is tiny but uses the
real CLIP tokenizer and vocabulary size, so prompts tokenize exactly as with real models.
Everything is seeded: the same torch version on the same machine writes byte-identical files, and a
file already written by the same recipe version is left alone, so repeated calls are cheap.

    python -m modules.demo.tiny_models DIR [--full-size]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from modules.core.fileio import atomic_folder, atomic_open
from modules.core.paths import SD_CONFIGS_DIR
from modules.model_store.ldm_convert import diffusers_configs, ldm_state_dict

log = logging.getLogger("webui.tiny_models")

# Bump when any recipe below changes, so existing files get rewritten.
TINY_MODELS_VERSION = "2"
VERSION_METADATA_KEY = "tiny_models_version"
VERSION_MARKER_FILE = "tiny_models_version.txt"
CHECKPOINT_SUBDIR = "Stable-diffusion"

TINY_SD15 = "tiny-sd15"
TINY_SD15_DIFFUSERS = "tiny-sd15-diffusers"
TINY_SD15_INPAINTING = "tiny-sd15-inpainting"
TINY_SDXL = "tiny-sdxl"
TINY_SDXL_DIFFUSERS = "tiny-sdxl-diffusers"
TINY_SD2 = "tiny-sd2"
TINY_SD2_DIFFUSERS = "tiny-sd2-diffusers"
TINY_SD2_V = "tiny-sd2-v"
TINY_SD2_V_DIFFUSERS = "tiny-sd2-v-diffusers"
TINY_SD2_INPAINTING = "tiny-sd2-inpainting"
SD15_RANDOM = "sd15-random"
TINY_VAE_FILE = "tiny-vae"  # VAE/tiny-vae.safetensors: another VAE of the tiny models' shape

TINY_SEED = 0
TINY_INPAINTING_SEED = 1
FULL_SIZE_SEED = 2
TINY_SDXL_SEED = 3
TINY_VAE_SEED = 4
TINY_SD2_SEED = 5
TINY_SD2_V_SEED = 6
TINY_SD2_INPAINTING_SEED = 7

TINY_UNET = dict(
    sample_size=8,  # 8 latent pixels -> 64x64 images by default
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    # Four levels: vae_scale_factor 8, like SD's VAE.
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=5,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    # The special-token ids of SD 1.5's text encoder config.
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# SDXL: CLIP-L-like (hidden 32) and OpenCLIP-G-like (hidden 48, projected to 32) encoders whose hidden
# states are concatenated (80 = the UNet's cross-attention width), as SDXL's 768 + 1280 = 2048. The two
# widths differ on purpose: diffusers tells the encoders of a single file apart by that width.
TINY_SDXL_TEXT_ENCODER = dict(TINY_TEXT_ENCODER)
TINY_SDXL_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_size=48, intermediate_size=53, hidden_act="gelu",
                                projection_dim=32)
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=32 + 48,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop numbers x 8 + the pooled output
    norm_num_groups=32,
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)

# SD2: OpenCLIP-H's text encoder (exact GELU; 40 wide here, 1024 in SD2) feeds the UNet's cross-attention, whose
# projections are linear layers (use_linear_projection), with heads per level as SD2's config lists them.
TINY_SD2_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, hidden_size=40, intermediate_size=47, hidden_act="gelu",
                             projection_dim=40)
TINY_SD2_UNET = dict(TINY_UNET, cross_attention_dim=40, attention_head_dim=(2, 4), use_linear_projection=True)


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def _scheduler(family: str = "sd1", **overrides):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    # The real model's own scheduler config: SD 1.5's PNDM (scaled_linear 0.00085..0.012, steps_offset 1,
    # ...), SDXL's Euler, SD 2.1's DDIM, SD2-inpainting's PNDM.
    cls = {"sdxl": EulerDiscreteScheduler, "sd2": DDIMScheduler}.get(family, PNDMScheduler)
    return cls.from_pretrained(SD_CONFIGS_DIR / family, subfolder="scheduler", local_files_only=True, **overrides)


def build_tiny_sd15(seed: int = TINY_SEED, in_channels: int = 4) -> dict[str, Any]:
    """Tiny SD1 components (unet, vae, text_encoder, tokenizer, scheduler) from a seed, in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.prompting.clip_tokenizer import clip_tokenizer

    _seeded(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": in_channels})
    _seeded(seed + 1000)
    vae = AutoencoderKL(**TINY_VAE)
    _seeded(seed + 2000)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    for model in (unet, vae, text_encoder):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "scheduler": _scheduler(),
    }


def build_tiny_sd2(seed: int = TINY_SD2_SEED, prediction_type: str = "epsilon",
                   in_channels: int = 4) -> dict[str, Any]:
    """Tiny SD2 components (unet, vae, text_encoder, tokenizer, scheduler) from a seed, in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.prompting.clip_tokenizer import clip_tokenizer

    _seeded(seed)
    unet = UNet2DConditionModel(**{**TINY_SD2_UNET, "in_channels": in_channels})
    _seeded(seed + 1000)
    vae = AutoencoderKL(**TINY_VAE)
    _seeded(seed + 2000)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT_ENCODER))
    for model in (unet, vae, text_encoder):
        model.eval()
    family = "sd2-inpainting" if in_channels == 9 else "sd2"
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer("!"),  # OpenCLIP pads with "!" (id 0)
        "scheduler": _scheduler(family, prediction_type=prediction_type),
    }


def _unused_last_text_layer(components: dict[str, Any], seed: int) -> dict[str, Any]:
    """The OpenCLIP resblock after the last one the encoder runs: SD2 files hold all 24 layers of OpenCLIP-H and
    condition on the penultimate one's output, which is why diffusers' SD2 config has 23. Random, never read."""
    import torch

    from modules.model_store.ldm_convert import SD2_OPEN_CLIP_PREFIX

    config = components["text_encoder"].config
    width, inner = config.hidden_size, config.intermediate_size
    generator = torch.Generator().manual_seed(seed + 3000)
    block = f"{SD2_OPEN_CLIP_PREFIX}transformer.resblocks.{config.num_hidden_layers}."
    shapes = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
              "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "mlp.c_fc.weight": (inner, width), "mlp.c_fc.bias": (inner,),
              "mlp.c_proj.weight": (width, inner), "mlp.c_proj.bias": (width,)}
    return {block + name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def build_tiny_sdxl(seed: int = TINY_SDXL_SEED) -> dict[str, Any]:
    """Tiny SDXL components (unet, vae, text_encoder(_2), tokenizer(_2), scheduler) from a seed, float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modules.prompting.clip_tokenizer import clip_tokenizer

    _seeded(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    _seeded(seed + 1000)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    _seeded(seed + 2000)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER))
    _seeded(seed + 3000)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2))
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        # SDXL pads its CLIP-L prompt with <|endoftext|> and its OpenCLIP one with "!" (id 0).
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer("!"),
        "scheduler": _scheduler("sdxl"),
    }


def _is_current(path: Path) -> bool:
    from modules.model_store.checkpoint_files import (
        CheckpointError,
        read_safetensors_metadata,
    )

    if not path.is_file():
        return False
    try:
        return read_safetensors_metadata(path).get(VERSION_METADATA_KEY) == TINY_MODELS_VERSION
    except CheckpointError:
        return False


_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _write_safetensors(path: Path, state: dict, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on its contents.

    safetensors' own writer keeps `__metadata__` in a Rust HashMap, so with two metadata keys their
    order (and so the file's sha256, which is its A1111 model hash) changes from run to run. This
    writes the same format with everything sorted: 8-byte little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then the tensors' bytes in header order.
    """
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer assumes a little-endian host")
    names = sorted(state)
    all_metadata = {**metadata, VERSION_METADATA_KEY: TINY_MODELS_VERSION}
    header: dict[str, Any] = {"__metadata__": dict(sorted(all_metadata.items()))}
    offset = 0
    for name in names:
        tensor = state[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_tiny_single_file(path: Path, components: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """A single file of the components (SD1, SD2 or SDXL layout; `extra` tensors added as they are), carrying
    their configs in its metadata."""
    _write_safetensors(
        path,
        {**ldm_state_dict(components), **(extra or {})},
        {"diffusers_configs": json.dumps(diffusers_configs(components), sort_keys=True)},
    )


def _folder_is_current(folder: Path) -> bool:
    marker = folder / VERSION_MARKER_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == TINY_MODELS_VERSION


def write_diffusers_folder(folder: Path, components: dict[str, Any]) -> None:
    """The components as a diffusers folder (save_pretrained, safetensors), swapped in atomically."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(**components, image_encoder=None, feature_extractor=None,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / VERSION_MARKER_FILE).write_text(TINY_MODELS_VERSION + "\n", encoding="utf-8")


def write_full_size_sd15(path: Path, seed: int = FULL_SIZE_SEED) -> None:
    """A random SD 1.5-shaped single file in fp16, built from the shipped sd1 configs, without embedded
    configs. One component at a time, so peak memory stays around one fp32 UNet plus the fp16 file."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules.model_store.ldm_convert import (
        text_encoder_to_ldm,
        unet_to_ldm,
        vae_to_ldm,
    )

    config_dir = SD_CONFIGS_DIR / "sd1"
    state: dict[str, torch.Tensor] = {}

    def half(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}

    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
    _seeded(seed)
    unet = UNet2DConditionModel.from_config(unet_config)
    state.update(unet_to_ldm(half(unet), unet_config))
    del unet
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
    _seeded(seed + 1000)
    vae = AutoencoderKL.from_config(vae_config)
    state.update(vae_to_ldm(half(vae), vae_config))
    del vae
    _seeded(seed + 2000)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    state.update(text_encoder_to_ldm(half(text_encoder)))
    del text_encoder
    _write_safetensors(path, state, {})


def write_tiny_vae(path: Path, seed: int = TINY_VAE_SEED) -> None:
    """A VAE file as people download them (LDM keys `encoder.*`/`decoder.*`, no configs inside): it takes its
    shape from the checkpoint it is used with, here any tiny SD1 model."""
    from diffusers import AutoencoderKL

    from modules.model_store.ldm_convert import vae_to_ldm

    _seeded(seed)
    vae = AutoencoderKL(**TINY_VAE)
    state = vae_to_ldm(vae.state_dict(), dict(vae.config))
    _write_safetensors(path, {k.removeprefix("first_stage_model."): v.detach().contiguous()
                              for k, v in state.items()}, {})


@contextlib.contextmanager
def _step(what: str, where: Path, quiet: bool = False):
    """One log line per model made: what, where, how long. `quiet` steps (which often find everything made
    already) are logged only when they took a noticeable time."""
    started = time.perf_counter()
    yield
    took = time.perf_counter() - started
    if not quiet or took > 0.5:
        log.info("made %s in %s (%.1f s)", what, where, took)


def make_tiny_models(dir: str | os.PathLike, full_size: bool = False) -> dict[str, Path]:
    """Write the tiny model set under `dir` (see the module docstring); files already written by this
    recipe version are kept. Returns name -> path for each checkpoint."""
    root = Path(dir) / CHECKPOINT_SUBDIR
    paths = {
        TINY_SD15: root / f"{TINY_SD15}.safetensors",
        TINY_SD15_DIFFUSERS: root / TINY_SD15_DIFFUSERS,
        TINY_SD15_INPAINTING: root / f"{TINY_SD15_INPAINTING}.safetensors",
        TINY_SDXL: root / f"{TINY_SDXL}.safetensors",
        TINY_SDXL_DIFFUSERS: root / TINY_SDXL_DIFFUSERS,
    }
    sd2 = {  # name -> (seed, prediction type, UNet input channels, with a diffusers folder)
        TINY_SD2: (TINY_SD2_SEED, "epsilon", 4, True),
        TINY_SD2_V: (TINY_SD2_V_SEED, "v_prediction", 4, True),
        TINY_SD2_INPAINTING: (TINY_SD2_INPAINTING_SEED, "epsilon", 9, False),
    }
    for name, (_, _, _, folder) in sd2.items():
        paths[name] = root / f"{name}.safetensors"
        if folder:
            paths[f"{name}-diffusers"] = root / f"{name}-diffusers"
    if full_size:
        paths[SD15_RANDOM] = root / f"{SD15_RANDOM}.safetensors"

    from modules.core import console
    console.quiet_libraries()
    if not (_is_current(paths[TINY_SD15]) and _folder_is_current(paths[TINY_SD15_DIFFUSERS])):
        with _step("tiny-sd15 (single file and diffusers folder)", root):
            components = build_tiny_sd15(TINY_SEED)
            if not _is_current(paths[TINY_SD15]):
                write_tiny_single_file(paths[TINY_SD15], components)
            if not _folder_is_current(paths[TINY_SD15_DIFFUSERS]):
                write_diffusers_folder(paths[TINY_SD15_DIFFUSERS], components)
    if not _is_current(paths[TINY_SD15_INPAINTING]):
        with _step("tiny-sd15-inpainting", root):
            write_tiny_single_file(paths[TINY_SD15_INPAINTING], build_tiny_sd15(TINY_INPAINTING_SEED, in_channels=9))
    if not (_is_current(paths[TINY_SDXL]) and _folder_is_current(paths[TINY_SDXL_DIFFUSERS])):
        with _step("tiny-sdxl (single file and diffusers folder)", root):
            components = build_tiny_sdxl()
            if not _is_current(paths[TINY_SDXL]):
                write_tiny_single_file(paths[TINY_SDXL], components)
            if not _folder_is_current(paths[TINY_SDXL_DIFFUSERS]):
                write_diffusers_folder(paths[TINY_SDXL_DIFFUSERS], components)
    for name, (seed, prediction, in_channels, folder) in sd2.items():
        folder_path = paths.get(f"{name}-diffusers")
        if _is_current(paths[name]) and (folder_path is None or _folder_is_current(folder_path)):
            continue
        with _step(f"{name} ({prediction}{', single file and diffusers folder' if folder else ''})", root):
            components = build_tiny_sd2(seed, prediction, in_channels)
            if not _is_current(paths[name]):
                write_tiny_single_file(paths[name], components, _unused_last_text_layer(components, seed))
            if folder_path is not None and not _folder_is_current(folder_path):
                write_diffusers_folder(folder_path, components)
    from modules.demo.tiny_flow import (
        make_tiny_flow_models,  # tiny-flux-diffusers, tiny-sd3-diffusers
        make_tiny_flux_files,  # tiny-flux.safetensors, tiny-flux-transformer-fp8 + text_encoder/, VAE/tiny-flux-ae
        make_tiny_sd3_file,  # tiny-sd3.safetensors
    )
    paths.update(make_tiny_flow_models(root))
    flux_files = make_tiny_flux_files(Path(dir))  # the checkpoints are listed; text_encoder/ and VAE/ are not
    paths.update({p.stem: p for p in flux_files.values() if p.parent == root})
    sd3_file = make_tiny_sd3_file(Path(dir))
    paths[sd3_file.stem] = sd3_file
    vae_file = Path(dir) / "VAE" / f"{TINY_VAE_FILE}.safetensors"
    if not _is_current(vae_file):
        with _step("VAE/tiny-vae", vae_file.parent):
            write_tiny_vae(vae_file)
    if full_size and not _is_current(paths[SD15_RANDOM]):
        with _step("sd15-random (full SD 1.5 shapes, fp16, about 2 GB)", root):
            write_full_size_sd15(paths[SD15_RANDOM])
    from modules.captioning.tiny import (
        make_tiny_captioners,  # BLIP2/tiny-blip2, BLIP2/tiny-blip2-itm, BLIP/tiny-blip
    )
    with _step("the tiny captioners (BLIP/tiny-blip, BLIP2/tiny-blip2, BLIP2/tiny-blip2-itm)", Path(dir), quiet=True):
        make_tiny_captioners(dir)
    from modules.demo.tiny_networks import (
        make_tiny_extra_networks,  # Lora/tiny-lora, embeddings/tiny-emb*
    )
    with _step("the tiny LoRAs and embeddings", Path(dir), quiet=True):
        make_tiny_extra_networks(dir)
    from modules.demo.tiny_upscalers import (
        make_tiny_upscalers,  # ESRGAN/tiny-esrgan-4x, RealESRGAN/tiny-realesrgan-x2
    )
    with _step("the tiny upscalers (ESRGAN/tiny-esrgan-4x, RealESRGAN/tiny-realesrgan-x2)", Path(dir), quiet=True):
        make_tiny_upscalers(dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.demo.tiny_models", description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="models folder to write into (checkpoints go to DIR/Stable-diffusion/)")
    parser.add_argument("--full-size", action="store_true", help="also write a random SD 1.5-sized fp16 file (~2 GB)")
    args = parser.parse_args(argv)
    from modules.core import console
    console.setup_logging()
    start = time.perf_counter()
    paths = make_tiny_models(args.dir, full_size=args.full_size)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
