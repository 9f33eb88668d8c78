"""Writing diffusers weights back into the original (LDM / A1111 single-file) key layout: SD1, SD2 and SDXL.

diffusers ships only the LDM -> diffusers direction. This is the inverse for UNet2DConditionModel,
AutoencoderKL and CLIPTextModel state dicts, driven by the models' configs so that it works for any
number of blocks, any layers_per_block and any placement of attention blocks (tiny test models as well
as full-size SD 1.x). Every input key must map somewhere; an unmapped key is an error, never a silent
drop, because a missing tensor would only show up later as a confusing load failure.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D part -> LDM ResBlock part (UNet).
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D part -> LDM ResnetBlock part (VAE): only the shortcut is renamed.
_VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers VAE mid-block Attention part -> LDM AttnBlock part.
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size/crop conditioning (addition_embed_type "text_time").
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_FIXED = {
    "conv_in": "conv_in",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}


def _split_param(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _layers_per_block(config: Mapping, num_blocks: int) -> list[int]:
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, int):
        return [layers] * num_blocks
    layers = list(layers)
    if len(layers) != num_blocks:
        raise ValueError(f"layers_per_block {layers} does not match {num_blocks} blocks")
    return layers


def _map_resnet(rest: str, parts: Mapping[str, str]) -> str:
    module, param = _split_param(rest)
    if module not in parts:
        raise KeyError(rest)
    return f"{parts[module]}.{param}"


def _unet_key(key: str, down_layers: list[int], up_layers: list[int], up_has_attention: list[bool]) -> str:
    module, param = _split_param(key)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        # input_blocks.0 is conv_in; each down block then has its layers, then its downsampler.
        index = 1 + sum(n + 1 for n in down_layers[:block]) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_map_resnet(rest, _UNET_RESNET_PARTS)}"
        return f"input_blocks.{index}.1.{rest}"

    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        block = int(m[1])
        index = 1 + sum(n + 1 for n in down_layers[:block]) + down_layers[block]
        return f"input_blocks.{index}.0.op.{m[2]}"

    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.{2 * layer + 1}.{rest}"
        return f"middle_block.{2 * layer}.{_map_resnet(rest, _UNET_RESNET_PARTS)}"

    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = sum(up_layers[:block]) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_map_resnet(rest, _UNET_RESNET_PARTS)}"
        return f"output_blocks.{index}.1.{rest}"

    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        block = int(m[1])
        # The upsampler joins the block's last output layer, after its attention if it has one.
        index = sum(up_layers[: block + 1]) - 1
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{index}.{slot}.conv.{m[2]}"

    raise KeyError(key)


def _vae_key(key: str, num_blocks: int) -> tuple[str, bool]:
    """The LDM name of a VAE key, and whether the tensor is an attention Linear weight that LDM
    stores as a 1x1 convolution."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        # quant_conv / post_quant_conv keep their names.
        return key, False

    module, param = _split_param(rest)
    if module in _VAE_FIXED:
        return f"{side}.{_VAE_FIXED[module]}.{param}", False

    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        block = int(m[2])
        if m[1] == "up":
            # LDM numbers decoder levels from the lowest resolution up, diffusers the other way.
            block = num_blocks - 1 - block
        return f"{side}.{m[1]}.{block}.block.{m[3]}.{_map_resnet(m[4], _VAE_RESNET_PARTS)}", False

    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest)
    if m:
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}", False

    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest)
    if m:
        return f"{side}.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False

    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.mid.block_{int(m[1]) + 1}.{_map_resnet(m[2], _VAE_RESNET_PARTS)}", False

    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m and m[1] in _VAE_ATTENTION_PARTS:
        is_linear_weight = m[1] != "group_norm" and m[2] == "weight"
        return f"{side}.mid.attn_1.{_VAE_ATTENTION_PARTS[m[1]]}.{m[2]}", is_linear_weight

    raise KeyError(key)


def _unet_layout(unet_config: Mapping) -> tuple[list[int], list[int], list[bool]]:
    """(layers per down block, layers per up block, whether each up block has attention)."""
    down_layers = _layers_per_block(unet_config, len(unet_config["down_block_types"]))
    # diffusers up blocks hold one layer more than the mirrored down block.
    up_layers = [n + 1 for n in reversed(down_layers)]
    return down_layers, up_layers, ["CrossAttn" in t for t in unet_config["up_block_types"]]


def unet_key_to_ldm(key: str, unet_config: Mapping) -> str:
    """The LDM name (without `model.diffusion_model.`) of one diffusers UNet parameter key, e.g.
    `down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight` for SD's layout.
    KeyError when the key has no LDM equivalent."""
    return _unet_key(key, *_unet_layout(unet_config))


def unet_to_ldm(unet_state_dict: Mapping[str, "Tensor"], unet_config: Mapping) -> dict[str, "Tensor"]:
    """diffusers UNet2DConditionModel weights -> `model.diffusion_model.*` keys."""
    layout = _unet_layout(unet_config)
    out = {}
    for key, tensor in unet_state_dict.items():
        try:
            out[UNET_PREFIX + _unet_key(key, *layout)] = tensor
        except KeyError:
            raise ValueError(f"UNet key {key!r} has no LDM equivalent in the SD1 layout") from None
    return out


def vae_to_ldm(vae_state_dict: Mapping[str, "Tensor"], vae_config: Mapping) -> dict[str, "Tensor"]:
    """diffusers AutoencoderKL weights -> `first_stage_model.*` keys."""
    num_blocks = len(vae_config["down_block_types"])
    out = {}
    for key, tensor in vae_state_dict.items():
        try:
            name, is_linear_weight = _vae_key(key, num_blocks)
        except KeyError:
            raise ValueError(f"VAE key {key!r} has no LDM equivalent") from None
        if is_linear_weight and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + name] = tensor
    return out


def text_encoder_to_ldm(text_encoder_state_dict: Mapping[str, "Tensor"],
                        prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, "Tensor"]:
    """transformers CLIPTextModel weights -> `cond_stage_model.transformer.text_model.*` keys (or
    `prefix`, e.g. SDXL's `conditioner.embedders.0.transformer.text_model.`).

    transformers 5 dropped the `text_model.` level from CLIPTextModel, older versions (and
    CLIPTextModelWithProjection) keep it; both spellings are accepted.
    """
    out = {}
    for key, tensor in text_encoder_state_dict.items():
        out[prefix + key.removeprefix("text_model.")] = tensor
    return out


# transformers CLIP encoder-layer part -> OpenCLIP resblock part.
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(text_encoder_state_dict: Mapping[str, "Tensor"],
                     prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, "Tensor"]:
    """transformers CLIPTextModelWithProjection weights -> the OpenCLIP layout of SDXL's second encoder
    (`conditioner.embedders.1.model.*`): q/k/v joined into `attn.in_proj_*`, the projection transposed.
    The inverse of diffusers' `convert_open_clip_checkpoint`."""
    import torch

    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in text_encoder_state_dict.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        rest = key.removeprefix("text_model.")
        if rest == "embeddings.position_ids":
            continue  # a buffer, not a weight
        if rest in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[rest]] = tensor
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if not m:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        layer, part, param = int(m[1]), m[2], m[3]
        qkv_m = re.fullmatch(r"self_attn\.([qkv])_proj", part)
        if qkv_m:
            qkv.setdefault((layer, param), {})[qkv_m[1]] = tensor
        elif part in _OPEN_CLIP_LAYER_PARTS:
            out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{param}"] = tensor
        else:
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} lacks some of its q/k/v {param}s")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]).contiguous()
    return out


def diffusers_to_ldm(
    unet_state_dict: Mapping[str, "Tensor"],
    vae_state_dict: Mapping[str, "Tensor"],
    text_encoder_state_dict: Mapping[str, "Tensor"],
    *,
    unet_config: Mapping,
    vae_config: Mapping,
    text_encoder_2_state_dict: Mapping[str, "Tensor"] | None = None,
    open_clip: bool = False,
) -> dict[str, "Tensor"]:
    """One single-file state dict (the layout A1111 and `from_single_file` read) from the
    diffusers/transformers state dicts and the UNet/VAE configs they were built from: SD1 with one OpenAI
    CLIP encoder, SD2 (`open_clip`) with one OpenCLIP encoder (`cond_stage_model.model.*`), SDXL (CLIP-L as
    `conditioner.embedders.0`, OpenCLIP-G as `.1`) with two."""
    if text_encoder_2_state_dict is None and open_clip:
        text_parts = [open_clip_to_ldm(text_encoder_state_dict, SD2_OPEN_CLIP_PREFIX)]
    elif text_encoder_2_state_dict is None:
        text_parts = [text_encoder_to_ldm(text_encoder_state_dict)]
    else:
        text_parts = [text_encoder_to_ldm(text_encoder_state_dict, SDXL_CLIP_L_PREFIX),
                      open_clip_to_ldm(text_encoder_2_state_dict)]
    out: dict[str, Tensor] = {}
    for part in (
        unet_to_ldm(unet_state_dict, unet_config),
        vae_to_ldm(vae_state_dict, vae_config),
        *text_parts,
    ):
        collisions = out.keys() & part.keys()
        if collisions:
            raise ValueError(f"LDM key collision: {sorted(collisions)[:3]}")
        out.update(part)
    return out


def diffusers_configs(components: dict) -> dict[str, dict]:
    """The per-component configs as plain JSON objects, for the `diffusers_configs` metadata."""
    configs = {
        "unet": json.loads(components["unet"].to_json_string()),
        "vae": json.loads(components["vae"].to_json_string()),
        "text_encoder": components["text_encoder"].config.to_dict(),
        "scheduler": json.loads(components["scheduler"].to_json_string()),
    }
    if "text_encoder_2" in components:
        configs["text_encoder_2"] = components["text_encoder_2"].config.to_dict()
    return configs


def is_open_clip(text_encoder) -> bool:
    """An OpenCLIP text encoder in transformers' CLIP classes (SD2's, SDXL's second): it uses exact GELU, where
    OpenAI's CLIP (SD1's, SDXL's first) uses quick_gelu."""
    return getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu"


def ldm_state_dict(components: dict) -> dict:
    """The components as one A1111 single-file state dict: SD1's layout, SD2's (an OpenCLIP text encoder) or
    SDXL's (with text_encoder_2)."""
    unet, vae = components["unet"], components["vae"]
    te2 = components.get("text_encoder_2")
    state = diffusers_to_ldm(
        unet.state_dict(),
        vae.state_dict(),
        components["text_encoder"].state_dict(),
        unet_config=dict(unet.config),
        vae_config=dict(vae.config),
        text_encoder_2_state_dict=te2.state_dict() if te2 is not None else None,
        open_clip=te2 is None and is_open_clip(components["text_encoder"]),
    )
    return {k: v.detach().contiguous() for k, v in state.items()}
