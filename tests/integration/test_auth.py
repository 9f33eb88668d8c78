"""One auth layer over API, UI, progress, file and queue routes; jobs that belong to their caller; CORS; --api-log."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import requests

from tests.conftest import Server

SMALL = {"width": 64, "height": 64, "steps": 3}
ALICE = ("alice", "secret")  # --api-auth user
BOB = ("bob", "pw")  # --gradio-auth user
ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def auth_server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("auth-data")
    server = Server(["--api", "--api-auth", "alice:secret", "--gradio-auth", "bob:pw", "--api-log",
                     "--cors-allow-origins", ORIGIN, "--models-dir", str(tiny_models)], data)
    yield server
    server.stop()


def ui_login(server, user, password) -> requests.Session:
    s = requests.Session()
    r = s.post(server.url + "/login", data={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return s


@pytest.mark.parametrize("method, path", [
    ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/txt2img"),
    ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/cmd-flags"),
    ("GET", "/internal/pending-tasks"), ("POST", "/internal/progress"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ("GET", "/gradio_api/info"), ("GET", "/config"), ("POST", "/gradio_api/queue/join"),
    ("GET", "/gradio_api/queue/data?session_hash=x"), ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/heartbeat/x"), ("GET", "/gradio_api/file=webui.py"),
])
def test_every_route_needs_a_login(auth_server, method, path):
    r = requests.request(method, auth_server.url + path, json={}, timeout=10)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])
    if path.startswith(("/sdapi", "/internal", "/docs", "/openapi")):
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert set(r.json()) == {"error", "detail", "body", "errors"}
    r = requests.request(method, auth_server.url + path, json={}, auth=("alice", "wrong"), timeout=10)
    assert r.status_code == 401


def test_the_login_page_itself_is_public(auth_server):
    r = requests.get(auth_server.url + "/")
    assert r.status_code == 200 and "auth_required" in r.text  # Gradio's login form, not the app
    assert "txt2img_prompt" not in r.text


@pytest.mark.parametrize("creds", [ALICE, BOB])
def test_both_credential_sets_work_everywhere(auth_server, creds):
    base = auth_server.url
    assert requests.get(base + "/sdapi/v1/sd-models", auth=creds).status_code == 200
    assert requests.get(base + "/openapi.json", auth=creds).status_code == 200
    # HTTP Basic on the UI's own routes
    r = requests.get(base + "/config", auth=creds)
    assert r.status_code == 200 and r.json()["username"] == creds[0]
    # the UI's login form, and its cookie on the API routes
    s = ui_login(auth_server, *creds)
    assert s.get(base + "/config").json()["username"] == creds[0]
    assert s.get(base + "/sdapi/v1/options").status_code == 200
    assert s.get(base + "/internal/pending-tasks").status_code == 200
    assert requests.post(base + "/login", data={"username": creds[0], "password": "nope"}).status_code == 400


def test_files_outside_outputs_are_not_served(auth_server):
    s = ui_login(auth_server, *BOB)
    for target in ["webui.py", str(auth_server.data_dir / "config.json"), "/etc/passwd"]:
        r = s.get(auth_server.url + "/gradio_api/file=" + target)
        assert r.status_code in (403, 404), (target, r.status_code)


def test_cmd_flags_never_show_secrets(auth_server):
    flags = requests.get(auth_server.url + "/sdapi/v1/cmd-flags", auth=ALICE).json()
    assert flags["api"] is True and flags["api_log"] is True
    assert flags["api_auth"] == "********" and flags["gradio_auth"] == "********"
    assert "secret" not in json.dumps(flags) and "bob:pw" not in json.dumps(flags)


def test_cors_only_for_the_allowed_origin(auth_server):
    url = auth_server.url + "/sdapi/v1/sd-models"
    r = requests.get(url, auth=ALICE, headers={"Origin": ORIGIN})
    assert r.headers.get("access-control-allow-origin") == ORIGIN
    r = requests.get(url, auth=ALICE, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = requests.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN


def test_api_log_lines(auth_server):
    requests.get(auth_server.url + "/sdapi/v1/samplers", auth=ALICE)
    requests.get(auth_server.url + "/sdapi/v1/samplers")
    deadline = time.time() + 5
    while time.time() < deadline and "GET /sdapi/v1/samplers 401" not in auth_server.log():
        time.sleep(0.1)
    log = auth_server.log()
    assert "API GET /sdapi/v1/samplers 200 client=127.0.0.1:" in log
    assert "API GET /sdapi/v1/samplers 401 client=127.0.0.1:" in log
    line = next(x for x in log.splitlines() if "API GET /sdapi/v1/samplers 200" in x)
    assert line.rstrip().endswith("s") and float(line.rsplit(" ", 1)[1][:-1]) >= 0


def _start_long_job(base, creds, result, key, **fields):
    def run():
        result[key] = requests.post(base + "/sdapi/v1/txt2img", auth=creds,
                                    json={**SMALL, "steps": 300, "prompt": key, **fields})
    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_running(base, creds, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = requests.get(base + "/sdapi/v1/progress", auth=creds).json()
        if p["state"]["sampling_step"] > 2:
            return p
        time.sleep(0.05)
    raise AssertionError("the job never reported progress")


def test_jobs_belong_to_their_caller(auth_server):
    base = auth_server.url
    result = {}
    ta = _start_long_job(base, ALICE, result, "alice-job")
    seen = _wait_running(base, ALICE)
    task = seen["current_task"]
    tb = _start_long_job(base, BOB, result, "bob-job", steps=3)  # queued behind alice's job
    time.sleep(0.5)
    # bob sees neither alice's progress nor her task, and cannot stop it
    bob_view = requests.get(base + "/sdapi/v1/progress", auth=BOB).json()
    assert bob_view["current_task"] != task
    assert requests.get(base + "/sdapi/v1/progress", params={"id_task": task}, auth=BOB).status_code == 404
    assert requests.post(base + "/sdapi/v1/interrupt", params={"id_task": task}, auth=BOB).status_code == 404
    pending = requests.get(base + "/internal/pending-tasks", auth=BOB).json()
    assert pending["running"]["mine"] is False and pending["running"]["id"] is None
    [mine] = [t for t in pending["tasks"] if t["mine"]]
    assert mine["id"] and mine["position"] == 0
    # a plain interrupt from bob stops bob's own (queued) job only
    assert requests.post(base + "/sdapi/v1/interrupt", auth=BOB).status_code == 200
    tb.join(30)
    assert not tb.is_alive()
    assert requests.get(base + "/sdapi/v1/progress", params={"id_task": task}, auth=ALICE).json()[
        "state"]["sampling_step"] > 0
    # the same login through the UI's cookie sees alice's job
    s = ui_login(auth_server, *ALICE)
    assert s.get(base + "/sdapi/v1/progress").json()["current_task"] == task
    internal = s.post(base + "/internal/progress", json={"id_task": task}).json()
    assert internal["active"] is True and 0 < internal["progress"] < 1
    assert requests.post(base + "/sdapi/v1/interrupt", auth=ALICE).status_code == 200
    ta.join(60)
    assert not ta.is_alive()
    a = result["alice-job"]
    assert a.status_code == 200 and json.loads(a.json()["info"])["task_id"] == task and len(a.json()["images"]) == 1
    b = result["bob-job"]
    assert b.status_code == 200 and b.json()["images"] == []  # cancelled before it started
    # after both: each finishes jobs as its own user
    r = requests.post(base + "/sdapi/v1/txt2img", auth=BOB, json={**SMALL, "prompt": "after"})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_listen_without_credentials_warns(tmp_path, caplog):
    import webui
    from modules.core import cmd_args
    args = cmd_args.parse_args(["--nowebui", "--listen", "--data-dir", str(tmp_path), "--models-dir", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="webui"):
        app, web = webui.create_app(args)
    web.queue.shutdown()
    assert any("without --gradio-auth or --api-auth" in r.getMessage() for r in caplog.records)
    caplog.clear()
    args = cmd_args.parse_args(["--nowebui", "--listen", "--api-auth", "a:b", "--data-dir", str(tmp_path),
                                "--models-dir", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="webui"):
        app, web = webui.create_app(args)
    web.queue.shutdown()
    assert not any("without --gradio-auth" in r.getMessage() for r in caplog.records)
