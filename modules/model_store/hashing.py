"""sha256 of model files, cached by path, mtime and size and persisted as JSON (A1111's cache.json), and
A1111's "AutoV2" short hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.core.fileio import atomic_write_text

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


HASH_CHUNK_BYTES = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Hashes


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of files, cached by (absolute path, mtime_ns, size) and persisted as JSON.

    Hashing a checkpoint reads gigabytes, so a value is reused until the file's mtime or size
    changes. The cache file is rewritten atomically (temp file + os.replace) after each new hash, so a
    crash never leaves it half-written. Thread-safe; a file is hashed by one thread at a time.
    """

    FORMAT_VERSION = 1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A damaged cache only costs re-hashing; never refuse to start over it.
            log.warning("ignoring unreadable hash cache %s: %s", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.FORMAT_VERSION:
            return {}
        files = data.get("files")
        return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    def _write_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": self.FORMAT_VERSION, "files": self._entries}, indent=1, sort_keys=True)
        atomic_write_text(self.path, payload)

    @staticmethod
    def _key(file: str | os.PathLike) -> tuple[str, os.stat_result]:
        path = Path(file).resolve()
        return str(path), path.stat()

    def peek(self, file: str | os.PathLike) -> str | None:
        """The cached sha256 if it is still valid for the file as it is now, else None (never reads
        the file's contents)."""
        try:
            key, st = self._key(file)
        except OSError:
            return None
        with self._lock:
            entry = self._entries.get(key)
        if entry and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("size") == st.st_size:
            return entry.get("sha256")
        return None

    def sha256(self, file: str | os.PathLike) -> str:
        """The file's sha256 (hex), from the cache when its mtime and size are unchanged."""
        cached = self.peek(file)
        if cached:
            return cached
        key, _ = self._key(file)
        with self._lock:
            file_lock = self._file_locks.setdefault(key, threading.Lock())
        with file_lock:
            # Another thread may have hashed it while this one waited.
            cached = self.peek(file)
            if cached:
                return cached
            key, st = self._key(file)
            digest = sha256_of_file(Path(key))
            with self._lock:
                self._entries[key] = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "sha256": digest}
                self._write_locked()
            return digest

    def record(self, file: str | os.PathLike, sha256: str) -> None:
        """Remember the sha256 of a file as it is now, computed while it was written (a merged checkpoint), so
        listing it never reads it again."""
        key, st = self._key(file)
        with self._lock:
            self._entries[key] = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "sha256": sha256}
            self._write_locked()

    def autov2(self, file: str | os.PathLike) -> str:
        """A1111's "AutoV2" model hash: the first 10 hex digits of the sha256."""
        return self.sha256(file)[:10]
