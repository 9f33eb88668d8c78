"""The extra networks of one server: `ExtraNetworks` (the LoRA registry and the embedding database)
and `resolve(prompt)`, which strips `<lora:...>` tags, resolves them and says which were ignored and why.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from modules.networks.embeddings import Embedding, EmbeddingDatabase
from modules.networks.lora_files import LoraFileError, load_lora
from modules.networks.loras import LoraInfo, LoraRegistry
from modules.networks.merge import AppliedLora
from modules.prompting import prompt_parser

log = logging.getLogger("webui.extra_networks")


# ------------------------------------------------------------------------------------ prompt tags

@dataclass
class ResolvedNetworks:
    """A prompt's LoRA tags, resolved: what will be applied and what was ignored, and why."""
    prompt: str  # the prompt without tags
    loras: list[tuple[LoraInfo, float, float]] = field(default_factory=list)  # (info, te, unet)
    warnings: list[str] = field(default_factory=list)


def _parse_multiplier(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


_widths_cache: dict[tuple[str, int], frozenset[int]] = {}


def text_encoder_widths(info) -> set[int]:
    """The widths of a checkpoint's text encoders, read from its file header or configs (nothing loaded);
    cached per file version, since the UI's token counter asks on every keystroke."""
    if info is None:
        return set()
    path = Path(info.filename)
    try:
        key = (str(path), (path / "model_index.json" if path.is_dir() else path).stat().st_mtime_ns)
    except OSError:
        return set()
    cached = _widths_cache.get(key)
    if cached is not None:
        return set(cached)
    widths: set[int] = set()
    if path.is_dir():
        for sub in ("text_encoder", "text_encoder_2"):
            config = path / sub / "config.json"
            if not config.is_file():
                continue  # SD1/SD2 folders have one text encoder
            try:
                text_config = json.loads(config.read_text())  # CLIP's hidden_size; T5's (FLUX) d_model
                widths.add(int(text_config.get("hidden_size") or text_config.get("d_model")))
            except (ValueError, TypeError, OSError) as exc:
                log.warning("checkpoint %s: cannot read %s/config.json: %s", info.name, sub, exc)
    elif path.suffix == ".safetensors":
        from modules.model_store.checkpoint_files import (
            CheckpointError,
            read_safetensors_shapes,
        )
        try:
            shapes = read_safetensors_shapes(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s: cannot read its header for the text encoder widths: %s", info.name, exc)
            return widths
        widths.update(shape[1] for key, shape in shapes.items()
                      if key.endswith("token_embedding.weight") and len(shape) == 2)
    _widths_cache[key] = frozenset(widths)
    return widths


class ExtraNetworks:
    """The LoRA registry and the embedding database of one server."""

    def __init__(self, lora_dirs: list[Path], embedding_dirs: list[Path]):
        self.loras = LoraRegistry(lora_dirs)
        self.embeddings = EmbeddingDatabase(embedding_dirs)
        self.loras.refresh()

    def embeddings_for(self, checkpoint) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) embeddings for a checkpoint (all loaded when its widths cannot be read)."""
        widths = text_encoder_widths(checkpoint)
        return self.embeddings.split_for(widths) if widths else (self.embeddings.all(), {})

    def resolve(self, prompt: str) -> ResolvedNetworks:
        text, tags = prompt_parser.parse_extra_networks(prompt)
        out = ResolvedNetworks(prompt=text)
        seen: set[str] = set()
        for tag in tags:
            if tag.kind not in ("lora", "lyco"):
                out.warnings.append(f"{tag.text} ignored: unknown extra network type {tag.kind!r} (only lora is supported)")
                continue
            name = tag.args[0].strip()
            info = self.loras.find(name)
            if info is None:
                out.warnings.append(f"{tag.text} ignored: no LoRA named {name!r} in {', '.join(map(str, self.loras.dirs))}")
                continue
            values = [a.strip() for a in tag.args[1:3]]
            mults = [_parse_multiplier(v) for v in values]
            if any(m is None for m in mults):
                bad = next(v for v, m in zip(values, mults) if m is None)
                out.warnings.append(f"{tag.text} ignored: {bad!r} is not a number")
                continue
            te = mults[0] if mults else 1.0
            unet = mults[1] if len(mults) > 1 else te
            if info.name in seen:
                out.warnings.append(f"{tag.text} ignored: LoRA {info.name!r} is already in the prompt")
                continue
            seen.add(info.name)
            out.loras.append((info, te, unet))
        return out

    @contextlib.contextmanager
    def leased(self, manager, resolved: ResolvedNetworks, warnings: list[str]) -> Iterator[list[AppliedLora]]:
        """Lease every resolved LoRA from the model manager (loaded once, then cached); unreadable files
        are skipped with a warning."""
        with contextlib.ExitStack() as stack:
            applied = []
            for info, te, unet in resolved.loras:
                st = info.path.stat()
                key = f"lora:{info.path}:{st.st_size}:{st.st_mtime_ns}"
                try:
                    weights = stack.enter_context(manager.use(key, lambda info=info: load_lora(info.path, info.name),
                                                              kind="lora", name=f"LoRA {info.name}"))
                except LoraFileError as exc:
                    warnings.append(f"<lora:{info.name}> ignored: {exc}")
                    continue
                if weights.unknown_keys:
                    warnings.append(f"<lora:{info.name}>: {len(weights.unknown_keys)} of its tensors are of a kind "
                                    f"this studio does not read (e.g. {weights.unknown_keys[0]}) and were left out")
                applied.append(AppliedLora(info, te, unet, weights))
            yield applied




def for_folders(folders, demo: bool = False) -> ExtraNetworks:
    """The server's extra networks: --lora-dir (default MODELS/Lora), --embeddings-dir (default
    DATA/embeddings) and MODELS/embeddings, plus the demo set's folders with --demo."""
    lora_dirs = [folders.lora_dir]
    embedding_dirs = [folders.embeddings_dir, folders.models_dir / "embeddings"]
    if demo:
        demo_root = folders.data_dir / "demo-models"
        lora_dirs.append(demo_root / "Lora")
        embedding_dirs.append(demo_root / "embeddings")
    return ExtraNetworks(lora_dirs, embedding_dirs)
