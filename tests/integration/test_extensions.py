"""Extensions written against A1111's surface, on a real server: preload flags, callbacks (app started, image
saved, model loaded), an always-on script over the API with its args, per-request `shared.opts`, the A1111
names of the processing object, a failing callback that is reported and skipped, --disable-all-extensions; and
the git side of the Extensions tab (clone into a temporary folder, the install plan, install.py only when run)."""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import requests

from modules.core import extensions as ext_mod
from modules.ui.extensions import install_allowed
from tests.conftest import Server

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}

PRELOAD = '''
def preload(parser):
    parser.add_argument("--probe-word", default="none")
'''
PROBE = '''
import json
from pathlib import Path
import gradio as gr
from fastapi.responses import JSONResponse
from modules import script_callbacks, scripts, shared

HERE = Path(scripts.basedir())
events = []

class Probe(scripts.Script):
    def title(self):
        return "Probe"
    def show(self, is_img2img):
        return scripts.AlwaysVisible
    def ui(self, is_img2img):
        return [gr.Checkbox(label="On", value=False), gr.Textbox(label="Tag", value="default-tag")]
    def process(self, p, on, tag):
        if on:
            p.extra_generation_params["Probe tag"] = tag
            p.extra_generation_params["Probe opts"] = shared.opts.probe_text
            p.extra_generation_params["Probe seeds"] = len(p.all_seeds)
            shared.opts.probe_text = "changed inside one request"
    def postprocess(self, p, processed, on, tag):
        if on:
            events.append(("postprocess", len(processed.images)))

def on_settings():
    shared.opts.add_option("probe_text", shared.OptionInfo("from the default", "Probe text"))

def on_started(demo, app):
    @app.get("/probe/state")
    def state():
        return JSONResponse({"word": shared.cmd_opts.probe_word, "events": events,
                             "basedir": str(HERE), "opts": shared.opts.probe_text})

def before_saved(params):
    params.pnginfo["parameters"] += ", Probe saved: yes"

def saved(params):
    events.append(("saved", Path(params.filename).suffix))

def loaded(bundle):
    events.append(("model", type(bundle).__name__))

def broken(params):
    raise RuntimeError("this callback always fails")

script_callbacks.on_ui_settings(on_settings)
script_callbacks.on_app_started(on_started)
script_callbacks.on_before_image_saved(before_saved)
script_callbacks.on_image_saved(broken)
script_callbacks.on_image_saved(saved)
script_callbacks.on_model_loaded(loaded)
'''


@pytest.fixture(scope="module")
def ext_server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("ext-data")
    folder = data / "extensions" / "probe"
    (folder / "scripts").mkdir(parents=True)
    (folder / "preload.py").write_text(textwrap.dedent(PRELOAD))
    (folder / "scripts" / "probe.py").write_text(textwrap.dedent(PROBE))
    server = Server(["--api", "--nowebui", "--models-dir", str(tiny_models), "--probe-word", "hello"], data,
                    ready_path="/sdapi/v1/options")
    yield server
    server.stop()


def test_an_a1111_extension_runs_unchanged(ext_server):
    base = ext_server.url + "/sdapi/v1"
    state = requests.get(ext_server.url + "/probe/state").json()
    assert state["word"] == "hello"  # its preload.py flag, parsed with the rest of the command line
    assert state["basedir"].endswith("extensions/probe")
    assert "probe" in [s for s in requests.get(base + "/scripts").json()["txt2img"]]
    assert {"name": "probe", "enabled": True}.items() <= requests.get(base + "/extensions").json()[0].items()

    body = {**SMALL, "save_images": True, "alwayson_scripts": {"Probe": {"args": [True, "my-tag"]}},
            "batch_size": 2, "override_settings": {"probe_text": "for this request"},
            "override_settings_restore_afterwards": True}
    r = requests.post(base + "/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    text = info["infotexts"][0]
    assert "Probe tag: my-tag" in text and "Probe opts: for this request" in text and "Probe seeds: 2" in text
    # the hook's write to shared.opts changed that request's settings only
    assert requests.get(base + "/options").json()["probe_text"] == "from the default"
    again = requests.post(base + "/txt2img", json={**SMALL, "alwayson_scripts": {"probe": {"args": [True]}}})
    assert "Probe opts: from the default" in json.loads(again.json()["info"])["infotexts"][0]
    assert "Probe tag: default-tag" in json.loads(again.json()["info"])["infotexts"][0]  # its UI default
    # callbacks: the saved file carries what on_before_image_saved added; the failing one did not stop the rest
    state = requests.get(ext_server.url + "/probe/state").json()
    kinds = [e[0] for e in state["events"]]
    assert kinds.count("saved") >= 2 and "model" in kinds and ["postprocess", 3] in state["events"]  # 2 images and their grid
    saved = sorted((ext_server.data_dir / "outputs" / "txt2img-images").rglob("*.png"))
    from PIL import Image
    assert "Probe saved: yes" in Image.open(saved[-1]).info["parameters"]
    log = ext_server.log()
    assert "this callback always fails" in log and "probe.py" in log
    assert ext_server.alive()


def test_disable_all_extensions_loads_none(tiny_models, tmp_path):
    data = tmp_path / "data"
    folder = data / "extensions" / "probe" / "scripts"
    folder.mkdir(parents=True)
    (folder / "probe.py").write_text(textwrap.dedent(PROBE))
    srv = Server(["--api", "--nowebui", "--models-dir", str(tiny_models), "--disable-all-extensions"], data,
                 ready_path="/sdapi/v1/options")
    try:
        base = srv.url + "/sdapi/v1"
        assert "probe" not in requests.get(base + "/scripts").json()["txt2img"]
        assert requests.get(base + "/extensions").json()[0]["enabled"] is False
        assert requests.get(srv.url + "/probe/state").status_code == 404
    finally:
        srv.stop()


# -- the git side ------------------------------------------------------------------------------------------

def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


def test_install_from_a_git_url_shows_install_py_and_runs_it_only_when_asked(tmp_path):
    source = tmp_path / "upstream" / "sd-probe"
    (source / "scripts").mkdir(parents=True)
    (source / "scripts" / "probe.py").write_text("from modules import scripts\n")
    (source / "install.py").write_text("from pathlib import Path\nPath('installed.txt').write_text('ok')\n")
    _git("init", "-q", "-b", "main", cwd=source)
    _git("add", ".", cwd=source)
    _git("commit", "-q", "-m", "first", cwd=source)
    root = tmp_path / "data" / "extensions"
    path = ext_mod.clone(f"file://{source}", root)
    assert path == root / "sd-probe" and (path / "scripts" / "probe.py").is_file()
    ext = ext_mod.Extension(path.name, path, False)
    assert "installed.txt" in ext_mod.install_plan(ext)
    assert not (path / "installed.txt").exists()  # cloning never runs it
    ext_mod.run_install(ext)
    assert (path / "installed.txt").read_text() == "ok"
    assert ext.version()["commit"] and ext_mod.check_for_update(ext) == "latest"
    with pytest.raises(ext_mod.ExtensionError, match="already installed"):
        ext_mod.clone(f"file://{source}", root)
    with pytest.raises(ext_mod.ExtensionError, match="not a git URL"):
        ext_mod.clone("rm -rf /", root)
    with pytest.raises(ext_mod.ExtensionError, match="git clone failed"):
        ext_mod.clone(f"file://{tmp_path}/nothing-here", root)
    assert sorted(p.name for p in root.iterdir()) == ["sd-probe"]  # a failed clone leaves nothing behind


def test_install_is_allowed_only_on_loopback_or_with_the_insecure_flag():
    from modules.core import cmd_args
    assert install_allowed(cmd_args.parse_args([], environ={}))
    assert not install_allowed(cmd_args.parse_args(["--listen"], environ={}))
    assert not install_allowed(cmd_args.parse_args(["--server-name", "192.168.1.5"], environ={}))
    assert install_allowed(cmd_args.parse_args(["--listen", "--enable-insecure-extension-access"], environ={}))
