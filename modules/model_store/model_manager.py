"""Model manager: the one owner of every loaded model, where it lives (compute device or RAM) and for how long.

Services never keep models of their own; they lease them:

    with manager.use(key, loader, kind="checkpoint", name="v1-5.safetensors") as pipe:
        ...

Getting and pinning is one atomic step, so nothing can evict a model between the lookup and its use.
A pinned model is never moved or dropped. When the compute device is a GPU there are two tiers: the
device tier fills up to `vram_budget`; to make room its least-recently-used unpinned models move to the
CPU (the RAM tier, up to `ram_budget`), and only when that overflows are the least-recently-used models
there dropped. With the CPU as the compute device there is one tier, bounded by `ram_budget`.

Sizes come from the weights themselves (`model_bytes`), so fake models in tests need only an `nbytes`
attribute and a `to(device)` method. Device moves always go through the model's own `.to()`, which is
why the manager never calls a CUDA API for a model it did not see allocate.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from modules.core import devices

logger = logging.getLogger("webui.models")

CPU = torch.device("cpu")
DEVICE_TIER = "device"
RAM_TIER = "ram"

T = TypeVar("T")


class ModelOutOfMemoryError(RuntimeError):
    """Loading or moving a model ran out of memory twice, the second time after every unpinned model
    had been freed. The manager is consistent afterwards: the failed model is not half-loaded."""

    def __init__(self, message: str, *, key: str, device: torch.device):
        super().__init__(message)
        self.key = key
        self.device = device


def _collect_tensors(obj: Any, tensors: dict[int, torch.Tensor], visited: set[int]) -> None:
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        tensors.setdefault(id(obj), obj)
    elif isinstance(obj, torch.nn.Module):
        for tensor in itertools.chain(obj.parameters(), obj.buffers()):
            tensors.setdefault(id(tensor), tensor)
    elif isinstance(getattr(obj, "components", None), Mapping):
        # A diffusers pipeline: its UNet, VAE and text encoders (tokenizers and schedulers hold no tensors).
        for component in obj.components.values():
            _collect_tensors(component, tensors, visited)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _collect_tensors(value, tensors, visited)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _collect_tensors(value, tensors, visited)
    elif callable(getattr(obj, "modules", None)):
        for module in obj.modules():
            _collect_tensors(module, tensors, visited)


def model_bytes(obj: Any) -> int:
    """Bytes the weights of `obj` occupy: numel * element_size over its parameters and buffers.

    Works for torch modules, pipelines exposing a `.components` dict, wrappers exposing `modules()`,
    dicts/lists of those, and anything with an `nbytes` attribute (which wins when present, so an
    object can state its own size). A tensor shared by several components counts once, which is what
    makes txt2img/img2img pipelines built over one checkpoint's modules cost one checkpoint.
    """
    declared = getattr(obj, "nbytes", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    tensors: dict[int, torch.Tensor] = {}
    _collect_tensors(obj, tensors, set())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def host_bytes(obj: Any) -> int:
    """Bytes a model keeps in CPU RAM beside its weights wherever those are (e.g. the originals of LoRA-touched
    weights a checkpoint keeps for exact restores), as it states them in `host_nbytes`; 0 when it states none."""
    declared = getattr(obj, "host_nbytes", 0)
    return declared if isinstance(declared, int) and not isinstance(declared, bool) else 0


def _format_bytes(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.2f} GiB"
    if count >= 1024**2:
        return f"{count / 1024**2:.1f} MiB"
    return f"{count} B"


@dataclass
class _Entry:
    key: str
    name: str
    kind: str
    model: Any
    nbytes: int
    tier: str
    host_bytes: int = 0  # kept in CPU RAM whatever the tier (counted against the RAM budget)
    pins: int = 0
    last_used: float = 0.0  # the manager's clock: orders LRU eviction
    order: int = 0  # breaks ties of a coarse or fake clock in favour of the later use
    last_used_wall: float = 0.0  # UNIX time, for reports
    drop_when_released: bool = False


def _component_bytes(model: Any) -> dict[str, int]:
    """A checkpoint's modules by name with their weights' bytes (empty for a model that is one module)."""
    components = getattr(model, "components", None)
    if not isinstance(components, dict):
        return {}
    return {name: model_bytes(part) for name, part in components.items() if isinstance(part, torch.nn.Module)}


class ModelManager:
    """Loads models on demand by key, keeps them within the VRAM and RAM budgets, and reports them.

    Thread-safe: one re-entrant lock guards the bookkeeping and every device move. Loaders run outside
    the lock so a slow disk load of one model does not block reports or leases of others; a second
    `use` of a key that is being loaded waits for that load instead of starting another.
    """

    def __init__(
        self,
        device: torch.device | str,
        vram_budget: int,
        ram_budget: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)  # reports and moves name the card: "cuda:0"
        self.device = device
        self.single_tier = device.type == "cpu"
        self._vram_budget = int(vram_budget)
        self._ram_budget = int(ram_budget)
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._loading: set[str] = set()
        self._load_counts: dict[str, int] = {}
        self._order = itertools.count()
        self._garbage = False

    # ----------------------------------------------------------------------------------------- leases

    @contextmanager
    def use(self, key: str, loader: Callable[[], Any], *, kind: str = "model", name: str | None = None) -> Iterator[Any]:
        """Lease the model `key` on the compute device for the with-block, loading it with `loader`
        (which should return it on the CPU; the manager moves it) when it is not loaded yet."""
        model = self._acquire(key, loader, kind, name or key)
        try:
            yield model
        finally:
            self._release(key)

    def _acquire(self, key: str, loader: Callable[[], Any], kind: str, name: str) -> Any:
        with self._changed:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._touch(entry)
                    if entry.tier == RAM_TIER:
                        try:
                            self._bring_to_device(entry)
                        except BaseException:
                            entry.pins -= 1
                            self._enforce_budgets()
                            raise
                        finally:
                            self._collect_if_needed()
                    return entry.model
                if key not in self._loading:
                    self._loading.add(key)
                    break
                self._changed.wait()

        try:
            model = self._load_from_disk(key, name, loader)
        except BaseException:
            with self._changed:
                self._loading.discard(key)
                self._changed.notify_all()
            raise

        with self._changed:
            try:
                entry = _Entry(key=key, name=name, kind=kind, model=model, nbytes=model_bytes(model), tier=RAM_TIER,
                               host_bytes=host_bytes(model), pins=1)
                del model
                self._touch(entry)
                self._load_counts[key] = self._load_counts.get(key, 0) + 1
                try:
                    self._bring_to_device(entry)
                except BaseException:
                    # Free the failed load: no entry refers to it, so its memory goes with `entry`.
                    entry.model = None
                    self._garbage = True
                    self._enforce_budgets()
                    raise
                self._entries[key] = entry
                self._enforce_budgets()
                return entry.model
            finally:
                self._loading.discard(key)
                self._changed.notify_all()
                self._collect_if_needed()

    def _release(self, key: str) -> None:
        with self._changed:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.pins -= 1
            self._touch(entry)
            if entry.pins == 0:
                if entry.drop_when_released:
                    self._drop(entry, "unload was requested while it was in use")
                else:
                    # The lease may have changed the model (LoRA weights fused or added, their originals kept in
                    # RAM): re-measure.
                    entry.nbytes = model_bytes(entry.model)
                    entry.host_bytes = host_bytes(entry.model)
            self._enforce_budgets()
            self._collect_if_needed()

    # ----------------------------------------------------------------------------- loading and moving

    def _load_from_disk(self, key: str, name: str, loader: Callable[[], Any]) -> Any:
        def load() -> Any:
            started = time.perf_counter()
            model = loader()
            logger.info("loaded %s from disk in %.1fs (%s)", name, time.perf_counter() - started, _format_bytes(model_bytes(model)))
            return model

        def free_everything(host_memory: bool) -> None:
            with self._changed:
                self._evict_all_unpinned()
                if host_memory:
                    # The load ran out of CPU RAM, where parked models live: parking more there would
                    # not help, dropping them does.
                    for entry in [e for e in self._entries.values() if e.tier == RAM_TIER and e.pins == 0]:
                        self._drop(entry, f"out of RAM while loading {name}")
                self._enforce_budgets()
                self._garbage = True
                self._collect_if_needed()

        return self._retry_once_on_oom(load, key, f"loading {name}", free_everything)

    def _bring_to_device(self, entry: _Entry) -> None:
        """Make room for `entry` on the compute device and move it there (lock held)."""
        budget = self._device_budget()
        self._make_room(entry.nbytes, budget)
        in_use = self._used(DEVICE_TIER)
        if in_use + entry.nbytes > budget:
            logger.warning(
                "%s needs %s but only %s of the %s %s budget is free (the rest is in use); loading it anyway",
                entry.name, _format_bytes(entry.nbytes), _format_bytes(max(0, budget - in_use)),
                _format_bytes(budget), self.device,
            )

        def move() -> None:
            self._move(entry, self.device)

        def free_everything(host_memory: bool) -> None:
            self._move_quietly(entry, CPU)  # drop the part that did reach the device
            self._evict_all_unpinned()
            self._garbage = True
            self._collect_if_needed()

        try:
            self._retry_once_on_oom(move, entry.key, f"moving {entry.name} to {self.device}", free_everything)
        except BaseException:
            self._move_quietly(entry, CPU)
            entry.tier = RAM_TIER
            self._garbage = True
            raise
        entry.tier = DEVICE_TIER

    def _retry_once_on_oom(self, action: Callable[[], T], key: str, what: str, free: Callable[[bool], None]) -> T:
        """Run `action`; on out-of-memory call `free(host_memory)` and run it once more; a second OOM is
        a ModelOutOfMemoryError. Frames of the failed attempt are cleared so the tensors they hold go."""
        for attempt in range(2):
            try:
                return action()
            except BaseException as exc:
                if not devices.is_oom_error(exc):
                    raise
                traceback.clear_frames(exc.__traceback__)
                if attempt == 1:
                    raise ModelOutOfMemoryError(
                        f"Out of memory on {self.device} while {what}, even after freeing every model "
                        f"not in use ({exc}). Free memory used by other programs, lower the memory "
                        "budget settings, or use a smaller model.",
                        key=key,
                        device=self.device,
                    ) from exc
                host_memory = devices.is_host_oom_error(exc)
                logger.warning("out of memory on %s while %s; freeing every model not in use and retrying once",
                               "the CPU" if host_memory else self.device, what)
            free(host_memory)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _move(self, entry: _Entry, target: torch.device) -> None:
        to = getattr(entry.model, "to", None)
        if to is None:
            return  # tokenizers and other plain objects have no device
        moved = to(target)
        if moved is not None:
            entry.model = moved
        logger.debug("moved %s to %s", entry.name, target)

    def _move_quietly(self, entry: _Entry, target: torch.device) -> None:
        try:
            self._move(entry, target)
        except Exception:
            logger.exception("could not move %s to %s while recovering from an error", entry.name, target)

    # ------------------------------------------------------------------------------------ eviction

    def _device_budget(self) -> int:
        return self._ram_budget if self.single_tier else self._vram_budget

    def _used(self, tier: str) -> int:
        """Bytes held in `tier`. Host-side bytes (`host_bytes`) are RAM wherever their model is: they count in
        the RAM tier, and in the device tier when the device is the CPU."""
        used = sum(entry.nbytes for entry in self._entries.values() if entry.tier == tier)
        if tier == RAM_TIER or self.single_tier:
            used += sum(entry.host_bytes for entry in self._entries.values())
        return used

    def _least_recently_used(self, tier: str) -> _Entry | None:
        candidates = [entry for entry in self._entries.values() if entry.tier == tier and entry.pins == 0]
        return min(candidates, key=lambda entry: (entry.last_used, entry.order), default=None)

    def _make_room(self, needed: int, budget: int) -> None:
        while self._used(DEVICE_TIER) + needed > budget:
            victim = self._least_recently_used(DEVICE_TIER)
            if victim is None:
                return
            self._evict_from_device(victim)

    def _evict_from_device(self, entry: _Entry) -> None:
        if self.single_tier:
            self._drop(entry, "the RAM budget is full")
            return
        try:
            self._move(entry, CPU)
        except Exception:
            # A model that cannot leave the device cleanly must not stay half-moved: drop it.
            logger.exception("could not move %s to the CPU; dropping it", entry.name)
            self._drop(entry, "it could not be moved to the CPU")
            return
        entry.tier = RAM_TIER
        logger.info("moved %s (%s) from %s to the CPU to make room", entry.name, _format_bytes(entry.nbytes), self.device)

    def _evict_all_unpinned(self) -> None:
        for entry in [e for e in self._entries.values() if e.tier == DEVICE_TIER and e.pins == 0]:
            self._evict_from_device(entry)

    def _enforce_budgets(self) -> None:
        self._make_room(0, self._device_budget())
        if self.single_tier:
            return
        while self._used(RAM_TIER) > self._ram_budget:
            victim = self._least_recently_used(RAM_TIER)
            if victim is None:
                return
            self._drop(victim, "the RAM budget is full")

    def _drop(self, entry: _Entry, why: str) -> None:
        del self._entries[entry.key]
        entry.model = None
        self._garbage = True
        logger.info("dropped %s (%s): %s", entry.name, _format_bytes(entry.nbytes), why)

    def _collect_if_needed(self) -> None:
        # Dropping the last reference frees CPU tensors at once, but reference cycles inside big models
        # and the CUDA caching allocator keep memory until a collection and an empty_cache.
        if self._garbage:
            self._garbage = False
            devices.collect_garbage(self.device)

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = self._clock()
        entry.order = next(self._order)
        entry.last_used_wall = time.time()

    # ----------------------------------------------------------------------------------- management

    @property
    def vram_budget(self) -> int:
        return self._vram_budget

    @property
    def ram_budget(self) -> int:
        return self._ram_budget

    def set_budgets(self, vram_budget: int, ram_budget: int) -> None:
        """Change the budgets (a settings change) and evict at once whatever no longer fits."""
        with self._lock:
            self._vram_budget = int(vram_budget)
            self._ram_budget = int(ram_budget)
            logger.info("budgets: %s on %s, %s of RAM", _format_bytes(self._vram_budget), self.device, _format_bytes(self._ram_budget))
            self._enforce_budgets()
            self._collect_if_needed()

    def unload(self, key: str) -> bool:
        """Drop a model. A model in use is dropped when its last lease ends. False if it was not loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._unload_entry(entry)
                self._collect_if_needed()
            return entry is not None

    def unload_all(self, kind: str | None = None) -> int:
        """Drop every model (of `kind`, when given); models in use go when released. Returns the count."""
        with self._lock:
            chosen = [entry for entry in self._entries.values() if kind is None or entry.kind == kind]
            for entry in chosen:
                self._unload_entry(entry)
            self._collect_if_needed()
            return len(chosen)

    def _unload_entry(self, entry: _Entry) -> None:
        if entry.pins:
            entry.drop_when_released = True
            logger.info("%s is in use; it will be dropped when released", entry.name)
        else:
            self._drop(entry, "unload was requested")

    def park_all(self) -> int:
        """Move every unpinned model off the compute device into the RAM tier (for example before
        training takes the GPU for itself); RAM overflow then drops the least recently used. Returns
        how many models were moved. On a CPU-only manager there is nothing to park."""
        with self._lock:
            if self.single_tier:
                return 0
            parked = [e for e in self._entries.values() if e.tier == DEVICE_TIER and e.pins == 0]
            for entry in parked:
                self._evict_from_device(entry)
            self._enforce_budgets()
            self._garbage = True
            self._collect_if_needed()
            return len(parked)

    # -------------------------------------------------------------------------------------- queries

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get_loaded(self, key: str) -> Any | None:
        """The model if loaded (on either tier), without pinning or moving it; None otherwise."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.model if entry is not None else None

    def loads(self, key: str) -> int:
        """How many times `key` was loaded from disk (moves between tiers are not loads)."""
        with self._lock:
            return self._load_counts.get(key, 0)

    def usage(self) -> dict[str, int]:
        """Bytes held on the compute device and in the RAM tier, with the budgets they answer to."""
        with self._lock:
            return {
                "device": self._used(DEVICE_TIER),
                "ram": self._used(RAM_TIER),
                "vram_budget": self._vram_budget,
                "ram_budget": self._ram_budget,
            }

    def report(self) -> list[dict[str, Any]]:
        """One dict per loaded model, most recently used first: key, name, kind, device ("cuda:0",
        "cpu"), bytes (its weights, on that device), host_bytes (what it keeps in CPU RAM besides, such as
        the originals of LoRA-touched weights), loads (from disk), last_used (UNIX time) and pinned (in use
        right now)."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: (e.last_used, e.order), reverse=True)
            return [
                {
                    "key": entry.key,
                    "name": entry.name,
                    "kind": entry.kind,
                    "device": str(self.device) if entry.tier == DEVICE_TIER else str(CPU),
                    "bytes": entry.nbytes,
                    "host_bytes": entry.host_bytes,
                    "loads": self._load_counts.get(entry.key, 0),
                    "last_used": entry.last_used_wall,
                    "pinned": entry.pins > 0,
                    "components": _component_bytes(entry.model),
                }
                for entry in entries
            ]
