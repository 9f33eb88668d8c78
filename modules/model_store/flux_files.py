"""FLUX.1 single files: Black Forest Labs' transformer layout (`double_blocks.*`, `single_blocks.*`, as in
`flux1-dev.safetensors`) <-> diffusers' `FluxTransformer2DModel`, and ComfyUI's all-in-one files (the transformer
under `model.diffusion_model.`, CLIP-L under `text_encoders.clip_l.transformer.`, T5-XXL under
`text_encoders.t5xxl.transformer.`, the VAE under `vae.`).

The conversion is one table, read both ways, and every size comes from the tensors' shapes (the width, the
number of blocks, the head size from the q/k norm scales, distilled guidance from `guidance_in.*`), so the same
code converts the 12B release, pruned variants and the tiny test models (diffusers' own converter assumes the
3072-wide release). BFL's final modulation is (shift, scale), diffusers' (scale, shift): the halves are swapped.
Attention projections BFL joins (img/txt q|k|v; a single block's q|k|v|mlp) are split.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIXES = ("vae.", "first_stage_model.")
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"

# (BFL name, diffusers names, how): "copy" one to one, "qkv" a joined q|k|v, "single" a single block's
# q|k|v|mlp, "swap" the final modulation's halves. `{i}` is a block number; parameters are the names plus
# .weight/.bias (a norm's .scale is diffusers' .weight).
_TOP = [
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], "copy"),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], "copy"),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], "copy"),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], "copy"),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], "copy"),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], "copy"),
    ("txt_in", ["context_embedder"], "copy"),
    ("img_in", ["x_embedder"], "copy"),
    ("final_layer.linear", ["proj_out"], "copy"),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
]
_DOUBLE = [
    ("img_mod.lin", ["norm1.linear"], "copy"),
    ("txt_mod.lin", ["norm1_context.linear"], "copy"),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], "qkv"),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "qkv"),
    ("img_attn.norm.query_norm", ["attn.norm_q"], "copy"),
    ("img_attn.norm.key_norm", ["attn.norm_k"], "copy"),
    ("txt_attn.norm.query_norm", ["attn.norm_added_q"], "copy"),
    ("txt_attn.norm.key_norm", ["attn.norm_added_k"], "copy"),
    ("img_mlp.0", ["ff.net.0.proj"], "copy"),
    ("img_mlp.2", ["ff.net.2"], "copy"),
    ("txt_mlp.0", ["ff_context.net.0.proj"], "copy"),
    ("txt_mlp.2", ["ff_context.net.2"], "copy"),
    ("img_attn.proj", ["attn.to_out.0"], "copy"),
    ("txt_attn.proj", ["attn.to_add_out"], "copy"),
]
_SINGLE = [
    ("modulation.lin", ["norm.linear"], "copy"),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "single"),
    ("norm.query_norm", ["attn.norm_q"], "copy"),
    ("norm.key_norm", ["attn.norm_k"], "copy"),
    ("linear2", ["proj_out"], "copy"),
]


def _table(num_double: int, num_single: int) -> list[tuple[str, list[str], str]]:
    rows = list(_TOP)
    for i in range(num_double):
        rows += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds], how) for b, ds, how in _DOUBLE]
    for i in range(num_single):
        rows += [(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds], how)
                 for b, ds, how in _SINGLE]
    return rows


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def is_flux_transformer(keys) -> bool:
    return any(k == FLUX_MARKER or k == TRANSFORMER_PREFIX + FLUX_MARKER for k in keys)


def transformer_config(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """`FluxTransformer2DModel` keyword arguments read from a BFL-layout transformer's key -> shape map."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    width, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if width % head_dim or head_dim % 16:
        raise ValueError(f"a FLUX transformer {width} wide with {head_dim}-wide heads is not a shape this project knows")
    # FLUX.1's rotary axes split the head 16/56/56 of 128 (time, height, width): the same proportions at any size
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": _count(shapes, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": axes,
    }


def _suffixes(name: str, source: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(original parameter, diffusers parameter) suffix pairs present for the original name `name` in `source`;
    "" is a bare tensor (SD3's `pos_embed`)."""
    pairs = [(".weight", ".weight"), (".bias", ".bias"), (".scale", ".weight"), ("", "")]
    return [(b, d) for b, d in pairs if name + b in source]


def split_joined(value: "torch.Tensor", how: str, width: int) -> tuple["torch.Tensor", ...]:
    """An original layer's tensor (a weight, a bias, or a LoRA's up matrix: anything with its output rows first)
    as the diffusers modules' parts: "qkv" in three, "single" as q|k|v (`width` rows each) and the rest (the
    MLP), "swap" with its (shift, scale) halves exchanged, "copy" as it is."""
    import torch

    if how == "qkv":
        return torch.chunk(value, 3, dim=0)
    if how == "single":
        return torch.split(value, [width, width, width, value.shape[0] - 3 * width], dim=0)
    if how == "swap":
        shift, scale = value.chunk(2, dim=0)
        return (torch.cat([scale, shift], dim=0),)
    return (value,)


def convert_rows(sd: Mapping[str, "torch.Tensor"], rows, width: int, family: str) -> dict[str, "torch.Tensor"]:
    """An original-layout state dict through a table of (original name, diffusers names, how) rows: "qkv" split in
    three, "single" split q|k|v|mlp (`width` each for q, k, v), "swap" halves exchanged, "copy" as is. Keys no row
    places raise KeyError (naming one): nothing is dropped silently."""

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for original, names, how in rows:
        for o_suffix, d_suffix in _suffixes(original, sd):
            used.add(original + o_suffix)
            for name, part in zip(names, split_joined(sd[original + o_suffix], how, width)):
                out[name + d_suffix] = part.contiguous() if how != "copy" else part
    unknown = sorted(set(sd) - used)
    if unknown:
        raise KeyError(f"{len(unknown)} {family} transformer tensors this project cannot place, e.g. {unknown[0]}")
    return out


def invert_rows(state_dict: Mapping[str, "torch.Tensor"], rows) -> dict[str, "torch.Tensor"]:
    """The inverse of `convert_rows`: diffusers' names back to the original layout (joined, halves swapped back;
    a norm scale is `.scale` where the original name ends in `_norm`, FLUX's spelling)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for original, names, how in rows:
        for d_suffix in (s for s in (".weight", ".bias", "") if names[0] + s in state_dict):
            o_suffix = ".scale" if original.endswith("_norm") and d_suffix == ".weight" else d_suffix
            parts = [state_dict[n + d_suffix] for n in names]
            if how == "swap":
                scale, shift = parts[0].chunk(2, dim=0)
                parts = [torch.cat([shift, scale], dim=0)]
            out[original + o_suffix] = torch.cat(parts, dim=0).contiguous() if len(parts) > 1 else parts[0].contiguous()
    return out


def to_diffusers(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """A BFL-layout FLUX transformer state dict (optionally under `model.diffusion_model.`) in diffusers'
    layout. Keys the table does not know raise KeyError (naming them): nothing is dropped silently."""
    sd = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state_dict.items()}
    config = transformer_config(sd)
    width = config["attention_head_dim"] * config["num_attention_heads"]
    return convert_rows(sd, table(config), width, "FLUX")


def to_bfl(state_dict: Mapping[str, "torch.Tensor"], config: Mapping[str, Any]) -> dict[str, "torch.Tensor"]:
    """The inverse of `to_diffusers` (diffusers' `FluxTransformer2DModel` state dict and config -> BFL's layout),
    used to write FLUX single files such as the tiny test models."""
    return invert_rows(state_dict, table(config))


def split_parts(state_dict: Mapping[str, "torch.Tensor"]) -> dict[str, dict[str, "torch.Tensor"]]:
    """A FLUX single file's tensors by part: "transformer" (BFL layout), and where the file has them (ComfyUI's
    all-in-one layout) "clip_l" and "t5xxl" (transformers' CLIPTextModel / T5EncoderModel names) and "vae" (the
    LDM VAE layout)."""
    parts: dict[str, dict[str, Any]] = {"transformer": {}, "clip_l": {}, "t5xxl": {}, "vae": {}}
    for key, value in state_dict.items():
        if key.startswith(CLIP_L_PREFIX):
            parts["clip_l"][key.removeprefix(CLIP_L_PREFIX)] = value
        elif key.startswith(T5_PREFIX):
            parts["t5xxl"][key.removeprefix(T5_PREFIX)] = value
        elif key.startswith(VAE_PREFIXES):
            parts["vae"][key] = value
        else:
            parts["transformer"][key.removeprefix(TRANSFORMER_PREFIX)] = value
    return {name: part for name, part in parts.items() if part}


def lora_targets(rows) -> dict[str, tuple[list[str], str]]:
    """Original module names of a conversion table as kohya's LoRAs flatten them (FLUX's
    `double_blocks_0_img_attn_qkv`, SD3's `joint_blocks_0_x_block_attn_qkv`) -> (the diffusers modules they cover,
    with "_" for ".", and how the joined output rows split: "copy", "qkv", "single", "swap")."""
    return {original.replace(".", "_"): ([d.replace(".", "_") for d in names], how) for original, names, how in rows}


def table(config: Mapping[str, Any]) -> list[tuple[str, list[str], str]]:
    """The conversion table of a FLUX transformer with this (diffusers) config."""
    return _table(config["num_layers"], config["num_single_layers"])


