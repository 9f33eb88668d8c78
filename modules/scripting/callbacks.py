"""A1111's script callbacks (`on_app_started`, `on_ui_tabs`, ...): who registered what, and calling them so that
one broken callback is logged and reported, never fatal to the server or to the other extensions."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("webui.scripts")

NAMES = ("app_started", "before_ui", "ui_tabs", "ui_settings", "before_image_saved", "image_saved", "model_loaded",
         "script_unloaded", "infotext_pasted", "after_component", "before_component", "ui_train_tabs",
         "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_token_counter", "list_optimizers",
         "list_unets", "extra_noise")
# callbacks A1111 has that reach into its model internals; they are accepted (so an extension loads) and never
# called here, which the README says
NEVER_CALLED = ("cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "list_optimizers", "list_unets", "extra_noise",
                "before_token_counter")


@dataclass
class Registered:
    fn: Callable
    source: str  # the script file that registered it ("" when unknown)
    name: str = ""


@dataclass
class Callbacks:
    """Every registered callback by kind, and the errors they raised (source, kind, message)."""
    entries: dict[str, list[Registered]] = field(default_factory=lambda: {n: [] for n in NAMES})
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    loading: str = ""  # the file being loaded now: what registrations are attributed to
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, fn: Callable, name: str | None = None) -> None:
        if kind not in self.entries:
            raise ValueError(f"unknown callback kind {kind!r}")
        if not callable(fn):
            raise TypeError(f"on_{kind} needs a function, got {fn!r}")
        with self._lock:
            self.entries[kind].append(Registered(fn, self.loading, name or getattr(fn, "__name__", "")))

    def remove_from(self, source: str) -> None:
        with self._lock:
            for kind in self.entries:
                self.entries[kind] = [r for r in self.entries[kind] if r.source != source]

    def call(self, kind: str, *args: Any) -> list[tuple[Registered, Any]]:
        """Call every `kind` callback; (entry, result) of those that returned, errors logged and kept."""
        done = []
        for entry in list(self.entries[kind]):
            try:
                done.append((entry, entry.fn(*args)))
            except Exception as e:
                message = f"{type(e).__name__}: {e}"
                log.exception("callback on_%s from %s failed", kind, entry.source or "?")
                with self._lock:
                    self.errors.append((entry.source, kind, message))
        return done

    def count(self, kind: str) -> int:
        return len(self.entries[kind])
