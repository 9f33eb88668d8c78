"""The extra-networks panel's entries (`Card`): what each LoRA or embedding puts in the prompt, the
picture beside its file, and whether it fits a checkpoint, from file headers only (nothing is loaded).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from modules.networks.extra_networks import ExtraNetworks, text_encoder_widths

log = logging.getLogger("webui.extra_networks")


# ------------------------------------------------------------------------------------------- cards

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg", ".preview.webp",
                    ".webp")


@dataclass(frozen=True)
class Card:
    """One entry of the extra-networks panel: what the prompt gets (`tag`), the picture beside the file
    (A1111's NAME.png / NAME.preview.png), and whether it fits the checkpoint (None: cannot tell)."""
    kind: str  # "lora" | "embedding"
    name: str
    tag: str
    path: Path
    preview: Path | None
    applies: bool | None


def _preview_of(path: Path) -> Path | None:
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.parent / (stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    if path.suffix.lower() != ".safetensors":
        return None  # a pickle: its shapes need torch.load, which a listing does not do
    from modules.model_store.checkpoint_files import (
        CheckpointError,
        read_safetensors_shapes,
    )
    try:
        return read_safetensors_shapes(path)
    except CheckpointError as exc:
        log.warning("%s: cannot read its header: %s", path.name, exc)
        return None


def lora_context_width(path: Path) -> int | None:
    """The text-conditioning width a LoRA file was trained for (SD1 768, SD2 1024, SDXL 2048), from the input
    width of its cross-attention key/value layers; None when the header does not tell."""
    shapes = _header_shapes(path) or {}
    for key, shape in shapes.items():
        if "attn2" in key and ("to_k" in key or "to_v" in key) and ("down" in key or "lora_A" in key) and len(shape) == 2:
            return shape[1]
    return None


def embedding_file_widths(path: Path) -> set[int] | None:
    """The vector widths an embedding file holds (from its header); None when the header does not tell."""
    shapes = _header_shapes(path)
    if not shapes:
        return None
    return {shape[-1] for shape in shapes.values() if len(shape) in (1, 2)} or None


def cards_for(networks: "ExtraNetworks", checkpoint) -> list[Card]:
    """The LoRA and embedding cards, with whether each applies to `checkpoint`: a LoRA when its conditioning
    width is the checkpoint's (the sum of its text encoders' widths), an embedding when its vector widths are
    exactly the encoders' (as generation decides). Nothing is loaded: headers and file names only."""
    widths = text_encoder_widths(checkpoint)
    cards = []
    for info in networks.loras.list():
        width = lora_context_width(info.path)
        applies = None if not widths or width is None else width == sum(widths)
        cards.append(Card("lora", info.name, f"<lora:{info.name}:1>", info.path, _preview_of(info.path), applies))
    for name, path in sorted(networks.embeddings.files().items()):
        dims = embedding_file_widths(path)
        applies = None if not widths or dims is None else dims == set(widths)
        cards.append(Card("embedding", name, name, path, _preview_of(path), applies))
    return cards
