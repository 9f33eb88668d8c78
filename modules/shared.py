"""A1111's `modules.shared` for extensions: `opts`, `cmd_opts`, `state`, `OptionInfo`, `options_section`.

These are views, not a second set of globals: `opts` reads the server's settings (`modules.core.options`), and
inside a running request it reads that request's own settings (its override_settings applied) and writes go
to that request only; `state` is the running job of the calling thread (its interrupt/skip flags and
progress), so a script can neither see nor change another user's request. `cmd_opts` is the parsed command
line, extension flags (from their preload.py) included. Out of reach here: `sd_model` internals, `sd_hijack`,
`shared.sd_model.forward` patching (the studio runs diffusers pipelines, not A1111's LDM model).
"""
from __future__ import annotations

import argparse
import contextlib
import threading
from typing import Any

from modules.core.options import OptionError, OptionSpec

cmd_opts = argparse.Namespace()
sd_model = None  # A1111's loaded LDM model: not available (diffusers pipelines run here)
_local = threading.local()
_server: dict[str, Any] = {"options": None, "upscalers": None, "lists": {}}


class OptionInfo:
    """A1111's declaration of a setting an extension adds (`shared.opts.add_option(key, OptionInfo(...))`)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component = default, label, component
        self.component_args = component_args
        self.onchange, self.section, self.refresh = onchange, section, refresh
        self.comment_before, self.comment_after = comment_before, comment_after
        self.infotext, self.restrict_api, self.category_id = infotext, restrict_api, category_id
        self.do_not_save = False

    def info(self, info: str) -> "OptionInfo":
        self.comment_after += f" ({info})"
        return self

    def html(self, html: str) -> "OptionInfo":
        self.comment_after += html
        return self

    def link(self, label: str, url: str) -> "OptionInfo":
        self.comment_before += f"[{label}]({url})"
        return self

    def needs_restart(self) -> "OptionInfo":
        self.comment_after += " (requires restart)"
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        self.comment_after += " (requires Reload UI)"
        return self

    def spec(self) -> OptionSpec:
        """The studio's setting for it: type from the default, range and choices from the component's args."""
        default = self.default
        kind = type(default) if isinstance(default, (bool, int, float, str, list)) else str
        args = self.component_args() if callable(self.component_args) else (self.component_args or {})
        choices = args.get("choices") if isinstance(args, dict) else None
        if choices is not None and not callable(choices):
            choices = tuple(c[1] if isinstance(c, (tuple, list)) and len(c) == 2 else c for c in choices)
        section = self.section[1] if isinstance(self.section, tuple) and len(self.section) > 1 else \
            (self.section or "Extensions")
        label = self.label + self.comment_after if self.comment_after else self.label
        return OptionSpec(default if kind is not str or isinstance(default, str) else "", label or "", section,
                          kind, args.get("minimum") if isinstance(args, dict) and kind in (int, float) else None,
                          args.get("maximum") if isinstance(args, dict) and kind in (int, float) else None,
                          choices if kind is not list else None)


def options_section(section_identifier, options_dict: dict) -> dict:
    for value in options_dict.values():
        value.section = section_identifier
    return options_dict


class _Opts:
    """`shared.opts`: attribute reads of settings, `add_option`, `set`, `data`, `onchange`."""

    def _options(self):
        options = _server["options"]
        if options is None:
            raise RuntimeError("shared.opts is used before the server set up its settings")
        return options

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        scope = getattr(_local, "settings", None)
        if scope is not None and key in scope:
            return scope[key]
        try:
            return self._options().get(key)
        except KeyError:
            raise AttributeError(f"no setting {key!r}") from None

    def __setattr__(self, key: str, value) -> None:
        self.set(key, value)

    def set(self, key: str, value, is_api: bool = False, run_callbacks: bool = True) -> bool:
        scope = getattr(_local, "settings", None)
        if scope is not None:  # inside a request: that request's settings only
            scope[key] = value
            return True
        try:
            self._options().update({key: value})
        except OptionError:
            return False
        return True

    def get_default(self, key: str):
        spec = self._options().specs.get(key)
        return spec.default if spec else None

    @property
    def data(self) -> dict:
        scope = getattr(_local, "settings", None)
        return dict(scope) if scope is not None else self._options().snapshot()

    @property
    def data_labels(self) -> dict:
        return dict(self._options().specs)

    def add_option(self, key: str, info: OptionInfo) -> None:
        """An extension's setting, shown in Settings under its section and saved in config.json."""
        self._options().add_spec(key, info.spec())

    def onchange(self, key: str, func, call: bool = True) -> None:
        options = self._options()
        options.add_listener(lambda changed: func() if key in changed else None)
        if call:
            func()

    def save(self, filename: str | None = None) -> None:
        self._options().save()


class _State:
    """`shared.state`: the calling thread's running job (A1111's job state), or an idle state outside one."""

    def _job(self):
        return getattr(_local, "job", None)

    def __getattr__(self, key: str):
        job = self._job()
        defaults = {"interrupted": False, "skipped": False, "job_count": 0, "job_no": 0, "sampling_step": 0,
                    "sampling_steps": 0, "textinfo": "", "job": "", "current_image": None, "processing_has_refined_job_count": False}
        if key in ("interrupted", "skipped", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo",
                   "current_image"):
            return getattr(job, key) if job is not None else defaults[key]
        if key in defaults:
            return defaults[key]
        raise AttributeError(key)

    def __setattr__(self, key: str, value) -> None:
        job = self._job()
        if job is not None and key in ("job_count", "job_no", "textinfo", "sampling_step", "sampling_steps"):
            setattr(job, key, value)

    def interrupt(self) -> None:
        job = self._job()
        if job is not None:
            job.interrupt()

    def skip(self) -> None:
        job = self._job()
        if job is not None:
            job.skip()

    def begin(self, job: str = "(unknown)") -> None: ...
    def end(self) -> None: ...

    def nextjob(self) -> None:
        job = self._job()
        if job is not None:
            job.job_no += 1

    def set_current_image(self) -> None: ...


opts = _Opts()
state = _State()


def upscaler_names() -> list[str]:
    """The upscalers by A1111 name (A1111's `shared.sd_upscalers`, as names): PIL ones and model files."""
    from modules.core import upscaling
    ups = _server["upscalers"]
    return list(ups().names()) if ups is not None else list(upscaling.UPSCALERS)


def names_of(kind: str) -> list[str]:
    """The server's names of `kind` ("checkpoints", "vaes", "styles") for a script's dropdowns; [] unbound."""
    fn = _server["lists"].get(kind)
    return list(fn()) if fn is not None else []


def bind(options, args, upscalers=None, lists: dict | None = None) -> None:
    """Point `opts` at the server's settings and `cmd_opts` at its command line (done once at start-up);
    `upscalers()` gives the server's upscalers, `lists[kind]()` its checkpoint, VAE and style names."""
    _server["options"] = options
    _server["upscalers"] = upscalers
    _server["lists"] = dict(lists or {})
    cmd_opts.__dict__.clear()
    cmd_opts.__dict__.update(vars(args) if args is not None else {})


@contextlib.contextmanager
def request_scope(settings: dict, job=None):
    """For the with-block on this thread, `opts` reads and writes `settings` (a request's own copy) and `state`
    is `job`."""
    before = getattr(_local, "settings", None), getattr(_local, "job", None)
    _local.settings, _local.job = settings, job
    try:
        yield
    finally:
        _local.settings, _local.job = before
