"""The checkpoints in the model folders: `CheckpointInfo` (a single file or a diffusers folder, its hash and
A1111 title) and `CheckpointRegistry` (discovery, and how a user's text -- title, name, hash -- finds one,
as A1111's `sd_model_checkpoint` does; which files failed to load and are left out of defaults).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modules.model_store.checkpoint_files import FLOW_PIPELINES, CheckpointNotFoundError
from modules.model_store.hashing import HashCache, sha256_of_file

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_CONFIGS_METADATA_KEY = "diffusers_configs"


# ---------------------------------------------------------------------------------------------------
# Checkpoints on disk

_DIFFUSERS_UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


@dataclass
class CheckpointInfo:
    """One checkpoint: a single file, or a diffusers folder (a folder with model_index.json).

    `sha256`/`shorthash`/`title` hash the file on first use (through the HashCache, so only once per
    file version). A diffusers folder has no single file to hash, so its sha256 is the sha256 of the
    text "<sha256 of model_index.json><sha256 of the UNet weights file>": it changes when the
    pipeline's layout or its UNet weights change, and stays cheap compared to hashing every component.
    """

    filename: str
    name: str
    model_name: str
    is_diffusers_folder: bool = False
    hash_cache: HashCache | None = field(default=None, repr=False, compare=False)

    def hash_files(self) -> list[Path]:
        """The files the sha256 is computed from."""
        if not self.is_diffusers_folder:
            return [Path(self.filename)]
        folder = Path(self.filename)
        files = [folder / "model_index.json"]
        for part in ("unet", "transformer"):  # SD's UNet; SD3's and FLUX's transformer
            for candidate in _DIFFUSERS_UNET_WEIGHTS:
                if (folder / part / candidate).is_file():
                    files.append(folder / part / candidate)
                    break
        return files

    def _hash(self, file: Path, peek_only: bool) -> str | None:
        if self.hash_cache is None:
            return None if peek_only else sha256_of_file(file)
        return self.hash_cache.peek(file) if peek_only else self.hash_cache.sha256(file)

    def _sha256(self, peek_only: bool) -> str | None:
        digests = [self._hash(f, peek_only) for f in self.hash_files()]
        if any(d is None for d in digests):
            return None
        if not self.is_diffusers_folder:
            return digests[0]
        return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()

    @property
    def sha256(self) -> str:
        return self._sha256(peek_only=False)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"

    @property
    def known_sha256(self) -> str | None:
        """The sha256 if the cache already holds it for the current file version; never hashes."""
        return self._sha256(peek_only=True)

    @property
    def display_title(self) -> str:
        """The title when the hash is already known, else the bare name, as A1111 lists checkpoints
        that were never loaded; lets a UI list a folder of big files without hashing all of them."""
        known = self.known_sha256
        return f"{self.name} [{known[:10]}]" if known else self.name


def _is_flow_model(info: CheckpointInfo) -> bool:
    """A FLUX/SD3 diffusers folder or single file: never the default while an SD model is. Read once per file
    version (its header or model_index.json), not on every request that picks a default."""
    path = Path(info.filename) / "model_index.json" if info.is_diffusers_folder else Path(info.filename)
    try:
        stat = path.stat()
    except OSError:
        return False
    return _is_flow_file(str(path), info.is_diffusers_folder, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _is_flow_file(path: str, model_index: bool, mtime_ns: int, size: int) -> bool:
    """`_is_flow_model` for one version of one file (`mtime_ns` and `size` are the cache's key, not read here)."""
    if model_index:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("_class_name") in FLOW_PIPELINES
        except (OSError, ValueError, AttributeError):
            return False
    if not path.lower().endswith(".safetensors"):
        return False
    from modules.model_store import flux_files, sd3_files
    from modules.model_store.checkpoint_files import read_safetensors_shapes
    try:
        keys = read_safetensors_shapes(path)
    except (OSError, ValueError):
        return False
    return flux_files.is_flux_transformer(keys) or sd3_files.is_sd3_transformer(keys)


_TITLE_RE = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class CheckpointRegistry:
    """The checkpoints in the model folders (plus explicitly named files), and lookup by the texts
    users and API clients send: a title "name [hash]", a name, a model name, a file name with or
    without extension, or a hash."""

    def __init__(
        self,
        dirs: Iterable[str | os.PathLike],
        extra_files: Iterable[str | os.PathLike] = (),
        hash_cache: HashCache | None = None,
    ):
        self.dirs = [Path(d) for d in dirs]
        self.extra_files = [Path(f) for f in extra_files]
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._items: list[CheckpointInfo] | None = None
        # files that failed to load, with why: left out of the default choice until they change on disk
        self._unusable: dict[str, tuple[tuple[int, int] | None, str]] = {}

    def mark_unusable(self, info: CheckpointInfo, reason: str) -> None:
        """Remember that `info` cannot load (until its file changes), so defaults skip it."""
        with self._lock:
            self._unusable[info.filename] = (_file_stamp(info.filename), reason)

    def unusable(self) -> dict[str, str]:
        """name -> why, for the listed checkpoints that failed to load and have not changed since."""
        with self._lock:
            marks = dict(self._unusable)
        return {info.name: marks[info.filename][1] for info in self.list()
                if info.filename in marks and marks[info.filename][0] == _file_stamp(info.filename)}

    def resolve(self, text: str) -> CheckpointInfo:
        """`find`, or CheckpointNotFoundError naming what there is."""
        info = self.find(text)
        if info is None:
            names = ", ".join(c.name for c in self.list()) or "none on disk"
            raise CheckpointNotFoundError(f"checkpoint {text!r} not found (available: {names})")
        return info

    def usable(self) -> list[CheckpointInfo]:
        """The checkpoints in list order, less those known not to load: the candidates for the default. FLUX and
        SD3 models come last: they are large and read few of A1111's prompt and sampler settings, so they are a
        default only when nothing else is there."""
        bad = self.unusable()
        return sorted((info for info in self.list() if info.name not in bad), key=_is_flow_model)

    def _info(self, path: Path, name: str, is_folder: bool) -> CheckpointInfo:
        name = name.replace(os.sep, "/")
        model_name = name if is_folder else name.rsplit(".", 1)[0]
        return CheckpointInfo(
            filename=str(path.absolute()),
            name=name,
            model_name=model_name,
            is_diffusers_folder=is_folder,
            hash_cache=self.hash_cache,
        )

    def _scan_dir(self, root: Path) -> list[CheckpointInfo]:
        found = []
        if (root / "model_index.json").is_file():
            return [self._info(root, root.name, True)]
        # Links are followed (users link model folders in), so remember real paths to stop loops.
        visited = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue  # .git, .cache and the like hold no user checkpoints
                real = os.path.realpath(here / d)
                if real in visited:
                    continue
                visited.add(real)
                if (here / d / "model_index.json").is_file():
                    # A diffusers folder is one checkpoint; its unet/vae files are not checkpoints.
                    found.append(self._info(here / d, str((here / d).relative_to(root)), True))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if f.lower().endswith(CHECKPOINT_EXTENSIONS) and not f.startswith("."):
                    found.append(self._info(here / f, str((here / f).relative_to(root)), False))
        return found

    def refresh(self) -> list[CheckpointInfo]:
        """Rescan the folders (hashes are not computed here) and return the new list."""
        items: list[CheckpointInfo] = []
        for root in self.dirs:
            if root.is_dir():
                items.extend(sorted(self._scan_dir(root), key=lambda i: i.name))
        for f in self.extra_files:
            if f.is_file() or (f / "model_index.json").is_file():
                items.append(self._info(f, f.name, f.is_dir()))
        seen_files: set[str] = set()
        seen_names: set[str] = set()
        unique = []
        for info in items:
            real = os.path.realpath(info.filename)
            if real in seen_files:
                continue
            if info.name in seen_names:
                # Same relative name under two roots: the first root wins, as it is listed first.
                log.warning("checkpoint %s shadowed by an earlier one of the same name", info.filename)
                continue
            seen_files.add(real)
            seen_names.add(info.name)
            unique.append(info)
        unique.sort(key=lambda i: (i.name.lower(), i.name))
        with self._lock:
            self._items = unique
        return list(unique)

    def list(self) -> list[CheckpointInfo]:
        """All checkpoints, sorted by name (scanning on first use)."""
        with self._lock:
            items = self._items
        if items is None:
            items = self.refresh()
        return list(items)

    def find(self, text: str | None) -> CheckpointInfo | None:
        """The checkpoint a user's text means, or None. Accepts what A1111's `sd_model_checkpoint`
        accepts: "name [hash]", name, model name, file name, file name without extension, a short or
        full sha256, and also the absolute path."""
        if not text or not text.strip():
            return None
        text = text.strip()
        items = self.list()

        m = _TITLE_RE.match(text)
        if m:
            by_name = self._match_name(items, m["name"])
            if by_name:
                # The name decides; the hash only picks among same-named candidates. A title saved
                # before the file was re-saved (new hash) still finds the file, as in A1111.
                wanted = m["hash"].lower()
                for info in by_name:
                    known = info.known_sha256
                    if known and known.startswith(wanted):
                        return info
                return by_name[0]
            return self._match_hash(items, m["hash"])

        by_name = self._match_name(items, text)
        if by_name:
            return by_name[0]
        if _HEX_RE.match(text):
            return self._match_hash(items, text)
        return None

    @staticmethod
    def _aliases(info: CheckpointInfo) -> tuple[str, ...]:
        """The names a checkpoint answers to, most specific first: name, model name, file name, file
        name without extension, absolute path."""
        base = info.name.rsplit("/", 1)[-1]
        stem = base if info.is_diffusers_folder else base.rsplit(".", 1)[0]
        return info.name, info.model_name, base, stem, info.filename.replace("\\", "/")

    @classmethod
    def _match_name(cls, items: list[CheckpointInfo], text: str) -> list[CheckpointInfo]:
        """Checkpoints whose alias equals the text: exact spelling before case-insensitive, and a more
        specific alias kind before a less specific one (so "sub/b" beats another folder's "b")."""
        text = text.replace("\\", "/")
        table = [(info, cls._aliases(info)) for info in items]
        for fold in (False, True):
            needle = text.lower() if fold else text
            for kind in range(5):
                hits = [info for info, aliases in table if (aliases[kind].lower() if fold else aliases[kind]) == needle]
                if hits:
                    return hits
        return []

    @staticmethod
    def _match_hash(items: list[CheckpointInfo], text: str) -> CheckpointInfo | None:
        wanted = text.lower()
        # Hashes already known first; only then hash the rest (cached afterwards, so this is paid once).
        for info in items:
            known = info.known_sha256
            if known and known.startswith(wanted):
                return info
        for info in items:
            if info.known_sha256 is None:
                try:
                    if info.sha256.startswith(wanted):
                        return info
                except OSError as e:
                    log.warning("cannot hash %s: %s", info.filename, e)
        return None
