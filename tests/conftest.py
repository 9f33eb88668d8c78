"""Shared fixtures: the tiny model set (made once per run) and real servers on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models/ folder holding the project's tiny random-weight models (made by its own maker)."""
    from modules.demo import tiny_models as maker
    root = tmp_path_factory.mktemp("tiny-models")
    maker.make_tiny_models(root)
    return root


class Server:
    """A real `webui.py` process on 127.0.0.1; its log is kept for failure messages."""

    def __init__(self, args: list[str], data_dir: Path, env: dict | None = None, ready_path: str = "/"):
        self.port = free_port()
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        full_env = dict(os.environ, **(env or {}))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "webui.py"), "--port", str(self.port), "--data-dir", str(data_dir), *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        try:
            self.ready_seconds = self._wait_ready(ready_path)
        except BaseException:  # a server that never became ready must not outlive the test that started it
            self.stop()
            raise

    def _wait_ready(self, path: str, timeout: float = 120) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = requests.get(self.url + path, timeout=2)
                if r.status_code < 500:
                    return time.perf_counter() - self.started
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or too busy to answer in 2 s
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def api_server(tiny_models, tmp_path_factory):
    """The server most integration and browser tests share: UI + API over the tiny models."""
    data = tmp_path_factory.mktemp("data")
    server = Server(["--api", "--models-dir", str(tiny_models)], data)
    yield server
    server.stop()


@pytest.fixture
def api(api_server):
    """A requests session against the shared server's API, checking the server survives each test."""
    s = requests.Session()
    s.base = api_server.url + "/sdapi/v1"
    yield s
    assert api_server.alive(), api_server.log()


def copy_models(tiny_models: Path, dest: Path, names: list[str]) -> Path:
    (dest / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    for name in names:
        src = tiny_models / "Stable-diffusion" / name
        if src.is_dir():
            shutil.copytree(src, dest / "Stable-diffusion" / name)
        else:
            shutil.copy2(src, dest / "Stable-diffusion" / name)
    return dest
