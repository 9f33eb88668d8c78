"""The hashes A1111 shows for LoRA and embedding files (AutoV3 for safetensors, sha256 otherwise),
computed once per file version.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from pathlib import Path

log = logging.getLogger("webui.extra_networks")


# ----------------------------------------------------------------------------------------- hashes

def autov3(path: str | os.PathLike) -> str:
    """A1111/Civitai's AutoV3 ("addnet") hash: sha256 of a safetensors file's data after its header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashMemo:
    """Hashes per (file, size, mtime): a file is hashed once per version."""

    def __init__(self):
        self._lock = threading.Lock()
        self._known: dict[tuple, str] = {}

    def get(self, path: Path, fn) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, fn.__name__)
        with self._lock:
            if key in self._known:
                return self._known[key]
        value = fn(path)
        with self._lock:
            self._known[key] = value
        return value


file_hashes = _HashMemo()
