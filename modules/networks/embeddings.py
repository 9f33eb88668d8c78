"""Textual inversion embeddings: one file (A1111's `.pt`, `.safetensors` with `emb_params` or SDXL's
`clip_l`/`clip_g`, diffusers' `{token: vector}`) and the folders' database, listed without loading.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from modules.networks.hashes import file_hashes, sha256_file

log = logging.getLogger("webui.extra_networks")


EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


# ------------------------------------------------------------------------------------- embeddings

class Embedding:
    """One textual inversion embedding: vectors per text-encoder width."""

    def __init__(self, name: str, path: Path, vectors: dict[int, Any], step: int | None = None,
                 checkpoint: str | None = None, checkpoint_name: str | None = None):
        self.name, self.path = name, path
        self._vectors = vectors
        self.step, self.checkpoint, self.checkpoint_name = step, checkpoint, checkpoint_name

    def vectors_for(self, dim: int):
        return self._vectors.get(dim)

    @property
    def count(self) -> int:
        return next(iter(self._vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """The vector width as A1111 reports it (an SDXL embedding: CLIP-L's plus CLIP-G's, 2048)."""
        return sum(self._vectors)

    @property
    def dims(self) -> set[int]:
        return set(self._vectors)

    @property
    def shorthash(self) -> str:
        return file_hashes.get(self.path, sha256_file)[:12]


class EmbeddingError(ValueError):
    pass


def load_embedding(path: Path) -> Embedding:
    import torch
    name = path.stem
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EmbeddingError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} is not an embedding file")
    step = checkpoint = checkpoint_name = None
    tensors: list[Any] = []
    if "string_to_param" in data:  # A1111's own .pt format
        tensors = list(data["string_to_param"].values())[:1]
        step, checkpoint, checkpoint_name = data.get("step"), data.get("sd_checkpoint"), data.get("sd_checkpoint_name")
    elif "emb_params" in data:
        tensors = [data["emb_params"]]
    elif "clip_l" in data or "clip_g" in data:  # SDXL: one set of vectors per encoder
        tensors = [data[k] for k in ("clip_l", "clip_g") if k in data]
    else:
        values = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(values) == 1:  # diffusers' {token: vector(s)}
            tensors = values
    vectors: dict[int, Any] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
            continue
        t = t.detach().float().reshape(-1, t.shape[-1])
        vectors[t.shape[-1]] = t
    if not vectors:
        raise EmbeddingError(f"{path.name} holds no embedding vectors of a known layout")
    return Embedding(name, path, vectors, step=step if isinstance(step, int) else None,
                     checkpoint=checkpoint if isinstance(checkpoint, str) else None,
                     checkpoint_name=checkpoint_name if isinstance(checkpoint_name, str) else None)


class EmbeddingDatabase:
    """The embeddings of some folders; files that fail to load are listed with why."""

    def __init__(self, dirs: list[Path]):
        self.dirs = list(dict.fromkeys(Path(d) for d in dirs))
        self._lock = threading.Lock()
        self._items: dict[str, Embedding] = {}
        self._errors: dict[str, str] = {}
        self._scanned = False

    def files(self) -> dict[str, Path]:
        """name -> file of every embedding file in the folders (the first of a name wins), nothing loaded: a
        listing that needs no torch (the UI builds its cards from it at start-up)."""
        found: dict[str, Path] = {}
        for root in self.dirs:
            if root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file():
                        found.setdefault(path.stem, path)
        return found

    def refresh(self) -> None:
        items, errors = {}, {}
        for name, path in self.files().items():
            try:
                items[name] = load_embedding(path)
            except EmbeddingError as exc:
                errors[name] = str(exc)
                log.warning("embedding skipped: %s", exc)
        with self._lock:
            self._items, self._errors, self._scanned = items, errors, True

    def all(self) -> dict[str, Embedding]:
        if not self._scanned:
            self.refresh()
        with self._lock:
            return dict(self._items)

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def split_for(self, dims: set[int]) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) for a model whose text encoders have these widths: an embedding is loaded when
        it has vectors for exactly those encoders (as A1111, an SD1 embedding is skipped by SDXL and an
        SDXL one, with CLIP-L and CLIP-G vectors, by SD1)."""
        loaded, skipped = {}, {}
        for name, emb in self.all().items():
            (loaded if emb.dims == set(dims) else skipped)[name] = emb
        return loaded, skipped
