"""Server start-up against its floor: a minimal Gradio Blocks app mounted on FastAPI under uvicorn, in the same
environment, timed the same way (process start to the first HTTP 200 on "/").

    python benchmarks/startup.py [--rounds 5]

Runs the two alternately so drift hits both, and prints each round, the medians and their ratio (target: at
most 1.5). Both start with Python's bytecode cache on (the first, uncounted round writes it), as installed
environments have it. The studio's own log (benchmarks/.out/startup/studio.log) says where its time went.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, REPO, scratch  # noqa: E402  (sys.path, offline settings, git-ignored output)

BARE_APP = """
import sys
import gradio as gr
import uvicorn
from fastapi import FastAPI

app = FastAPI()
with gr.Blocks() as demo:
    box = gr.Textbox(label="Prompt")
    out = gr.Textbox(label="Echo")
    gr.Button("Go").click(lambda s: s, inputs=box, outputs=out)
app = gr.mount_gradio_app(app, demo, path="/", ssr_mode=False)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The environment both servers start in, with Python's bytecode cache on as in any installed environment:
    with PYTHONDONTWRITEBYTECODE set (some sandboxes and containers set it) every start compiles every module
    from source again, which costs the studio (more of its own modules) more than the bare app."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def time_to_ready(command: list[str], port: int, log: Path) -> float:
    import requests
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited early; see {log}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except requests.ConnectionError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", type=Path, default=MODELS)

    args = ap.parse_args()
    from modules.demo import tiny_models
    tiny_models.make_tiny_models(args.models)
    out = scratch("startup")
    bare_script = out / "bare_gradio_app.py"
    bare_script.write_text(BARE_APP, encoding="utf-8")
    times: dict[str, list[float]] = {"bare Gradio app": [], "studio (UI + API)": []}
    for i in range(args.rounds + 1):  # the first round warms the OS file cache for both; it is not counted
        for name in times:
            port = free_port()
            if name.startswith("bare"):
                command = [sys.executable, str(bare_script), str(port)]
            else:
                command = [sys.executable, str(REPO / "webui.py"), "--api", "--port", str(port),
                           "--data-dir", str(out / "data"), "--models-dir", str(args.models)]
            seconds = time_to_ready(command, port, out / f"{name.split()[0]}.log")
            if i:
                times[name].append(seconds)
                print(f"round {i}: {name:18s} ready in {seconds:.2f} s", flush=True)
    bare, studio = (statistics.median(v) for v in times.values())
    print(f"median: bare Gradio app {bare:.2f} s, studio {studio:.2f} s, ratio {studio / bare:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
