"""The captioner trainer and the retrieval embeddings over the API of a real server: `POST /train/captioner` runs the
CLI in a child process, its evaluations are in the run's snapshot, and the captioner it makes is listed by
/captioners and captions through /interrogate at once; bad input is a 400 before anything starts;
`/embeddings/image` and `/embeddings/text` equal plain transformers' Blip2ForImageTextRetrieval."""
from __future__ import annotations

import shutil
import time

import pytest
import requests
import torch

from tests.conftest import Server, copy_models
from tests.integration.test_captioner_training import make_captioned
from tests.integration.test_captioning import b64, noise_image


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    root = copy_models(tiny_models, tmp_path_factory.mktemp("cap-api-models"), ["tiny-sd15.safetensors"])
    for sub in ("BLIP2", "BLIP"):
        shutil.copytree(tiny_models / sub, root / sub)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    s = Server(["--api", "--models-dir", str(models), "--device", "cpu"], tmp_path_factory.mktemp("cap-api-data"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned(tmp_path_factory.mktemp("cap-api-set"))


def api(server, method, path, **kw):
    return requests.request(method, server.url + "/sdapi/v1" + path, timeout=120, **kw)


def body(data, name, **extra):
    return {"base": "tiny-blip", "train_data_dir": str(data), "val_data_dir": str(data / "2_things"),
            "output_name": name, "max_train_steps": 6, "learning_rate": 0.005, **extra}


def wait_done(server, run_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = api(server, "GET", f"/train/{run_id}").json()
        if snap["state"] in ("done", "stopped", "failed"):
            return snap
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {snap['state']}")


def test_a_captioner_run_is_listed_and_captions_at_once(server, data):
    preview = api(server, "POST", "/train-preview/captioner", json=body(data, "api-cap"))
    assert preview.status_code == 200, preview.text
    assert preview.json()["val_images"] == 4 and preview.json()["total_steps"] == 6
    r = api(server, "POST", "/train/captioner", json=body(data, "api-cap"))
    assert r.status_code == 200, r.text
    snap = wait_done(server, r.json()["id"])
    assert snap["state"] == "done", snap
    assert snap["method"] == "captioner" and snap["step"] == 6 and len(snap["losses"]) == 6
    assert [e["tag"] for e in snap["evals"]] == ["before", "final"]
    assert all({"BLEU-4", "ROUGE-L", "CIDEr"} <= set(e) for e in snap["evals"])
    assert len(snap["examples"]) == 4 and {"reference", "before", "now"} <= set(snap["examples"][0])
    assert snap["outputs"][-1].endswith("BLIP/api-cap")
    listed = {c["name"]: c for c in api(server, "GET", "/captioners").json()}
    assert listed["api-cap"]["kind"] == "blip" and listed["api-cap"]["trained_from"] == "tiny-blip"
    caption = api(server, "POST", "/interrogate", json={"image": b64(noise_image(3)), "model": "api-cap",
                                                         "num_beams": 2, "min_length": 1, "max_length": 8})
    assert caption.status_code == 200, caption.text
    assert caption.json()["caption"]


@pytest.mark.parametrize("change, text", [
    ({"train_data_dir": "UNCAPTIONED", "val_data_dir": ""}, "no caption files"),
    ({"base": "tiny-blip2-itm"}, "not a captioner"),
    ({"base": "tiny-sd15"}, "is not a captioner"),
    ({"memory_budget_mb": 0.1}, "too large for the memory budget"),
    ({"val_data_dir": "", "val_split": 0.9, "train_data_dir": "ONE"}, "leaving none to train on"),
    ({"sample_prompts": "x.txt"}, "not options of a captioner run"),
    ({"base": "tiny-blip", "pretrained_model_name_or_path": "tiny-blip2"}, "name the same option"),
])
def test_bad_input_is_a_400_naming_it(server, data, tmp_path, change, text):
    make_captioned(tmp_path / "uncaptioned", captions=[None])
    make_captioned(tmp_path / "one", folder="", captions=["one image"])
    values = {**body(data, "bad"), **change}
    values = {k: {"UNCAPTIONED": str(tmp_path / "uncaptioned"), "ONE": str(tmp_path / "one")}.get(v, v)
              if isinstance(v, str) else v for k, v in values.items()}
    r = api(server, "POST", "/train/captioner", json=values)
    assert r.status_code == 400, r.text
    assert text in r.json()["detail"]


def plain_retrieval(models):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval
    path = models / "BLIP2" / "tiny-blip2-itm"
    return Blip2ForImageTextRetrieval.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_embeddings_equal_plain_blip2_image_text_retrieval(server, models):
    images = [noise_image(11), noise_image(12, (32, 48))]
    texts = ["a red cat", "a city at night by the sea"]
    r = api(server, "POST", "/embeddings/image", json={"images": [b64(i) for i in images]})
    assert r.status_code == 200, r.text
    got_images = r.json()
    assert got_images["model"] == "tiny-blip2-itm" and got_images["kind"] == "image"
    assert got_images["shape"] == [2, 4, 16]
    r = api(server, "POST", "/embeddings/text", json={"texts": texts, "model": "tiny-blip2-itm"})
    assert r.status_code == 200, r.text
    got_texts = r.json()
    assert got_texts["shape"] == [2, 16]
    model, processor = plain_retrieval(models)
    with torch.no_grad():
        for n, text in enumerate(texts):
            inputs = processor(images=images, text=[text] * 2, return_tensors="pt", padding=True)
            out = model(**inputs, use_image_text_matching_head=False)
            assert torch.allclose(torch.tensor(got_texts["embeddings"][n]), out.text_embeds[0], atol=1e-5)
            assert torch.allclose(torch.tensor(got_images["embeddings"]), out.image_embeds, atol=1e-5)
    # the similarity the search ranks by: the best query token's dot product
    scores = torch.tensor(got_images["embeddings"]) @ torch.tensor(got_texts["embeddings"][0])
    assert scores.shape == (2, 4)


@pytest.mark.parametrize("path, payload, status, text", [
    ("/embeddings/image", {"images": []}, 422, "images is empty"),
    ("/embeddings/image", {"images": ["not base64!"]}, 422, "images[0]"),
    ("/embeddings/image", {"images": ["IMAGE"], "model": "tiny-blip2"}, 422, "retrieval model"),
    ("/embeddings/image", {"images": ["IMAGE"], "model": "nope"}, 404, "not found"),
    ("/embeddings/text", {"texts": []}, 422, "texts is empty"),
    ("/embeddings/text", {"texts": ["ok", "  "]}, 422, "a text is empty"),
])
def test_embeddings_bad_input(server, path, payload, status, text):
    if payload.get("images") == ["IMAGE"]:
        payload = {**payload, "images": [b64(noise_image(1))]}
    r = api(server, "POST", path, json=payload)
    assert r.status_code == status, r.text
    assert text in r.json()["detail"]
