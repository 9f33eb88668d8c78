"""The shipped example extension loads through the script host (disabled by default, enabled by config.json),
and its parts register: an always-on script, on_image_saved, on_ui_settings and on_ui_tabs; its preload flag parses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from modules.core import cmd_args
from modules.core import extensions as ext_mod
from modules.scripting.host import ScriptHost

REPO = Path(__file__).resolve().parents[2]


def _data_dir(tmp_path, disabled=None) -> Path:
    data = tmp_path / "data"
    shutil.copytree(REPO / "extensions" / "example-extension", data / "extensions" / "example-extension")
    if disabled is not None:
        (data / "config.json").write_text(json.dumps({"disabled_extensions": disabled}))
    return data


def test_the_example_extension_is_off_until_enabled(tmp_path):
    data = _data_dir(tmp_path)
    ext = ext_mod.discover(data, *ext_mod.disabled_in_config(data / "config.json")[:1])[0]
    assert ext.name == "example-extension" and not ext.enabled and "Extensions tab" in ext.why_disabled


def test_the_example_extension_loads_its_script_callbacks_and_flag(tmp_path):
    data = _data_dir(tmp_path, disabled=[])
    args = cmd_args.parse_args(["--data-dir", str(data), "--example-greeting", "Hi"], environ={})
    assert args.example_greeting == "Hi" and args.preload_errors == []
    host = ScriptHost(data, data / "config.json", args, script_dirs=[]).load()
    assert not host.problems(), host.problems()
    tab = host.tab(False)
    assert [e.title for e in tab.alwayson] == ["Example note"] and tab.alwayson[0].extension == "example-extension"
    for kind in ("image_saved", "ui_settings", "ui_tabs"):
        assert host.callbacks.count(kind) == 1, kind
    selection = host.bind(False, None, None, {"example note": {"args": [True, "hello"]}})
    assert selection.alwayson[0][1] == [True, "hello"]
    assert host.extensions[0].metadata["name"] == "example-extension"
