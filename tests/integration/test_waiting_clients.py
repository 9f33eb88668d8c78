"""Many clients waiting for their jobs cost the server no threads: with 60 of them waiting on loopback,
/progress, /interrupt and the queue listing still answer at once, and every client gets its answer."""
from __future__ import annotations

import threading
import time

import requests

from tests.conftest import Server, copy_models

CLIENTS = 60
SMALL = {"width": 64, "height": 64, "steps": 2, "prompt": "a cat"}
# A liveness bound, not a speed target: a starved server does not answer until the long job below ends (it
# would take many minutes), a healthy one answers in milliseconds.
ANSWER_TIMEOUT = 30


def test_sixty_waiting_clients_do_not_starve_progress_and_interrupt(tiny_models, tmp_path):
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors"])
    server = Server(["--api", "--nowebui", "--models-dir", str(models)], tmp_path / "data", ready_path="/docs")
    base = server.url + "/sdapi/v1"
    answers: dict[str, int] = {}

    def client(task: str, body: dict) -> None:
        r = requests.post(base + "/txt2img", json={**body, "force_task_id": task}, timeout=600)
        answers[task] = r.status_code

    try:
        # one job that would run for minutes (150 steps x 100 images), then 59 more queued behind it
        long = threading.Thread(target=client, args=("long", {**SMALL, "steps": 150, "n_iter": 100}))
        long.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            state = requests.get(base + "/progress", params={"id_task": "long"}, timeout=ANSWER_TIMEOUT)
            if state.status_code == 200 and state.json()["state"]["sampling_step"] > 0:
                break
            time.sleep(0.1)
        waiting = [threading.Thread(target=client, args=(f"short-{i}", SMALL)) for i in range(CLIENTS - 1)]
        for t in waiting:
            t.start()
        internal = server.url + "/internal/pending-tasks"
        while time.time() < deadline:
            pending = requests.get(internal, timeout=ANSWER_TIMEOUT).json()
            if len(pending["tasks"]) == CLIENTS - 1:
                break
            time.sleep(0.1)
        assert len(pending["tasks"]) == CLIENTS - 1 and pending["running"]["id"] == "long"

        # with every client waiting, the control routes still answer
        progress = requests.get(base + "/progress", params={"id_task": "long"}, timeout=ANSWER_TIMEOUT)
        assert progress.status_code == 200 and 0 < progress.json()["progress"] < 1
        assert requests.get(base + "/samplers", timeout=ANSWER_TIMEOUT).status_code == 200
        r = requests.post(base + "/interrupt", params={"id_task": "short-0"}, timeout=ANSWER_TIMEOUT)
        assert r.status_code == 200  # a queued job: taken out of the queue
        r = requests.post(base + "/interrupt", params={"id_task": "long"}, timeout=ANSWER_TIMEOUT)
        assert r.status_code == 200

        long.join(120)
        for t in waiting:
            t.join(300)
        assert set(answers) == {"long"} | {f"short-{i}" for i in range(CLIENTS - 1)}
        assert set(answers.values()) == {200}, answers
        assert server.alive(), server.log()
    finally:
        server.stop()
