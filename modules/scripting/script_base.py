"""A1111's Script class and what a request carries of its scripts: the script it picked (`run`) and the always-on
ones (hooks), each with its own slice of the arguments.

A script file defines subclasses of `Script`; the loader makes one instance per tab to build its UI and read its
arguments' labels and defaults, and a fresh instance per request to run it (so a script's `self` never carries
one user's values into another user's request).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from modules.generation.params import GenerationError, UnknownNameError

log = logging.getLogger("webui.scripts")

AlwaysVisible = object()  # what `show()` returns for an always-on script (A1111's scripts.AlwaysVisible)


class ScriptError(GenerationError):
    """A script refused its arguments or failed while it ran (shown as a 4xx / a UI notice naming it)."""


class UnknownScriptError(UnknownNameError):
    """A request naming a script that is not installed for its tab."""


class Script:
    """Base of every script (A1111's `scripts.Script`). Override `title`, `show`, `ui`, `run` for a script picked
    from the Script dropdown; return `AlwaysVisible` from `show` and override the hooks for an always-on one."""

    filename: str | None = None  # the file it was loaded from
    args_from: int = 0  # its arguments' slice of the tab's script_args (A1111's layout)
    args_to: int = 0
    alwayson: bool = False
    is_txt2img: bool = False
    is_img2img: bool = False
    group = None
    infotext_fields: list | None = None
    paste_field_names: list | None = None
    api_info = None
    on_before_component_elem_id: list = []
    on_after_component_elem_id: list = []
    sorting_priority: int = 0

    def title(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no title()")

    def show(self, is_img2img: bool):
        return True

    def ui(self, is_img2img: bool):
        return []

    def run(self, p, *args):
        return None

    def describe(self) -> str:
        return ""

    def elem_id(self, item_id: str) -> str:
        """A1111's element ids for a script's components: script_<tab>_<title>_<item>."""
        import re
        tab = "img2img" if self.is_img2img else "txt2img"
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tab}_{title}_{item_id}"

    # always-on hooks (A1111's signatures; the script's own arguments follow `p`)
    def before_process(self, p, *args): ...
    def process(self, p, *args): ...
    def before_process_batch(self, p, *args, **kwargs): ...
    def process_batch(self, p, *args, **kwargs): ...
    def postprocess_batch(self, p, *args, **kwargs): ...
    def postprocess_image(self, p, pp, *args): ...
    def postprocess(self, p, processed, *args): ...


@dataclass
class ArgInfo:
    """One UI argument of a script, as /sdapi/v1/script-info lists it."""
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list | None = None

    def as_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": self.choices}


@dataclass
class ScriptEntry:
    """A script class as installed for one tab: its instance for the UI, its arguments, where it came from."""
    cls: type
    instance: Script
    title: str
    is_img2img: bool
    alwayson: bool
    source: str  # the file path
    extension: str | None = None  # the extension's name, None for the studio's own scripts
    args: list[ArgInfo] = field(default_factory=list)

    def fresh(self, args_from: int, args_to: int) -> Script:
        """A new instance for one request, with what A1111's runner sets on its scripts."""
        script = self.cls()
        script.filename = self.source
        script.is_img2img, script.is_txt2img = self.is_img2img, not self.is_img2img
        script.alwayson = self.alwayson
        script.args_from, script.args_to = args_from, args_to
        for name in ("group", "infotext_fields", "paste_field_names"):  # what its ui() set up, if anything
            if name in vars(self.instance):
                setattr(script, name, getattr(self.instance, name))
        return script

    def defaults(self) -> list:
        return [a.value for a in self.args]

    def complete(self, given: list | None) -> list:
        """The script's arguments: those given, then its UI defaults for the rest (as A1111's API fills them)."""
        given = list(given or [])
        if self.args and len(given) > len(self.args):
            raise ScriptError(f"script {self.title!r} takes {len(self.args)} arguments, got {len(given)}")
        return given + self.defaults()[len(given):]


HOOK_CALLS = {
    # the processing loop's hook -> how A1111 calls it on a script (args: the script's own arguments)
    "process": lambda s, p, a: s.process(p, *a),
    "before_process_batch": lambda s, p, a, **kw: s.before_process_batch(p, *a, **kw),
    "process_batch": lambda s, p, a, **kw: s.process_batch(p, *a, **kw),
    "postprocess_batch": lambda s, p, a, images, **kw: s.postprocess_batch(p, *a, images=images, **kw),
    "postprocess_image": lambda s, p, a, pp: s.postprocess_image(p, pp, *a),
    "postprocess": lambda s, p, a, processed: s.postprocess(p, processed, *a),
}


class BoundScript:
    """An always-on script with its arguments, as the processing loop's hook object: the loop calls
    `hook(p, ...)`; the script gets A1111's signature, and an exception is a ScriptError naming it."""

    def __init__(self, script: Script, args: list, title: str):
        self.script, self.args, self.title = script, list(args), title
        for name, call in HOOK_CALLS.items():
            if _overrides(script, name) or (name == "process" and _overrides(script, "before_process")):
                setattr(self, name, self._hook(name, call))

    def _hook(self, name, call):
        def hook(p, *args, **kwargs):
            with script_errors(self.title, name):
                if name == "process" and _overrides(self.script, "before_process"):
                    self.script.before_process(p, *self.args)
                if name != "process" or _overrides(self.script, "process"):
                    call(self.script, p, self.args, *args, **kwargs)
        return hook


def _overrides(script: Script, name: str) -> bool:
    method = getattr(type(script), name, None)
    return method is not None and method is not getattr(Script, name, None)


class script_errors:
    """A context that turns a script's own exception into a ScriptError naming the script (the request's
    errors, a stop or a shortage of memory pass through as they are)."""

    def __init__(self, title: str, what: str):
        self.title, self.what = title, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (GenerationError, MemoryError)) or not isinstance(exc, Exception):
            return False
        from modules.core.jobs import JobStopped
        if isinstance(exc, JobStopped) or type(exc).__name__ == "ModelOutOfMemoryError":
            return False
        log.error("script %r failed in %s", self.title, self.what, exc_info=exc)
        raise ScriptError(f"script {self.title!r} failed in {self.what}: {type(exc).__name__}: {exc}") from exc
