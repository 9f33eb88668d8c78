"""Training through the API of a real server: a run is the training CLI in a child process; its LoRA is listed at
once and changes txt2img; runs belong to their user; bad input is a 400 before anything starts, a second run a
409; Stop leaves a resumable state and Resume finishes the run; generation waits for the run with a visible
reason, and the inference models come back afterwards without a reload from disk."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import Server
from tests.integration.test_training import make_dataset

ALICE = ("alice", "secret")
BOB = ("bob", "pw")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("train-api-data")
    s = Server(["--api", "--api-auth", "alice:secret", "--gradio-auth", "bob:pw", "--models-dir", str(tiny_models),
                "--device", "cpu"], data)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train-api-set"))


def api(server, method, path, auth=ALICE, **kw):
    return requests.request(method, server.url + "/sdapi/v1" + path, auth=auth, timeout=120, **kw)


def lora_body(dataset, name, **extra):
    return {"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": str(dataset), "output_name": name,
            "resolution": 64, "max_train_steps": 3, "learning_rate": 0.01, **extra}


def wait_state(server, run_id, states=("done", "stopped", "failed"), timeout=300, auth=ALICE):
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = api(server, "GET", f"/train/{run_id}", auth=auth).json()
        if snap["state"] in states:
            return snap
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {snap['state']}: {snap}")


def image(server, prompt, auth=ALICE):
    r = api(server, "POST", "/txt2img", auth=auth, json={"prompt": prompt, "steps": 3, "width": 64, "height": 64, "seed": 7,
                                              "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))).astype(int)


def test_an_api_run_makes_a_lora_that_txt2img_uses(server, dataset):
    r = api(server, "POST", "/train/lora", json=lora_body(dataset, "api-cube"))
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["state"] in ("queued", "starting", "running") and run["total_steps"] == 3
    snap = wait_state(server, run["id"])
    assert snap["state"] == "done", snap
    assert snap["step"] == 3 and len(snap["losses"]) == 3 and snap["it_s"] > 0
    assert snap["outputs"][-1].endswith("api-cube.safetensors")
    assert any(run["id"] == x["id"] for x in api(server, "GET", "/train").json())
    loras = [x["name"] for x in api(server, "GET", "/loras").json()]
    assert "api-cube" in loras  # listed at once, no refresh needed
    base = image(server, "sks cube")
    assert np.abs(image(server, "sks cube <lora:api-cube:1>") - base).max() > 3
    assert np.abs(image(server, "sks cube <lora:api-cube:0>") - base).max() <= 1


def test_runs_belong_to_their_user(server):
    runs = api(server, "GET", "/train").json()
    assert runs, "the first test's run is listed for alice"
    run_id = runs[0]["id"]
    assert api(server, "GET", "/train", auth=BOB).json() == []
    assert api(server, "GET", f"/train/{run_id}", auth=BOB).status_code == 404
    assert api(server, "POST", f"/train/{run_id}/stop", auth=BOB).status_code == 404


@pytest.mark.parametrize("body, status, text", [
    ({"train_data_dir": "/no/such/folder"}, 400, "does not exist"),
    ({"pretrained_model_name_or_path": "nope"}, 400, "not found"),
    ({"max_train_steps": 0}, 400, "max_train_steps"),
    ({"network_dim": 0}, 400, "network_dim"),
    ({"learning_rate": -1}, 400, "learning_rate"),
    ({"output_name": "a/b"}, 400, "output_name"),
    ({"train_batch_size": 99}, 400, "larger than the dataset"),
    ({"not_an_option": 1}, 400, "unknown options"),
    ({"run_dir": "/tmp/x"}, 400, "set by the server"),
])
def test_bad_input_is_a_400_naming_it(server, dataset, body, status, text):
    r = api(server, "POST", "/train/lora", json={**lora_body(dataset, "bad"), **body})
    assert r.status_code == status, r.text
    assert text in r.json()["detail"]


def test_an_unknown_method_is_a_400(server, dataset):
    r = api(server, "POST", "/train/hypernetwork", json=lora_body(dataset, "x"))
    assert r.status_code == 400 and "unknown training method" in r.json()["detail"]


def test_a_dataset_preview_shows_buckets_and_steps(server, dataset):
    r = api(server, "POST", "/train-preview/lora", json=lora_body(dataset, "p", max_train_epochs=2,
                                                                  max_train_steps=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dataset"]["images"] == 3 and body["dataset"]["repeats_total"] == 6
    assert body["total_steps"] == 12 and len(body["items"]) == 3
    assert body["items"][0]["bucket"] == [64, 64] and body["items"][0]["caption_source"] == "file"


def test_stop_keeps_a_state_resume_finishes_and_generation_waits_meanwhile(server, dataset):
    # a warm checkpoint first, so its load count can be compared after the run
    image(server, "warm")
    loads = {m["name"]: m["loads"] for m in api(server, "GET", "/memory").json()["models"]}
    r = api(server, "POST", "/train/lora", json=lora_body(dataset, "api-long", max_train_steps=400))
    assert r.status_code == 200, r.text
    run_id = r.json()["id"]
    deadline = time.time() + 120
    while api(server, "GET", f"/train/{run_id}").json()["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    second = api(server, "POST", "/train/lora", json=lora_body(dataset, "api-second"))
    assert second.status_code == 409 and "one run at a time" in second.json()["detail"]
    # another user's txt2img request waits behind the run, and /progress says why
    result = {}
    t = threading.Thread(target=lambda: result.update(img=image(server, "during", auth=BOB)))
    t.start()
    deadline = time.time() + 60
    text = ""
    while "GPU, step" not in text:
        assert time.time() < deadline, text
        text = api(server, "GET", "/progress", auth=BOB).json().get("textinfo") or ""
        time.sleep(0.2)
    assert f"waiting: training run {run_id} is using the GPU, step" in text
    assert t.is_alive()  # still waiting
    stopped = api(server, "POST", f"/train/{run_id}/stop")
    assert stopped.status_code == 200
    snap = wait_state(server, run_id)
    assert snap["state"] == "stopped" and snap["states"], snap
    t.join(120)
    assert "img" in result
    after = {m["name"]: m["loads"] for m in api(server, "GET", "/memory").json()["models"]}
    assert after == loads  # the checkpoint came back without a reload from disk
    stopped_at = snap["step"]
    r = api(server, "POST", f"/train/{run_id}/resume", json={"max_train_steps": stopped_at + 2})
    assert r.status_code == 200, r.text
    done = wait_state(server, r.json()["id"])
    assert done["state"] == "done", done
    assert done["step"] == stopped_at + 2 and [p["step"] for p in done["losses"]] == [stopped_at + 1,
                                                                                       stopped_at + 2]
