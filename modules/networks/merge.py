"""Applying LoRAs to a leased checkpoint: the layer index (diffusers and LDM names alike), the weighted
deltas merged into the checkpoint's own weights for one request, and the originals written back after, so
nothing leaks into the next request and a request without LoRAs runs the untouched weights bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

from modules.networks.lora_files import LoraModule, LoraWeights
from modules.networks.loras import LoraInfo
from modules.networks.lycoris import LycoModule

log = logging.getLogger("webui.extra_networks")


def ldm_unet_module_names(unet_config, module_names) -> dict[str, str]:
    """diffusers UNet module name -> its flat name in the original LDM layout, as kohya's SDXL LoRAs (and some SD1
    ones) name the UNet's layers ("down_blocks.0.attentions.0.proj_in" -> "input_blocks_1_1_proj_in"); modules
    with no LDM equivalent are left out."""
    from modules.model_store.ldm_convert import unet_key_to_ldm
    names = {}
    for name in module_names:
        try:
            ldm = unet_key_to_ldm(f"{name}.weight", unet_config)
        except KeyError:  # a layer LDM does not have (or that ldm_convert does not know yet)
            continue
        names[name] = ldm.removesuffix(".weight").replace(".", "_")
    return names


# part -> component; "transformer" is SD3's and FLUX's denoiser (diffusers/PEFT-layout LoRAs name it so)
_INDEXED_MODELS = (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2"),
                   ("transformer", "transformer"))


def module_index(bundle) -> dict[str, dict[str, Any]]:
    """part -> normalised module name -> module with a weight, for the bundle's UNet (or SD3/FLUX transformer) and
    text encoders.

    UNet layers are known by their diffusers names and by their LDM names (kohya's SDXL naming). The index is
    kept with the bundle (its modules stay the same objects while it is loaded), so a request pays nothing for it."""
    models = [bundle.components.get(key) for _, key in _INDEXED_MODELS]
    cached = bundle.cache.get("lora_module_index")
    if cached is not None and all(a is b for a, b in zip(cached[0], models)):
        return cached[1]
    import torch
    index: dict[str, dict[str, Any]] = {}
    for (part, _), model in zip(_INDEXED_MODELS, models):
        if model is None:
            continue
        layers = {name: module for name, module in model.named_modules()
                  if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
        names: dict[str, Any] = {}
        for name, module in layers.items():
            flat = name.replace(".", "_")
            names[flat] = module
            if part in ("te1", "te2") and not flat.startswith("text_model_"):
                names["text_model_" + flat] = module  # kohya names CLIP's layers under text_model
        config = getattr(model, "config", None)
        if part == "unet" and config is not None and "down_block_types" in config:
            for name, ldm in ldm_unet_module_names(config, layers).items():
                names.setdefault(ldm, layers[name])
        index[part] = names
    bundle.cache["lora_module_index"] = (models, index)
    return index


def kohya_flow_modules(bundle, modules: dict[str, Any]) -> dict[str, Any]:
    """A kohya-layout FLUX or SD3 LoRA's transformer modules (FLUX's `lora_unet_double_blocks_0_img_attn_qkv`, or
    `diffusion_model.double_blocks.0...` as ComfyUI and ai-toolkit write them; SD3's
    `lora_unet_joint_blocks_0_x_block_attn_qkv`) on diffusers' modules: a joined q|k|v (or FLUX's single-block
    q|k|v|mlp) is split by output rows, each part keeping the shared down matrix and the alpha, so every part's
    delta is exactly its rows of the joined delta; modulations stored (shift, scale) have their halves swapped as
    the weights do. Names it does not know are kept (and reported as not matching)."""
    from modules.model_store import flux_files, sd3_files
    config = bundle.components["transformer"].config
    width = config.num_attention_heads * config.attention_head_dim
    targets = bundle.cache.get("kohya_flow_targets")
    if targets is None:  # kept with the bundle, as the layer index is
        layout = flux_files if bundle.arch.family == "flux" else sd3_files
        targets = bundle.cache["kohya_flow_targets"] = flux_files.lora_targets(layout.table(dict(config)))
    out: dict[str, Any] = {}
    for name, m in modules.items():
        target = targets.get(name)
        if target is None or not isinstance(m, LoraModule):
            out[name] = m
            continue
        names, how = target
        for module, up in zip(names, flux_files.split_joined(m.up, how, width)):
            out[module] = LoraModule(down=m.down, up=up, alpha=m.alpha)
    return out


def _scale(m: LoraModule) -> float:
    return (m.alpha / m.down.shape[0]) if m.alpha is not None else 1.0


def _is_matmul(m: LoraModule) -> bool:
    """A LoRA whose delta is a plain up @ down (linear layers and 1x1 convolutions)."""
    if isinstance(m, LycoModule):
        return False
    return not (m.down.ndim == 4 and tuple(m.down.shape[2:]) != (1, 1))


def _fits(m: LoraModule, weight_shape) -> bool:
    """Whether the LoRA's delta has the layer's shape (else the layer is skipped with a warning)."""
    if isinstance(m, LycoModule):
        return m.fits(weight_shape)
    out_features = m.up.shape[0]
    in_numel = m.down[0].numel()
    total = 1
    for d in weight_shape:
        total *= d
    return out_features == weight_shape[0] and out_features * in_numel == total and m.up.shape[1] == m.down.shape[0]


def _delta(m: LoraModule, weight_shape) -> Any:
    if isinstance(m, LycoModule):
        return m.delta(weight_shape)
    down, up = m.down, m.up
    scale = _scale(m)
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], *down.shape[2:])
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(weight_shape)


def _widened(module):
    """A layer kept in fp8 with diffusers' layerwise casting holds its weights in the compute dtype while a LoRA
    is merged into it (merged in fp8, a LoRA's small deltas would round away); returns what `_narrow` needs."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    if hook is None or hook.storage_dtype == hook.compute_dtype:
        return None
    stored, hook.storage_dtype = hook.storage_dtype, hook.compute_dtype
    module.to(hook.compute_dtype)
    return hook, module, stored


def _narrow(widened) -> None:
    hook, module, stored = widened
    hook.storage_dtype = stored
    module.to(stored)  # the original fp8 values, exactly (they were restored in the compute dtype)


@dataclass
class AppliedLora:
    info: LoraInfo
    te_multiplier: float
    unet_multiplier: float
    weights: LoraWeights


@contextlib.contextmanager
def applied_loras(bundle, loras: list[AppliedLora], warnings: list[str] | None = None) -> Iterator[None]:
    """Merge the LoRAs into the bundle's weights for the with-block; the originals come back on exit."""
    import torch
    if not loras:
        yield
        return
    index = module_index(bundle)
    deltas: dict[int, tuple[Any, list]] = {}  # id(module) -> (module, [(LoraModule, multiplier), ...])
    flow = getattr(bundle.arch, "family", None) in ("flux", "sd3")
    for lora in loras:
        missed = 0
        for part, modules in lora.weights.modules.items():
            mult = lora.unet_multiplier if part in ("unet", "transformer") else lora.te_multiplier
            if flow and part == "unet":  # kohya names the FLUX/SD3 transformer's original layers under lora_unet_
                part, modules = "transformer", kohya_flow_modules(bundle, modules)
            targets = index.get(part, {})
            for name, m in modules.items():
                module = targets.get(name)
                if module is None:
                    missed += 1
                    continue
                if mult == 0:
                    continue
                weight = module.weight
                if not _fits(m, weight.shape):
                    missed += 1
                    continue
                deltas.setdefault(id(module), (module, []))[1].append((lora.info.name, m, mult))
        if missed and warnings is not None:
            warnings.append(f"LoRA {lora.info.name}: {missed} of its layers do not match this checkpoint and were skipped")
    # The originals of every weight a LoRA has touched are kept with the bundle (in CPU RAM) after their first
    # use: cloning them afresh for each request cost more than the sampling saved (fresh multi-MB allocations
    # page-fault on every request), and restoring from an exact copy keeps removal bit-exact.
    originals = bundle.cache.setdefault("lora_originals", {})
    owners = bundle.cache.setdefault("lora_original_owners", {})  # id -> weakref of the module the original is of
    for gone in [key for key, ref in owners.items() if ref() is None]:  # their modules were unloaded: free the copies
        owners.pop(gone)
        originals.pop(gone, None)
    merged: list[Any] = []
    widened: list[Any] = []
    try:
        with torch.no_grad():
            for module, named_parts in deltas.values():
                # in name order, so that <lora:a> <lora:b> and <lora:b> <lora:a> give the same bits
                parts = [(m, mult) for _, m, mult in sorted(named_parts, key=lambda p: p[0])]
                if (wide := _widened(module)) is not None:
                    widened.append(wide)
                weight = module.weight
                original = originals.get(id(module))
                owner = owners.get(id(module))
                if owner is None or owner() is not module:  # a module that shares a freed one's id (a text
                    original = None  # encoder leased from the manager can be unloaded and another loaded)
                owners[id(module)] = weakref.ref(module)
                if original is None or original.shape != weight.shape:
                    original = originals[id(module)] = weight.detach().to("cpu", copy=True)
                merged.append((weight, original))
                source = original.to(weight.device, non_blocking=True)
                if weight.dtype == torch.float32 and all(_is_matmul(m) for m, _ in parts):
                    # weight = original + sum(scale * up @ down), written in place with no full-size temporary:
                    # several LoRAs are one matmul over their factors side by side ([out, r1+r2+..] @ [r1+r2+.., in])
                    flat = weight.view(weight.shape[0], -1)
                    factors = [(m.up.flatten(1).to(weight.device).float(), m.down.flatten(1).to(weight.device).float(),
                                _scale(m) * mult) for m, mult in parts]
                    if len(factors) == 1:
                        up, down, alpha = factors[0]
                        torch.addmm(source.view(flat.shape), up, down, alpha=alpha, out=flat)
                    else:
                        up = torch.cat([u * alpha for u, _, alpha in factors], dim=1)
                        down = torch.cat([d for _, d, _ in factors], dim=0)
                        torch.addmm(source.view(flat.shape), up, down, out=flat)
                else:
                    delta = sum(_delta(m, weight.shape).to(weight.device) * mult for m, mult in parts)
                    weight.copy_((source.float() + delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in merged:
                weight.copy_(original)  # the saved originals: removal is exact
            for wide in widened:
                _narrow(wide)
