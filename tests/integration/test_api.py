"""The spine's API against a real server on 127.0.0.1 over the tiny models."""
from __future__ import annotations

import base64
import datetime
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import Server, copy_models
from tests.images import assert_pixels_close, mean_abs_difference

SMALL = {"width": 64, "height": 64, "steps": 3}


def b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def txt2img(api, **fields):
    r = api.post(api.base + "/txt2img", json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    return r, r.json()


def test_txt2img_answers_in_a1111_shape(api):
    r, body = txt2img(api, prompt="a red fox", negative_prompt="blurry", seed=42)
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])  # info is a JSON *string*, as A1111 sends it
    assert info["seed"] == 42 and info["all_seeds"] == [42]
    assert info["prompt"] == "a red fox" and info["negative_prompt"] == "blurry"
    assert info["sampler_name"] == "Euler"  # the API default, as in A1111
    assert info["sd_model_name"] and len(info["sd_model_hash"]) == 10
    assert info["task_id"] == r.headers["X-Task-Id"]
    assert body["parameters"]["prompt"] == "a red fox"
    image = b64_image(body["images"][0])
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert text.startswith("a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.0, Seed: 42,")
    assert "Size: 64x64" in text and f"Model hash: {info['sd_model_hash']}" in text


def test_same_seed_same_pixels_and_batches_count_seeds(api):
    _, a = txt2img(api, prompt="p", seed=10)
    _, b = txt2img(api, prompt="p", seed=10)
    assert a["images"][0] == b["images"][0]
    _, batch = txt2img(api, prompt="p", seed=10, batch_size=2, n_iter=2)
    info = json.loads(batch["info"])
    assert info["all_seeds"] == [10, 11, 12, 13]
    # A1111's API makes no grid unless save_images is on: 4 images answer 4 images
    assert len(batch["images"]) == 4 and info["index_of_first_image"] == 0
    assert {b64_image(im).size for im in batch["images"]} == {(64, 64)}
    # seed 10 in a batch is the seed-10 image (batched float maths may move a pixel by a level or two)
    diff = np.abs(np.asarray(b64_image(batch["images"][0]), int) - np.asarray(b64_image(a["images"][0]), int))
    assert diff.max() <= 3 and diff.mean() < 0.05


def test_grid_only_when_images_are_saved(api):
    """As A1111: save_images true makes (and saves) the grid, first in the answer (return_grid); n_iter=2 without
    it answers exactly 2 images, which is what clients such as webuiapi index into."""
    _, plain = txt2img(api, prompt="p", seed=20, n_iter=2)
    assert len(plain["images"]) == 2 and json.loads(plain["info"])["index_of_first_image"] == 0
    _, saved = txt2img(api, prompt="p", seed=20, n_iter=2, save_images=True)
    info = json.loads(saved["info"])
    assert len(saved["images"]) == 3 and info["index_of_first_image"] == 1
    assert b64_image(saved["images"][0]).size == (128, 64)  # the grid of two 64x64 images, side by side
    import webuiapi
    client = webuiapi.WebUIApi(baseurl=api.base)
    result = client.txt2img(prompt="p", seed=20, n_iter=2, width=64, height=64, steps=2)
    assert len(result.images) == 2 and result.info["all_seeds"] == [20, 21]


def test_sampler_names_and_legacy_names(api):
    names = [s["name"] for s in api.get(api.base + "/samplers").json()]
    for name in ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
                 "DDIM", "PLMS", "UniPC", "LCM"]:
        assert name in names
    schedulers = [s["label"] for s in api.get(api.base + "/schedulers").json()]
    assert {"Automatic", "Karras", "Exponential", "SGM Uniform"} <= set(schedulers)
    _, body = txt2img(api, prompt="p", seed=1, sampler_name="DPM++ 2M Karras")
    info = json.loads(body["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]


def test_the_api_saves_only_when_asked(api, api_server):
    today = datetime.date.today().isoformat()
    folder = api_server.data_dir / "outputs" / "txt2img-images" / today
    before = set(folder.glob("*.png")) if folder.exists() else set()
    txt2img(api, prompt="not saved", seed=3)
    assert (set(folder.glob("*.png")) if folder.exists() else set()) == before
    _, body = txt2img(api, prompt="a saved cat", seed=3, save_images=True)
    new = sorted(set(folder.glob("*.png")) - before)
    assert len(new) == 1 and new[0].name.endswith("-3-a saved cat.png")
    assert new[0].name[:5].isdigit()
    assert Image.open(new[0]).info["parameters"] == json.loads(body["info"])["infotexts"][0]


def test_override_settings_apply_to_one_request_only(api):
    _, a = txt2img(api, prompt="p", seed=4, override_settings={"CLIP_stop_at_last_layers": 2})
    assert "Clip skip: 2" in json.loads(a["info"])["infotexts"][0]
    _, b = txt2img(api, prompt="p", seed=4)
    assert "Clip skip" not in json.loads(b["info"])["infotexts"][0]
    assert a["images"][0] != b["images"][0]
    assert api.get(api.base + "/options").json()["CLIP_stop_at_last_layers"] == 1


def test_hires_fix_doubles_the_size(api):
    _, body = txt2img(api, prompt="p", seed=5, enable_hr=True, hr_scale=2, denoising_strength=0.5)
    image = b64_image(body["images"][0])
    assert image.size == (128, 128)
    assert "Hires upscale: 2.0, Hires upscaler: Latent" in image.info["parameters"]
    assert "Denoising strength: 0.5" in image.info["parameters"]


def test_a1111_smoke_payload_hires_with_denoising_zero(api):
    """A1111's own API smoke test: enable_hr with denoising_strength 0 answers 200 (the upscale alone)."""
    _, body = txt2img(api, prompt="p", seed=5, enable_hr=True, denoising_strength=0, hr_scale=2)
    text = json.loads(body["info"])["infotexts"][0]
    assert b64_image(body["images"][0]).size == (128, 128)
    from modules.core.infotext import parse_infotext
    params = parse_infotext(text)
    assert float(params["Denoising strength"]) == 0 and params["Hires pass"] == "upscale only"


def test_png_info_round_trip(api):
    _, body = txt2img(api, prompt="a castle, at night: (detailed)", seed=8)
    r = api.post(api.base + "/png-info", json={"image": body["images"][0]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["info"] == json.loads(body["info"])["infotexts"][0]
    assert out["parameters"]["Prompt"] == "a castle, at night: (detailed)"
    assert out["parameters"]["Seed"] == "8" or out["parameters"]["Seed"] == 8
    # a data: URI is accepted as well
    r = api.post(api.base + "/png-info", json={"image": "data:image/png;base64," + body["images"][0]})
    assert r.status_code == 200 and r.json()["info"] == out["info"]


@pytest.mark.parametrize("payload, status, words", [
    ({"steps": 0}, 422, "steps"),
    ({"width": 0}, 422, "width"),
    ({"width": 100000}, 422, "width"),
    ({"width": 65}, 422, "multiple of 8"),
    ({"batch_size": 10000}, 422, "batch_size"),
    ({"sampler_name": "No Such Sampler"}, 400, "sampler"),
    ({"override_settings": {"sd_model_checkpoint": "missing.safetensors"}}, 400, "not found"),
    ({"override_settings": {"no_such_option": 1}}, 400, "unknown setting"),
    ({"steps": "many"}, 422, "steps"),
])
def test_bad_requests_get_a_clear_4xx(api, payload, status, words):
    r = api.post(api.base + "/txt2img", json={**SMALL, **payload})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "detail", "body", "errors"}
    assert words.lower() in json.dumps(body).lower()


def test_malformed_bodies(api):
    r = api.post(api.base + "/txt2img", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = api.post(api.base + "/png-info", json={"image": "!!!not base64!!!"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = api.post(api.base + "/png-info", json={"image": base64.b64encode(b"plain text, not a picture").decode()})
    assert r.status_code == 422
    txt2img(api, prompt="still serving", seed=1)  # and the server keeps serving


def test_options_round_trip_and_validation(api, api_server):
    opts = api.get(api.base + "/options").json()
    assert opts["sd_model_checkpoint"].endswith("]")  # a title "name [hash]"
    r = api.post(api.base + "/options", json={"samples_format": "jpg", "show_progress_every_n_steps": 2})
    assert r.status_code == 200, r.text
    assert api.get(api.base + "/options").json()["samples_format"] == "jpg"
    saved = json.loads((api_server.data_dir / "config.json").read_text())
    assert saved["samples_format"] == "jpg"
    api.post(api.base + "/options", json={"samples_format": "png"})
    assert api.post(api.base + "/options", json={"no_such_option": 1}).status_code == 422
    assert api.post(api.base + "/options", json={"CLIP_stop_at_last_layers": "x"}).status_code == 422
    r = api.post(api.base + "/options", json={"outdir_samples": "/etc"})
    assert r.status_code == 422 and "server configuration" in r.json()["detail"]
    r = api.post(api.base + "/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 400


def test_sd_models_and_checkpoint_names(api):
    models = api.get(api.base + "/sd-models").json()
    names = {m["model_name"] for m in models}
    assert {"tiny-sd15", "tiny-sd15-inpainting", "tiny-sd15-diffusers"} <= names
    for m in models:
        assert m["title"] == f"{m['filename'].split('/')[-1] if False else m['title'].rsplit(' [', 1)[0]} [{m['hash']}]"
        assert len(m["hash"]) == 10 and len(m["sha256"]) == 64
    single = next(m for m in models if m["model_name"] == "tiny-sd15")
    for spelling in (single["title"], single["model_name"], "tiny-sd15.safetensors", single["hash"]):
        r = api.post(api.base + "/options", json={"sd_model_checkpoint": spelling})
        assert r.status_code == 200, (spelling, r.text)
        assert api.get(api.base + "/options").json()["sd_model_checkpoint"] == single["title"]


def test_inpainting_checkpoint_does_txt2img(api):
    _, body = txt2img(api, prompt="p", seed=2, override_settings={"sd_model_checkpoint": "tiny-sd15-inpainting"})
    info = json.loads(body["info"])
    assert info["sd_model_name"] == "tiny-sd15-inpainting" and info["is_using_inpainting_conditioning"]
    assert b64_image(body["images"][0]).size == (64, 64)


def test_memory_reports_loaded_models(api):
    txt2img(api, prompt="p", seed=1)
    mem = api.get(api.base + "/memory").json()
    assert mem["ram"]["total"] > 0 and "cuda" in mem
    [entry] = [m for m in mem["models"] if m["kind"] == "checkpoint" and "tiny-sd15.safetensors" in m["name"]]
    assert entry["bytes"] > 100_000 and entry["loads"] >= 1 and entry["device"] == "cpu"
    assert entry["last_used"] > time.time() - 3600


def test_progress_and_interrupt_a_long_job(api):
    result = {}

    def long_job():
        result["r"] = api.post(api.base + "/txt2img", json={**SMALL, "steps": 400, "n_iter": 3, "prompt": "long"})

    t = threading.Thread(target=long_job)
    t.start()
    deadline = time.time() + 60
    seen = None
    while time.time() < deadline:
        p = requests.get(api.base + "/progress").json()
        if p["state"]["sampling_step"] > 5:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "the job never reported progress"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 400
    assert seen["state"]["job_count"] == 3 and seen["eta_relative"] >= 0
    task = seen["current_task"]
    assert requests.post(api.base + "/interrupt").status_code == 200
    t.join(60)
    assert not t.is_alive()
    r = result["r"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert json.loads(body["info"])["task_id"] == task
    assert len(body["images"]) == 1  # interrupted in the first of 3 iterations: its partial image only
    assert api.get(api.base + "/progress", params={"id_task": "no-such-task"}).status_code == 404


def test_refresh_finds_new_checkpoints_and_switching_loads_each_once(tiny_models, tmp_path):
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "styles.csv").write_text(
        'name,prompt,negative_prompt\nOil,"{prompt}, oil painting",lowres\nMood,moody light,\n')
    server = Server(["--api", "--models-dir", str(models)], tmp_path / "data")
    try:
        base = server.url + "/sdapi/v1"
        assert [m["model_name"] for m in requests.get(base + "/sd-models").json()] == ["tiny-sd15"]
        shutil.copy2(tiny_models / "Stable-diffusion" / "tiny-sd15-inpainting.safetensors",
                     models / "Stable-diffusion" / "b.safetensors")
        assert requests.post(base + "/refresh-checkpoints").status_code == 200
        assert {m["model_name"] for m in requests.get(base + "/sd-models").json()} == {"tiny-sd15", "b"}
        for name in ["tiny-sd15", "b", "tiny-sd15"]:
            r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "p",
                                                      "override_settings": {"sd_model_checkpoint": name}})
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["info"])["sd_model_name"] == name
        loads = {m["name"]: m["loads"] for m in requests.get(base + "/memory").json()["models"]}
        assert sorted(loads.values()) == [1, 1], loads  # A -> B -> A: each loaded from disk once

        # styles from styles.csv: "{prompt}" is replaced, otherwise appended after ", "
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "a cat", "negative_prompt": "blurry",
                                                  "styles": ["Oil", "Mood"]})
        info = json.loads(r.json()["info"])
        assert info["prompt"] == "a cat, oil painting, moody light"
        assert info["negative_prompt"] == "blurry, lowres" and info["styles"] == ["Oil", "Mood"]
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "a cat", "styles": ["Nope"]})
        assert r.status_code == 400 and "Nope" in r.json()["detail"]

        # a broken checkpoint: a clear 4xx, and the worker goes on serving
        (models / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
        requests.post(base + "/refresh-checkpoints")
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "p",
                                                  "override_settings": {"sd_model_checkpoint": "broken"}})
        assert 400 <= r.status_code < 500 and "broken" in r.text.lower(), r.text
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "p"})
        assert r.status_code == 200 and server.alive()
    finally:
        server.stop()


def test_api_auth_protects_sdapi(tiny_models, tmp_path):
    server = Server(["--api", "--nowebui", "--api-auth", "alice:secret", "--models-dir", str(tiny_models)],
                    tmp_path / "data", ready_path="/docs")
    try:
        base = server.url + "/sdapi/v1"
        assert requests.get(base + "/sd-models").status_code == 401
        assert requests.get(base + "/sd-models", auth=("alice", "wrong")).status_code == 401
        assert requests.get(base + "/sd-models", auth=("alice", "secret")).status_code == 200
        assert server.port != 7860
    finally:
        server.stop()


def test_no_checkpoint_starts_and_says_where_to_put_one(tmp_path):
    server = Server(["--api", "--models-dir", str(tmp_path / "empty")], tmp_path / "data")
    try:
        base = server.url + "/sdapi/v1"
        assert requests.get(base + "/sd-models").json() == []
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "p"})
        assert r.status_code in (400, 422) and "Stable-diffusion" in r.json()["detail"]
        assert "No checkpoint found" in server.log()
        assert requests.get(server.url + "/").status_code == 200  # the UI still starts
    finally:
        server.stop()


def test_webuiapi_client_works_unchanged(api_server):
    import webuiapi
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api_server.port)
    result = client.txt2img(prompt="a cat", seed=11, steps=3, width=64, height=64, sampler_name="Euler a")
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [11]
    assert "Euler a" in [s["name"] for s in client.get_samplers()]


def test_an_image_made_from_its_infotext_is_that_image(api):
    """The settings an infotext carries (Clip skip, ENSD, eta) apply to the request it fills: replaying the
    text alone gives the picture it describes."""
    overrides = {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337, "eta_ancestral": 0.5}
    _, first = txt2img(api, prompt="a lighthouse", seed=77, sampler_name="Euler a", override_settings=overrides)
    text = json.loads(first["info"])["infotexts"][0]
    for words in ("Clip skip: 2", "ENSD: 31337", "Eta: 0.5"):
        assert words in text, text
    r = api.post(api.base + "/txt2img", json={"infotext": text})
    assert r.status_code == 200, r.text
    again = r.json()
    assert json.loads(again["info"])["infotexts"][0] == text
    assert_pixels_close(b64_image(again["images"][0]), b64_image(first["images"][0]))
    # and the settings mattered: the same request without them is another picture
    _, plain = txt2img(api, prompt="a lighthouse", seed=77, sampler_name="Euler a")
    assert mean_abs_difference(b64_image(plain["images"][0]), b64_image(first["images"][0])) > 1
    assert api.get(api.base + "/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing was kept


@pytest.mark.parametrize("sampler, key, value, infotext_key", [
    ("DDIM", "eta_ddim", 0.8, "Eta DDIM"), ("Euler a", "eta_ancestral", 0.0, "Eta")])
def test_eta_settings_change_the_sampler(api, sampler, key, value, infotext_key):
    _, base = txt2img(api, prompt="p", seed=31, sampler_name=sampler, steps=4)
    _, changed = txt2img(api, prompt="p", seed=31, sampler_name=sampler, steps=4, override_settings={key: value})
    assert infotext_key + ":" not in json.loads(base["info"])["infotexts"][0]
    assert f"{infotext_key}: {value}" in json.loads(changed["info"])["infotexts"][0]
    assert mean_abs_difference(b64_image(base["images"][0]), b64_image(changed["images"][0])) > 1
    # the request's own eta wins over the setting
    _, own = txt2img(api, prompt="p", seed=31, sampler_name=sampler, steps=4, eta=value)
    assert_pixels_close(b64_image(own["images"][0]), b64_image(changed["images"][0]))


def test_eta_a_sampler_cannot_take_is_reported(api):
    _, body = txt2img(api, prompt="p", seed=3, sampler_name="DPM2 a", eta=0.3)
    assert any("eta 0.3 is not available for DPM2 a" in w for w in json.loads(body["info"])["warnings"])


def test_an_unloadable_default_checkpoint_is_skipped_with_a_notice(tiny_models, tmp_path):
    """A refused .ckpt that sorts first never becomes everyone's checkpoint: with none chosen, requests use the
    next one that loads and say which file was skipped and why; choosing the bad one is a clear 400."""
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors"])
    (models / "Stable-diffusion" / "aaa-evil.ckpt").write_bytes(
        b"\x80\x02cbuiltins\nexec\nq\x00X\x0b\x00\x00\x00print(1+1)q\x01\x85q\x02Rq\x03.")
    server = Server(["--api", "--nowebui", "--models-dir", str(models)], tmp_path / "data", ready_path="/docs")
    try:
        base = server.url + "/sdapi/v1"
        r = requests.post(base + "/txt2img", json={**SMALL, "prompt": "a cat", "seed": 1})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == "tiny-sd15"
        assert any("skipped checkpoint aaa-evil.ckpt" in w and "refused" in w for w in info["warnings"]), info
        # the skip is remembered: later requests go straight to the good one, without the warning
        again = json.loads(requests.post(base + "/txt2img", json={**SMALL, "seed": 2}).json()["info"])
        assert again["sd_model_name"] == "tiny-sd15" and not again["warnings"]
        assert requests.get(base + "/options").json()["sd_model_checkpoint"].startswith("tiny-sd15.safetensors")
        # chosen explicitly, it is an error naming why
        r = requests.post(base + "/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "aaa-evil"}})
        assert r.status_code == 400 and "refused" in r.json()["detail"], r.text
        config = server.data_dir / "config.json"
        assert not config.exists() or json.loads(config.read_text()).get("sd_model_checkpoint", "") == ""
    finally:
        server.stop()


@pytest.mark.parametrize("field, value", [("restore_faces", True), ("tiling", True),
                                          ("refiner_checkpoint", "some-refiner"), ("hr_checkpoint_name", "other")])
def test_features_this_studio_lacks_are_refused_by_name(api, field, value):
    r = api.post(api.base + "/txt2img", json={**SMALL, field: value})
    assert r.status_code == 400 and field in r.json()["detail"] and "not available" in r.json()["detail"]
    assert api.post(api.base + "/txt2img", json={**SMALL, field: None}).status_code == 200
