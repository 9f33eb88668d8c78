"""Reading a LoRA file: kohya (`lora_unet_*`, `lora_te*_*`, `.alpha`) and PEFT/diffusers
(`unet.*.lora_A/lora_B`, SD3's and FLUX's `transformer.*`, `*.lora.down/up`) layouts normalised to one form (`LoraWeights`), LyCORIS tensors
(LoCon, LoHa, LoKr, full diffs) kept as `LycoModule`s, and whatever cannot be read named.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.networks.lycoris import LycoModule

log = logging.getLogger("webui.extra_networks")


# ------------------------------------------------------------------------------------ LoRA weights

@dataclass
class LoraModule:
    down: Any  # [r, in] or [r, in, k, k]
    up: Any  # [out, r] or [out, r, 1, 1]
    alpha: float | None


_LYCO_ROLES = {  # tensor name -> kind of LyCORIS module
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full",
}
_LYCO_REQUIRED = {"loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
                  "lokr": ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}),  # and one of the w2 forms below
                  "full": ({"diff"},)}


def _lyco_complete(kind: str, roles: set[str]) -> bool:
    if not any(req <= roles for req in _LYCO_REQUIRED[kind]):
        return False
    return kind != "lokr" or "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles


@dataclass
class LoraWeights:
    """A LoRA file in one normalised form: part -> module name (dots as "_") -> LoraModule."""
    name: str
    modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)

    def to(self, device) -> "LoraWeights":
        for part in self.modules.values():
            for m in part.values():
                if isinstance(m, LycoModule):
                    m.tensors = {k: v.to(device) for k, v in m.tensors.items()}
                else:
                    m.down, m.up = m.down.to(device), m.up.to(device)
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.modules.values() for m in part.values()
                   for t in (m.tensors_list() if isinstance(m, LycoModule) else (m.down, m.up)))


_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
# `diffusion_model.`: BFL-named FLUX LoRAs (ComfyUI, ai-toolkit), read as kohya's `lora_unet_` names
_PEFT_PREFIXES = (("unet.", "unet"), ("transformer.", "transformer"), ("text_encoder_2.", "te2"),
                  ("text_encoder.", "te1"), ("diffusion_model.", "unet"))
_SUFFIXES = (  # (suffix, role)
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".alpha", "alpha"),
) + tuple((f".{name}", name) for name in _LYCO_ROLES)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(part, module name with "_", role) of one LoRA key, or None when it is of no known layout."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    for prefix, part in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return part, stem[len(prefix):], role
    for prefix, part in _PEFT_PREFIXES:
        if stem.startswith(prefix):
            return part, stem[len(prefix):].replace(".", "_"), role
    return None


class LoraFileError(ValueError):
    """A LoRA file that cannot be used (unreadable, no LoRA keys)."""


def load_lora(path: str | os.PathLike, name: str | None = None) -> LoraWeights:
    """Read a LoRA file (CPU tensors) into the normalised form."""
    import torch
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:
        raise LoraFileError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(state, dict):
        raise LoraFileError(f"{path.name} holds no tensors")
    weights = LoraWeights(name=name or path.stem)
    raw: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state.items():
        split = _split_key(key) if isinstance(value, torch.Tensor) else None
        if split is None:
            weights.unknown_keys.append(key)
            continue
        part, module, role = split
        raw.setdefault((part, module), {})[role] = value
    for (part, module), roles in raw.items():
        alpha = roles.get("alpha")
        alpha = float(alpha) if alpha is not None else None
        kinds = {_LYCO_ROLES[r] for r in roles if r in _LYCO_ROLES}
        if len(kinds) == 1 and _lyco_complete(next(iter(kinds)), set(roles)):
            kind = next(iter(kinds))
            weights.modules.setdefault(part, {})[module] = LycoModule(
                kind, {r: v.float() for r, v in roles.items() if r in _LYCO_ROLES}, alpha)
            continue
        if "mid" in roles and not kinds and {"down", "up"} <= set(roles):
            weights.modules.setdefault(part, {})[module] = LycoModule(
                "locon_cp", {r: roles[r].float() for r in ("down", "up", "mid")}, alpha)
            continue
        if "down" not in roles or "up" not in roles or kinds or "mid" in roles:
            weights.unknown_keys.extend(f"{part}:{module}.{r}" for r in roles)
            continue
        weights.modules.setdefault(part, {})[module] = LoraModule(
            down=roles["down"].float(), up=roles["up"].float(), alpha=alpha)
    if not weights.modules:
        raise LoraFileError(f"{path.name} has no LoRA weights of a known layout (kohya, PEFT/diffusers, "
                            "LyCORIS LoCon/LoHa/LoKr/full)")
    return weights
