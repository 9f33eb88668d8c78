"""Stable Diffusion 3 / 3.5 single files: Stability AI's MMDiT layout (`joint_blocks.*`, as in
`sd3_medium.safetensors` and `sd3.5_large.safetensors`) <-> diffusers' `SD3Transformer2DModel`, and the parts an
all-in-one file holds beside it (CLIP-L, CLIP-G and T5-XXL under `text_encoders.*.transformer.`, the VAE under
`first_stage_model.`).

One table, read both ways (the engine is `flux_files.convert_rows`), sizes from the tensors' shapes: the width,
blocks, patch, the caption projection, SD3.5's q/k norms (`ln_q`, which also give the head size; SD3's heads are
64 wide) and SD3.5 Medium's second attention (`attn2`). The last block has no context output (`context_pre_only`);
its context modulation and the final one are stored (shift, scale), diffusers' as (scale, shift).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modules.model_store.flux_files import convert_rows, invert_rows

if TYPE_CHECKING:
    import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
PART_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5xxl": "text_encoders.t5xxl.transformer."}
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD3_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
DEFAULT_HEAD_DIM = 64  # SD3 Medium's and SD3.5's heads


def is_sd3_transformer(keys) -> bool:
    return any(k == SD3_MARKER or k == TRANSFORMER_PREFIX + SD3_MARKER for k in keys)


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def transformer_config(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """`SD3Transformer2DModel` keyword arguments read from an SAI-layout transformer's key -> shape map."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    norm = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = norm[0] if norm else DEFAULT_HEAD_DIM
    if width % head_dim:
        raise ValueError(f"an SD3 transformer {width} wide with {head_dim}-wide heads is not a shape this project knows")
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": _count(shapes, r"joint_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": math.isqrt(shapes["pos_embed"][1]),
        "qk_norm": "rms_norm" if norm else None,
        "dual_attention_layers": tuple(sorted({int(m.group(1)) for k in shapes
                                               if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})),
    }


def table(config: Mapping[str, Any]) -> list[tuple[str, list[str], str]]:
    """The conversion table of an SD3 transformer with this (diffusers) config."""
    return _table(config)


def _table(config: Mapping[str, Any]) -> list[tuple[str, list[str], str]]:
    rows = [
        ("pos_embed", ["pos_embed.pos_embed"], "copy"),
        ("x_embedder.proj", ["pos_embed.proj"], "copy"),
        ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], "copy"),
        ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], "copy"),
        ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], "copy"),
        ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], "copy"),
        ("context_embedder", ["context_embedder"], "copy"),
        ("final_layer.linear", ["proj_out"], "copy"),
        ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
    ]
    n = config["num_layers"]
    for i in range(n):
        x, c, d = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        last = i == n - 1
        rows += [
            (x + "attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], "qkv"),
            (c + "attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], "qkv"),
            (x + "attn.ln_q", [d + "attn.norm_q"], "copy"),
            (x + "attn.ln_k", [d + "attn.norm_k"], "copy"),
            (c + "attn.ln_q", [d + "attn.norm_added_q"], "copy"),
            (c + "attn.ln_k", [d + "attn.norm_added_k"], "copy"),
            (x + "attn.proj", [d + "attn.to_out.0"], "copy"),
            (x + "adaLN_modulation.1", [d + "norm1.linear"], "copy"),
            (c + "adaLN_modulation.1", [d + "norm1_context.linear"], "swap" if last else "copy"),
            (x + "mlp.fc1", [d + "ff.net.0.proj"], "copy"),
            (x + "mlp.fc2", [d + "ff.net.2"], "copy"),
        ]
        if not last:  # the last block's context stream ends at the attention
            rows += [
                (c + "attn.proj", [d + "attn.to_add_out"], "copy"),
                (c + "mlp.fc1", [d + "ff_context.net.0.proj"], "copy"),
                (c + "mlp.fc2", [d + "ff_context.net.2"], "copy"),
            ]
        if i in config.get("dual_attention_layers", ()):  # SD3.5 Medium's second self-attention
            rows += [
                (x + "attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], "qkv"),
                (x + "attn2.ln_q", [d + "attn2.norm_q"], "copy"),
                (x + "attn2.ln_k", [d + "attn2.norm_k"], "copy"),
                (x + "attn2.proj", [d + "attn2.to_out.0"], "copy"),
            ]
    return rows


def to_diffusers(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """An SAI-layout SD3 transformer state dict (optionally under `model.diffusion_model.`) in diffusers' layout."""
    sd = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state_dict.items()}
    return convert_rows(sd, _table(transformer_config(sd)), 0, "SD3")


def to_sai(state_dict: Mapping[str, "torch.Tensor"], config: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    """The inverse of `to_diffusers`, used to write SD3 single files such as the tiny test model."""
    return invert_rows(state_dict, _table(config))


def split_parts(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, dict[str, "torch.Tensor"]]:
    """An SD3 single file's tensors by part: "transformer" (SAI layout), and where the file has them "clip_l",
    "clip_g", "t5xxl" (transformers' names) and "vae" (the LDM VAE layout, under its prefix)."""
    parts: dict[str, dict[str, Any]] = {"transformer": {}, "clip_l": {}, "clip_g": {}, "t5xxl": {}, "vae": {}}
    for key, value in state_dict.items():
        for part, prefix in PART_PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key.removeprefix(prefix)] = value
                break
        else:
            if key.startswith(VAE_PREFIXES):
                parts["vae"][key] = value
            else:
                parts["transformer"][key.removeprefix(TRANSFORMER_PREFIX)] = value
    return {name: part for name, part in parts.items() if part}
