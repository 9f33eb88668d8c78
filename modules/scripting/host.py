"""The scripts of a running server: loads `scripts/*.py` (the studio's own), then every enabled extension's
`scripts/*.py` (A1111's order), keeps one `TabScripts` per tab, binds a request's `script_name` / `script_args` /
`alwayson_scripts` to fresh script instances, and runs a request with them on the job worker.

A file that fails to import, a class whose `title()` / `show()` / `ui()` fails, or a callback that raises is
logged, reported (`problems()`, the Extensions tab) and skipped; the server and every other script keep working.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.core import extensions as ext_mod
from modules.core import paths
from modules.scripting.callbacks import Callbacks
from modules.scripting.script_base import (
    AlwaysVisible,
    ArgInfo,
    BoundScript,
    Script,
    ScriptEntry,
    ScriptError,
    UnknownScriptError,
    script_errors,
)

log = logging.getLogger("webui.scripts")

BUILTIN_SCRIPTS_DIR = paths.REPO_ROOT / "scripts"


@dataclass
class LoadedFile:
    path: Path
    extension: str | None
    classes: list[type] = field(default_factory=list)


@dataclass
class Selection:
    """A request's scripts: the one it picked (with its arguments) and every always-on one (with theirs)."""
    script: tuple[ScriptEntry, list] | None = None
    alwayson: list[tuple[ScriptEntry, list]] = field(default_factory=list)

    @property
    def title(self) -> str | None:
        return self.script[0].title if self.script else None


def _arg_info(component) -> ArgInfo:
    choices = getattr(component, "choices", None)
    if choices:
        choices = [c[1] if isinstance(c, (tuple, list)) and len(c) == 2 else c for c in choices]
    value = getattr(component, "value", None)
    if callable(value):
        value = None
    return ArgInfo(label=getattr(component, "label", None), value=value, minimum=getattr(component, "minimum", None),
                   maximum=getattr(component, "maximum", None), step=getattr(component, "step", None),
                   choices=list(choices) if choices else None)


class TabScripts:
    """The scripts of one tab (txt2img or img2img), in A1111's order: the selectable ones, then the always-on."""

    def __init__(self, host: "ScriptHost", is_img2img: bool):
        self.host, self.is_img2img = host, is_img2img
        self.selectable: list[ScriptEntry] = []
        self.alwayson: list[ScriptEntry] = []
        self.components: dict[str, list] = {}  # title -> its UI components (once built)
        self._args_known = False
        for loaded in host.files:
            for cls in loaded.classes:
                self._add(cls, loaded)

    def _add(self, cls: type, loaded: LoadedFile) -> None:
        where = f"{loaded.path.name} ({cls.__name__})"
        try:
            instance = cls()
            instance.is_img2img, instance.is_txt2img = self.is_img2img, not self.is_img2img
            instance.filename = str(loaded.path)
            title = str(instance.title())
            visible = instance.show(self.is_img2img)
        except Exception as e:
            self.host.report(loaded, f"{where}: {type(e).__name__}: {e}")
            return
        if visible is False or visible is None:
            return
        alwayson = visible is AlwaysVisible
        instance.alwayson = alwayson
        entry = ScriptEntry(cls, instance, title, self.is_img2img, alwayson, str(loaded.path), loaded.extension)
        (self.alwayson if alwayson else self.selectable).append(entry)

    @property
    def entries(self) -> list[ScriptEntry]:
        return self.selectable + self.alwayson

    def titles(self) -> list[str]:
        return [e.title for e in self.selectable]

    def find(self, name: str) -> ScriptEntry | None:
        wanted = str(name).strip().lower()
        return next((e for e in self.entries if e.title.lower() == wanted), None)

    def build_ui(self, entry: ScriptEntry) -> list:
        """The script's components (made inside the caller's Gradio context); a failing `ui()` is reported and
        the script left out of the tab."""
        with script_errors(entry.title, "ui()"):
            made = entry.instance.ui(self.is_img2img)
        comps = [c for c in (made or []) if c is not None] if isinstance(made, (list, tuple)) else \
            ([made] if made is not None else [])
        entry.args = [_arg_info(c) for c in comps]
        self.components[entry.title] = comps
        return comps

    def ensure_args(self) -> None:
        """Every script's argument list (labels, defaults), from its ui() in a throwaway page when the UI has not
        built it (API-only servers)."""
        if self._args_known:
            return
        import gradio as gr
        with gr.Blocks(analytics_enabled=False):
            for entry in list(self.entries):
                if entry.title in self.components:
                    continue
                try:
                    self.build_ui(entry)
                except ScriptError as e:
                    self.drop(entry, str(e))
        self._args_known = True

    def drop(self, entry: ScriptEntry, why: str) -> None:
        for group in (self.selectable, self.alwayson):
            if entry in group:
                group.remove(entry)
        self.host.report_source(entry.source, entry.extension, why)

    def layout(self) -> dict[str, tuple[int, int]]:
        """title -> (args_from, args_to) in A1111's flat script_args (index 0: the dropdown's choice)."""
        spans, at = {}, 1
        for entry in self.entries:
            spans[entry.title] = (at, at + len(entry.args))
            at += len(entry.args)
        return spans

    def bind(self, script_name: str | None, script_args: list | None,
             alwayson_args: dict[str, Any] | None) -> Selection:
        """A request's scripts, with every argument completed from the scripts' UI defaults; unknown names and
        surplus arguments are errors naming the script."""
        self.ensure_args()
        tab = "img2img" if self.is_img2img else "txt2img"
        selection = Selection()
        if script_name not in (None, "", "None"):
            entry = self.find(script_name)
            if entry is None or entry.alwayson:
                raise UnknownScriptError(f"unknown script {script_name!r} for {tab} (scripts: "
                                         f"{', '.join(self.titles()) or 'none'}; see /sdapi/v1/scripts)")
            args = entry.complete(script_args)
            validate = getattr(entry.instance, "validate_args", None)
            if callable(validate):
                with script_errors(entry.title, "its arguments"):
                    try:
                        validate(args)
                    except (TypeError, ValueError) as e:
                        raise ScriptError(f"{entry.title}: {e}") from None
            selection.script = (entry, args)
        given = {str(k).lower(): v for k, v in (alwayson_args or {}).items()}
        for title in given:
            entry = self.find(title)
            if entry is None or not entry.alwayson:
                raise UnknownScriptError(f"unknown alwayson script {title!r} for {tab} (always-on scripts: "
                                         f"{', '.join(e.title for e in self.alwayson) or 'none'})")
        for entry in self.alwayson:
            value = given.get(entry.title.lower())
            args = value.get("args", []) if isinstance(value, dict) else (value or [])
            if not isinstance(args, list):
                raise ScriptError(f"alwayson_scripts[{entry.title!r}]: args must be a list")
            selection.alwayson.append((entry, entry.complete(args)))
        return selection

    def info(self) -> list[dict]:
        """/sdapi/v1/script-info's entries of this tab."""
        self.ensure_args()
        return [{"name": e.title.lower(), "is_alwayson": e.alwayson, "is_img2img": self.is_img2img,
                 "args": [a.as_dict() for a in e.args]} for e in self.entries]


class Events:
    """What the processing loop calls back (GenerationContext.events): the scripts' image and model callbacks."""

    def __init__(self, callbacks: Callbacks):
        self.callbacks = callbacks
        self._last_model = None

    def before_image_saved(self, params) -> None:
        self.callbacks.call("before_image_saved", params)

    def image_saved(self, params) -> None:
        self.callbacks.call("image_saved", params)

    def model_loaded(self, bundle) -> None:
        unet = bundle.components.get("unet") if hasattr(bundle, "components") else bundle
        if unet is not self._last_model:  # a checkpoint loaded or switched to, not every request
            self._last_model = unet
            self.callbacks.call("model_loaded", bundle)


class ScriptHost:
    """Every script and extension of the server, loaded once at start-up."""

    def __init__(self, data_dir: Path, config_file: Path, args=None, *, script_dirs: list[Path] | None = None):
        self.args = args
        self.callbacks = Callbacks()
        self.events = Events(self.callbacks)
        disabled, config_all = ext_mod.disabled_in_config(config_file)
        self.extensions = ext_mod.discover(
            data_dir, disabled, disable_all=bool(getattr(args, "disable_all_extensions", False)),
            disable_extra=bool(getattr(args, "disable_extra_extensions", False)), config_all=config_all)
        self.data_dir = Path(data_dir)
        self.script_dirs = [BUILTIN_SCRIPTS_DIR] if script_dirs is None else list(script_dirs)
        self.files: list[LoadedFile] = []
        self.load_errors: list[tuple[str, str | None, str]] = []  # (file, extension, message)
        for message in getattr(args, "preload_errors", None) or []:
            self.load_errors.append((message.split(":", 1)[0], None, message))
        self._tabs: dict[bool, TabScripts] = {}

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self) -> "ScriptHost":
        from modules import (  # the A1111 names the files import
            script_callbacks,
            scripts,
        )
        for folder in self.script_dirs:
            for path in sorted(Path(folder).glob("*.py")):
                self._load_file(path, None)
        for ext in self.extensions:
            if not ext.enabled:
                continue
            for path in ext.scripts:
                self._load_file(path, ext)
        scripts.current_basedir = str(paths.REPO_ROOT)
        script_callbacks.bind(self.callbacks)
        self._tabs = {False: TabScripts(self, False), True: TabScripts(self, True)}
        return self

    def _load_file(self, path: Path, ext) -> None:
        from modules import script_callbacks, scripts
        name = ext.name if ext else None
        module_name = "studio_script_" + re.sub(r"\W", "_", f"{name or 'builtin'}_{path.stem}")
        loaded = LoadedFile(path, name)
        scripts.current_basedir = str(ext.path if ext else paths.REPO_ROOT)
        script_callbacks.bind(self.callbacks)
        self.callbacks.loading = str(path)
        if ext is not None and str(ext.path) not in sys.path:
            sys.path.append(str(ext.path))  # an extension's scripts may import its own helper modules
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException as e:  # a syntax error, an ImportError, even SystemExit: this file is skipped
            if isinstance(e, KeyboardInterrupt):
                raise
            sys.modules.pop(module_name, None)
            self.callbacks.remove_from(str(path))
            self.report(loaded, f"{type(e).__name__}: {e}")
            return
        finally:
            self.callbacks.loading = ""
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Script) and obj is not Script and obj.__module__ == module_name:
                loaded.classes.append(obj)
        loaded.classes.sort(key=lambda c: inspect.getsourcelines(c)[1] if _has_source(c) else 0)
        self.files.append(loaded)

    def report(self, loaded: LoadedFile, message: str) -> None:
        self.report_source(str(loaded.path), loaded.extension, message)

    def report_source(self, source: str, extension: str | None, message: str) -> None:
        log.error("script %s%s skipped: %s", source, f" (extension {extension})" if extension else "", message)
        self.load_errors.append((source, extension, message))
        for ext in self.extensions:
            if ext.name == extension:
                ext.errors.append(message)

    def problems(self) -> list[tuple[str, str | None, str]]:
        """(file, extension, message) of every script or callback that failed, for the Extensions tab and logs."""
        out = list(self.load_errors)
        for source, kind, message in self.callbacks.errors:
            ext = next((e.name for e in self.extensions if source.startswith(str(e.path))), None)
            out.append((source, ext, f"on_{kind}: {message}"))
        return out

    # -- tabs, requests ------------------------------------------------------------------------------------------
    def tab(self, is_img2img: bool) -> TabScripts:
        if not self._tabs:
            self.load()
        return self._tabs[bool(is_img2img)]

    def bind(self, is_img2img: bool, script_name: str | None = None, script_args: list | None = None,
             alwayson_scripts: dict | None = None) -> Selection:
        return self.tab(is_img2img).bind(script_name, script_args, alwayson_scripts)

    def scripts_list(self) -> dict[str, list[str]]:
        """/sdapi/v1/scripts: every script's lower-case title per tab (A1111 lists the always-on ones too)."""
        return {"txt2img": [e.title.lower() for e in self.tab(False).entries],
                "img2img": [e.title.lower() for e in self.tab(True).entries]}

    def script_info(self) -> list[dict]:
        return self.tab(False).info() + self.tab(True).info()


def run_with_scripts(p, selection: Selection | None):
    """Make the request `p` on the job worker: bind the always-on scripts' hooks, then run the picked script
    (`run(p, *args)`; None from it means "process as usual", as in A1111) or the processing loop itself."""
    from modules.generation import process_images
    if selection is None:
        return process_images(p)
    at, flat, bound = 1, [None], []
    if selection.script is not None:
        flat[0] = selection.script[0].title
    for entry, args in selection.alwayson:
        bound.append(BoundScript(entry.fresh(at, at + len(args)), args, entry.title))
        flat += args
        at += len(args)
    p.scripts = bound + list(p.scripts)
    if selection.script is None:
        p.script_args = flat
        return process_images(p)
    entry, args = selection.script
    script = entry.fresh(at, at + len(args))
    p.script_args = flat + list(args)
    with script_errors(entry.title, "run()"):
        result = script.run(p, *args)
    if result is None:
        from modules.processing import process_images as process_changed
        result = process_changed(p)
    return result


def _has_source(cls) -> bool:
    try:
        inspect.getsourcelines(cls)
        return True
    except (OSError, TypeError):
        return False
