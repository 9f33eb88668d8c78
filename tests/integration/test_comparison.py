"""The model comparison report over checkpoints of several families (SD 1.x, SD 2.x 768-v, FLUX): its files, its
table (seconds per image, peak memory, load time, prompt alignment), images equal to plain txt2img requests,
alignment scores in Image search's embedding space, the Script dropdown entry, and bad input as a 422."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.images import assert_pixels_close

CHECKPOINTS = ["tiny-sd15.safetensors", "tiny-sd2-v.safetensors", "tiny-flux-diffusers"]
PROMPTS = ["a red house", "a cat on a chair"]
COMMON = {"steps": 2, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler_name": "Euler"}


def b64png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a_report_over_three_families(api):
    body = {"checkpoints": CHECKPOINTS, "prompts": PROMPTS, "seeds": [1, 2], **COMMON,
            "cfg_scale_per_checkpoint": {"tiny-flux-diffusers": 1.0}}
    r = api.post(api.base + "/model-comparison", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    folder = Path(report["folder"])
    assert folder.parent.name == "comparisons" and Path(report["html"]).is_file() and Path(report["csv"]).is_file()
    rows = list(csv.DictReader(io.StringIO(Path(report["csv"]).read_text(encoding="utf-8"))))
    assert len(rows) == len(report["rows"]) == 3 * 2 * 2
    assert [r["family"] for r in rows[::4]] == ["sd1", "sd2", "flux"]
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["peak_memory_mb"] > 0 and row["load_seconds"] >= 0
        assert -1.0 <= row["alignment"] <= 1.0
        assert (folder / row["image"]).is_file()
    assert report["alignment_model"] == "tiny-blip2-itm"
    assert [s["checkpoint"] for s in report["summary"]] == CHECKPOINTS
    assert all(s["images"] == 4 and s["alignment"] is not None for s in report["summary"])

    # one grid per prompt: a column per checkpoint, a row per seed, legends around them
    assert len(report["grids"]) == 2
    with Image.open(report["grids"][0]) as grid:
        assert grid.width > 3 * 64 and grid.height > 2 * 64
    page = Path(report["html"]).read_text(encoding="utf-8")
    assert all(name in page for name in CHECKPOINTS) and "grid-00.png" in page and "seconds_per_image" in page

    # each image is the plain txt2img request with the same settings
    row = next(r for r in report["rows"] if r["checkpoint"] == "tiny-sd2-v.safetensors" and r["seed"] == 2
               and r["prompt_index"] == 1)
    plain = api.post(api.base + "/txt2img", json={"prompt": PROMPTS[1], "seed": 2, **COMMON,
                                                  "override_settings": {"sd_model_checkpoint": row["checkpoint"]}})
    assert plain.status_code == 200, plain.text
    made = Image.open(folder / row["image"]).convert("RGB")
    assert_pixels_close(made, Image.open(io.BytesIO(base64.b64decode(plain.json()["images"][0]))).convert("RGB"))
    flux = next(r for r in report["rows"] if r["family"] == "flux")
    assert "CFG scale: 1.0" in Image.open(folder / flux["image"]).info["parameters"]

    # the alignment score is the image and its prompt compared in Image search's space
    image = api.post(api.base + "/embeddings/image", json={"images": [b64png(folder / row["image"])]}).json()
    text = api.post(api.base + "/embeddings/text", json={"texts": [row["prompt"]]}).json()
    expected = float((np.asarray(image["embeddings"][0]) @ np.asarray(text["embeddings"][0])).max())
    assert abs(row["alignment"] - expected) < 1e-4


def test_the_script_dropdown_entry_writes_the_same_report(api):
    r = api.get(api.base + "/scripts").json()
    assert "model comparison" in r["txt2img"] and "model comparison" not in r["img2img"]
    out = api.post(api.base + "/txt2img", json={"prompt": "a blue sky", "seed": 4, **COMMON,
                                                "script_name": "Model comparison",
                                                "script_args": [["tiny-sd15", "tiny-sdxl"], "", "", False, True]})
    assert out.status_code == 200, out.text
    body = out.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 1  # one prompt: one grid
    report = info["comparison"]
    assert [s["checkpoint"] for s in report["summary"]] == ["tiny-sd15.safetensors", "tiny-sdxl.safetensors"]
    assert all(s["alignment"] is None for s in report["summary"])  # scoring was turned off
    assert Path(report["html"]).is_file()
    rows = list(csv.DictReader(io.StringIO(Path(report["csv"]).read_text(encoding="utf-8"))))
    assert {r["seed"] for r in rows} == {"4"} and {r["prompt"] for r in rows} == {"a blue sky"}


def test_bad_comparisons_are_refused_before_any_work(api):
    r = api.post(api.base + "/model-comparison", json={"checkpoints": ["nope"], "prompts": ["x"]})
    assert r.status_code == 422 and "checkpoint 'nope' not found" in r.text
    r = api.post(api.base + "/model-comparison", json={"checkpoints": ["tiny-sd15"], "prompts": [" "]})
    assert r.status_code == 422 and "prompts is empty" in r.text
    r = api.post(api.base + "/model-comparison", json={"checkpoints": ["tiny-sd15"], "prompts": ["x"],
                                                       "width": 70})
    assert r.status_code == 422 and "multiple of 8" in r.text
    r = api.post(api.base + "/model-comparison", json={"checkpoints": ["tiny-sd15"], "prompts": ["x"],
                                                       "seeds": [-1]})
    assert r.status_code == 422 and "fixed numbers" in r.text
