"""notebooks/studio.ipynb runs top to bottom (nbclient, a real python3 kernel) on the tiny models
(STUDIO_NOTEBOOK_MODELS=tiny) in a temporary folder, and shows what a person would see: images with their
infotexts, a caption folder, a live loss plot, a LoRA file that the last txt2img used (`Lora hashes`), and a
web UI that answered on 127.0.0.1 and was stopped again. The notebook in git carries no outputs."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "studio.ipynb"


def _cell(nb, tag: str):
    found = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"one cell tagged {tag!r} expected, found {len(found)}"
    return found[0]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _mimes(cell) -> list[str]:
    return [m for out in cell.get("outputs", []) for m in out.get("data", {})]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_the_notebook_in_git_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_on_the_tiny_models(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    work = tmp_path / "work"
    for key, value in {"STUDIO_NOTEBOOK_MODELS": "tiny", "STUDIO_NOTEBOOK_WORK": str(work), "STUDIO_REPO": str(REPO),
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                       "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("STUDIO_DATASET", raising=False)
    monkeypatch.delenv("STUDIO_CHECKPOINT", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError naming the cell when one fails
    finally:
        pid_file = work / "webui.pid"
        if pid_file.is_file():  # whatever happened, nothing the notebook started outlives the test
            pid = int(pid_file.read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the notebook left webui.py (process {pid}) running")
    took = time.perf_counter() - started
    print(f"notebook ran in {took:.0f} s")
    (tmp_path / "executed.ipynb").write_text(json.dumps(nb), encoding="utf-8")

    errors = [out for c in nb.cells for out in c.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    setup = _text(_cell(nb, "setup"))
    assert "tiny random-weight models" in setup and str(REPO) in setup
    assert "nothing to download" in _text(_cell(nb, "download"))

    txt2img = _cell(nb, "txt2img")
    assert _mimes(txt2img).count("image/png") == 2, "the txt2img cell shows its two images"
    assert "Steps: 4, Sampler: Euler a" in _text(txt2img) and "Seed: 1234" in _text(txt2img)
    assert list((work / "outputs" / "txt2img-images").rglob("*.png")), "txt2img saved its images"
    img2img = _cell(nb, "img2img")
    assert "image/png" in _mimes(img2img) and "Denoising strength: 0.6" in _text(img2img)

    captions = sorted((work / "dataset").rglob("*.txt"))
    assert len(captions) == 4 and all(c.read_text().startswith("sks cube, ") for c in captions)
    caption = _cell(nb, "caption")
    assert "Captioned 4" in _text(caption) and "sks cube, " in _text(caption)
    assert "image/png" in _mimes(caption), "the caption cell shows the pictures"

    train = _cell(nb, "train")
    svgs = [out["data"]["image/svg+xml"] for out in train.get("outputs", []) if "image/svg+xml" in out.get("data", {})]
    assert svgs, "the training cell shows a loss plot"
    svg = "".join(svgs[-1]) if isinstance(svgs[-1], list) else svgs[-1]
    assert svg.count("<polyline") == 2 and "step 16/16" in svg, svg[:300]
    assert (work / "runs" / "sks-cube" / "loss.svg").is_file()
    events = [json.loads(x) for x in (work / "runs" / "sks-cube" / "progress.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 17))
    lora = work / "tiny-models" / "Lora" / "sks-cube.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0

    use = _cell(nb, "use-lora")
    assert _mimes(use).count("image/png") == 2
    last_infotext = _text(use).split("<lora:sks-cube:1>")[-1]
    assert 'Lora hashes: "sks-cube: ' in last_infotext, _text(use)
    assert "warning:" not in _text(use)

    webui = _text(_cell(nb, "webui"))
    assert "web UI: http://127.0.0.1:" in webui and "listening on every interface" not in webui
    assert "--listen" not in webui and "--server-name" not in webui, "the CI run binds 127.0.0.1 only"
    assert "sks-cube" in webui.split("LoRAs:")[-1], webui
    assert "web UI stopped" in _text(_cell(nb, "stop-webui"))
    assert not _alive(int((work / "webui.pid").read_text()))
