"""Property-based run of schemathesis over the server's own OpenAPI schema: no generated request may get a 5xx.

Generation requests stay cheap through the server's own limits (settings api_max_steps/api_max_size/
api_max_images, written to config.json before start), so every case that is valid really runs.
Routes with side effects on the process are left out: server-stop/restart/kill answer 403 without
--api-server-stop anyway. No route may answer a 5xx (ALLOWED_5XX is empty).
"""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import Server

EXAMPLES_PER_OPERATION = 25
# the routes with the most fields and work behind them get more cases
EXAMPLES_FOR = {"/sdapi/v1/txt2img": 80, "/sdapi/v1/img2img": 40, "/sdapi/v1/extra-single-image": 40,
                "/sdapi/v1/extra-batch-images": 40, "/sdapi/v1/png-info": 30, "/sdapi/v1/options": 40}
ALLOWED_5XX: dict = {}


@pytest.fixture(scope="module")
def fuzz_server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz-data")
    (data / "config.json").write_text(json.dumps({"api_max_steps": 2, "api_max_size": 64, "api_max_images": 2,
                                                  "queue_max_pending": 20}))
    server = Server(["--api", "--nowebui", "--models-dir", str(tiny_models)], data, ready_path="/docs")
    yield server
    server.stop()


def test_no_generated_request_gets_a_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    statuses: Counter = Counter()
    failures: list[str] = []
    cases = 0
    operations = []
    started = time.perf_counter()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/sdapi/v1/server-"):
            continue
        operations.append(f"{operation.method.upper()} {operation.path}")

        @settings(max_examples=EXAMPLES_FOR.get(operation.path, EXAMPLES_PER_OPERATION), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal cases
            cases += 1
            response = case.call(base_url=fuzz_server.url, session=session, timeout=60)
            statuses[response.status_code] += 1
            allowed = ALLOWED_5XX.get((operation.method.upper(), operation.path))
            if response.status_code >= 500 and response.status_code != allowed:
                failures.append(f"{operation.method.upper()} {operation.path} -> {response.status_code}: "
                                f"{response.text[:300]} (body {str(case.body)[:300]})")
            elif response.status_code >= 400:
                body = response.json()  # every error in A1111's shape
                assert set(body) >= {"error", "detail"}, (operation.path, response.text)

        run()
    elapsed = time.perf_counter() - started
    print(f"\nschemathesis: {cases} generated cases over {len(operations)} operations "
          f"in {elapsed:.0f} s, "
          f"{len(failures)} failed; statuses {dict(sorted(statuses.items()))}")
    assert fuzz_server.alive(), fuzz_server.log()
    assert not failures, "\n".join(failures[:20])
    assert cases >= 300
    # and the worker still serves real work afterwards
    r = requests.post(fuzz_server.url + "/sdapi/v1/txt2img", json={"width": 64, "height": 64, "steps": 2})
    assert r.status_code == 200, r.text
