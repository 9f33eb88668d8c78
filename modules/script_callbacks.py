"""A1111's `modules.script_callbacks`: `on_app_started(fn)`, `on_ui_tabs(fn)`, `on_ui_settings(fn)`,
`on_before_image_saved(fn)`, `on_image_saved(fn)`, `on_model_loaded(fn)`, `on_script_unloaded(fn)`, ...

Registrations go to the server's one callback registry (`modules.scripting.callbacks.Callbacks`), attributed
to the script file that made them, so a failing callback is reported with its extension. Callbacks that reach
into A1111's model internals (`on_cfg_denoiser` and friends) are accepted and never called.
"""
from __future__ import annotations

from modules.generation.results import ImageSaveParams  # noqa: F401
from modules.scripting.callbacks import NAMES, Callbacks

_registry = Callbacks()


def bind(callbacks: Callbacks) -> None:
    """Point the A1111 functions at the server's registry (done by the script host before it loads files)."""
    global _registry
    _registry = callbacks


def registry() -> Callbacks:
    return _registry


def _adder(kind: str):
    def add(callback, *, name: str | None = None):
        _registry.add(kind, callback, name)
    add.__name__ = f"on_{kind}"
    add.__doc__ = f"Register `callback` for A1111's on_{kind}."
    return add


on_app_started = _adder("app_started")
on_before_ui = _adder("before_ui")
on_ui_tabs = _adder("ui_tabs")
on_ui_train_tabs = _adder("ui_train_tabs")
on_ui_settings = _adder("ui_settings")
on_before_image_saved = _adder("before_image_saved")
on_image_saved = _adder("image_saved")
on_model_loaded = _adder("model_loaded")
on_script_unloaded = _adder("script_unloaded")
on_infotext_pasted = _adder("infotext_pasted")
on_after_component = _adder("after_component")
on_before_component = _adder("before_component")
on_cfg_denoiser = _adder("cfg_denoiser")
on_cfg_denoised = _adder("cfg_denoised")
on_cfg_after_cfg = _adder("cfg_after_cfg")
on_before_token_counter = _adder("before_token_counter")
on_list_optimizers = _adder("list_optimizers")
on_list_unets = _adder("list_unets")
on_extra_noise = _adder("extra_noise")
assert all(f"on_{n}" in globals() for n in NAMES)


def remove_current_script_callbacks() -> None:
    """Forget the callbacks the file now loading registered (A1111 scripts call this before registering)."""
    if _registry.loading:
        _registry.remove_from(_registry.loading)


def remove_callbacks_for_function(callback) -> None:
    for kind in _registry.entries:
        _registry.entries[kind] = [r for r in _registry.entries[kind] if r.fn is not callback]
