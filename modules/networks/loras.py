"""The LoRA files of the LoRA folders: `LoraInfo` (name, alias, hash, metadata) and `LoraRegistry`,
rescanned on `refresh()`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from modules.networks.hashes import autov3, file_hashes, sha256_file

log = logging.getLogger("webui.extra_networks")

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


# ------------------------------------------------------------------------------------------ LoRA files

@dataclass(frozen=True)
class LoraInfo:
    name: str  # file name without extension, relative to its folder ("sub/name" in sub-folders)
    path: Path
    alias: str

    @property
    def hash(self) -> str:
        """AutoV3 (full) for safetensors; the file's sha256 for other formats."""
        return file_hashes.get(self.path, autov3 if self.path.suffix == ".safetensors" else sha256_file)

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def metadata(self) -> dict:
        if self.path.suffix != ".safetensors":
            return {}
        from modules.model_store.checkpoint_files import (
            CheckpointError,
            read_safetensors_metadata,
        )
        try:
            return dict(read_safetensors_metadata(self.path))
        except CheckpointError as exc:  # unreadable header: the card shows no metadata
            log.warning("LoRA %s: cannot read its metadata: %s", self.name, exc)
            return {}


class LoraRegistry:
    """The LoRA files of some folders, rescanned on `refresh()`."""

    def __init__(self, dirs: list[Path]):
        self.dirs = [Path(d) for d in dirs]
        self._lock = threading.Lock()
        self._items: dict[str, LoraInfo] = {}

    def refresh(self) -> list[LoraInfo]:
        found: dict[str, LoraInfo] = {}
        for root in self.dirs:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() not in LORA_EXTENSIONS or not path.is_file():
                    continue
                name = path.relative_to(root).with_suffix("").as_posix()
                alias = name
                if path.suffix == ".safetensors":
                    from modules.model_store.checkpoint_files import (
                        CheckpointError,
                        read_safetensors_metadata,
                    )
                    try:
                        alias = read_safetensors_metadata(path).get("ss_output_name") or name
                    except CheckpointError as exc:  # listed by its file name; using it reports the error
                        log.warning("LoRA %s: cannot read its header: %s", name, exc)
                found.setdefault(name, LoraInfo(name=name, path=path, alias=alias))
        with self._lock:
            self._items = found
        return list(found.values())

    def list(self) -> list[LoraInfo]:
        with self._lock:
            return list(self._items.values())

    def find(self, name: str) -> LoraInfo | None:
        """By name (with or without sub-folder), then by alias (A1111 looks aliases up too)."""
        with self._lock:
            items = dict(self._items)
        if name in items:
            return items[name]
        for info in items.values():
            if Path(info.name).name == name:
                return info
        for info in items.values():
            if info.alias == name:
                return info
        return None
