"""Every A1111 route over raw HTTP, the webuiapi client, request fields, images in, and the error statuses."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import Server
from tests.images import gradient

SMALL = {"width": 64, "height": 64, "steps": 3}


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


@pytest.mark.parametrize("path, check", [
    ("/upscalers", lambda v: [u["name"] for u in v] == ["None", "Lanczos", "Nearest", "tiny-esrgan-4x",
                                                        "tiny-realesrgan-x2"]),
    ("/latent-upscale-modes", lambda v: {"Latent", "Latent (nearest-exact)"} <= {m["name"] for m in v}),
    ("/sd-vae", lambda v: [x["model_name"] for x in v] == ["tiny-flux-ae.safetensors", "tiny-vae.safetensors"]),
    ("/prompt-styles", lambda v: isinstance(v, list)),
    ("/scripts", lambda v: "x/y/z plot" in v["txt2img"] and {"sd upscale", "outpainting mk2"} <= set(v["img2img"])),
    ("/script-info", lambda v: {"x/y/z plot", "prompt matrix", "loopback"} <= {s["name"] for s in v}),
    ("/extensions", lambda v: v == []),
    ("/face-restorers", lambda v: v == []),
    ("/realesrgan-models", lambda v: [m["name"] for m in v] == ["tiny-realesrgan-x2"]),
    ("/hypernetworks", lambda v: v == []),
    ("/samplers", lambda v: "Euler" in [s["name"] for s in v]),
    ("/schedulers", lambda v: "Karras" in [s["label"] for s in v]),
    ("/sd-models", lambda v: len(v) >= 1),
    ("/options", lambda v: "sd_model_checkpoint" in v and "queue_max_pending" in v),
    ("/cmd-flags", lambda v: v["api"] is True and v["api_auth"] is None),
    ("/progress", lambda v: "state" in v and "progress" in v),
    ("/memory", lambda v: "ram" in v),
])
def test_every_list_route(api, path, check):
    r = api.get(api.base + path)
    assert r.status_code == 200, r.text
    assert check(r.json()), r.json()


@pytest.mark.parametrize("path", ["/refresh-checkpoints", "/refresh-vae", "/unload-checkpoint",
                                  "/reload-checkpoint", "/interrupt", "/skip"])
def test_every_action_route(api, path):
    r = api.post(api.base + path)
    assert r.status_code == 200, r.text


def test_server_stop_needs_its_flag(api):
    for path in ["/server-stop", "/server-restart", "/server-kill"]:
        r = api.post(api.base + path)
        assert r.status_code == 403 and "--api-server-stop" in r.json()["detail"]


def test_sd_vae_lists_the_vae_folder(tiny_models, tmp_path):
    vae = tmp_path / "models" / "VAE"
    vae.mkdir(parents=True)
    (vae / "my-vae.safetensors").write_bytes(b"x")
    (vae / "notes.txt").write_text("not a vae")
    server = Server(["--api", "--nowebui", "--models-dir", str(tmp_path / "models"), "--api-server-stop"],
                    tmp_path / "data", ready_path="/docs")
    try:
        base = server.url + "/sdapi/v1"
        assert [v["model_name"] for v in requests.get(base + "/sd-vae").json()] == ["my-vae.safetensors"]
        r = requests.post(base + "/server-stop")
        assert r.status_code == 200 and r.json() == {"message": "stopping"}
        server.proc.wait(20)
        assert server.proc.returncode == 0
    finally:
        server.stop()


def test_extras_single_image_matches_plain_pil(api):
    src = gradient()
    for name, resample in [("Lanczos", Image.Resampling.LANCZOS), ("Nearest", Image.Resampling.NEAREST)]:
        r = api.post(api.base + "/extra-single-image",
                     json={"image": png_b64(src), "upscaler_1": name, "upscaling_resize": 2})
        assert r.status_code == 200, r.text
        out = b64_image(r.json()["image"])
        assert out.size == (80, 48)
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(src.resize((80, 48), resample=resample)))
    # "resize to" with crop: scaled by the larger ratio, centred on a canvas of exactly that size
    r = api.post(api.base + "/extra-single-image",
                 json={"image": "data:image/png;base64," + png_b64(src), "upscaler_1": "Nearest", "resize_mode": 1,
                       "upscaling_resize_w": 80, "upscaling_resize_h": 80, "upscaling_crop": True})
    assert r.status_code == 200 and b64_image(r.json()["image"]).size == (80, 80)
    # upscaler "None": A1111 leaves the image as it is
    r = api.post(api.base + "/extra-single-image", json={"image": png_b64(src), "upscaler_1": "None"})
    assert b64_image(r.json()["image"]).size == src.size


def test_extras_batch_and_errors(api):
    src = gradient()
    r = api.post(api.base + "/extra-batch-images",
                 json={"imageList": [{"data": png_b64(src), "name": "a.png"}, {"data": png_b64(src.rotate(90, expand=True)),
                                                                             "name": "b.png"}],
                       "upscaler_1": "Lanczos", "upscaling_resize": 2, "upscaler_2": "Nearest",
                       "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    assert [b64_image(x).size for x in r.json()["images"]] == [(80, 48), (48, 80)]
    blended = np.asarray(b64_image(r.json()["images"][0]).convert("RGB"), float)
    expected = Image.blend(src.resize((80, 48), Image.Resampling.LANCZOS), src.resize((80, 48), Image.Resampling.NEAREST), 0.5)
    assert np.abs(blended - np.asarray(expected, float)).max() <= 1
    bad = [({"upscaler_1": "R-ESRGAN 4x+"}, 400, "unknown upscaler"),
           ({"upscaler_1": "Lanczos", "upscaling_resize": 500}, 422, "upscaling_resize"),
           ({"gfpgan_visibility": 0.5}, 400, "face restorers"),
           ({"image": "%%%"}, 422, "image")]
    for fields, status, words in bad:
        r = api.post(api.base + "/extra-single-image", json={"image": png_b64(src), **fields})
        assert r.status_code == status and words in r.json()["detail"], r.text


def test_img2img_runs_and_validates(api):
    src = png_b64(gradient(64, 64))
    r = api.post(api.base + "/img2img", json={**SMALL, "init_images": [src], "denoising_strength": 0.5,
                                             "mask": src, "inpainting_fill": 1, "resize_mode": 1})
    assert r.status_code == 200, r.text
    assert b64_image(r.json()["images"][0]).size == (64, 64)
    r = api.post(api.base + "/img2img", json={"init_images": ["not an image"]})
    assert r.status_code == 422 and "init_images[0]" in r.json()["detail"]
    r = api.post(api.base + "/img2img", json={"init_images": [src], "sampler_name": "Nope"})
    assert r.status_code == 400
    r = api.post(api.base + "/img2img", json={"init_images": [src], "script_name": "no such script"})
    assert r.status_code == 400 and "unknown script" in r.json()["detail"]


@pytest.mark.parametrize("fields, status, words", [
    ({"script_name": "Hypernetwork merger", "script_args": [1, 2]}, 400, "unknown script"),
    ({"script_name": "X/Y/Z plot", "script_args": ["Steps", "1, x"]}, 422, "X/Y/Z plot: Steps"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, 400, "unknown alwayson script"),
    ({"alwayson_scripts": {"ControlNet": "on"}}, 422, "alwayson_scripts"),
    ({"script_args": "not a list"}, 422, "script_args"),
    ({"styles": ["No such style"]}, 400, "No such style"),
    ({"sampler_index": "Nope"}, 400, "sampler"),
    ({"override_settings": {"outdir_samples": "/tmp"}}, 400, "server configuration"),
    ({"override_settings": {"api_max_steps": 0}}, 400, "server configuration"),
    ({"enable_hr": True, "width": 0, "hr_resize_x": 64}, 422, "width"),
])
def test_request_field_errors(api, fields, status, words):
    r = api.post(api.base + "/txt2img", json={**SMALL, **fields})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()


def test_request_fields(api):
    # script_name None / empty alwayson_scripts are what clients send by default
    r = api.post(api.base + "/txt2img", json={**SMALL, "seed": 5, "script_name": None, "alwayson_scripts": {},
                                             "send_images": False, "force_task_id": "my-task-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"] == [] and json.loads(body["info"])["task_id"] == "my-task-1"
    assert r.headers["X-Task-Id"] == "my-task-1"
    assert api.get(api.base + "/progress", params={"id_task": "my-task-1"}).json()["progress"] == 1.0
    # infotext fills the fields the request does not send
    r = api.post(api.base + "/txt2img", json={"infotext": "a fox\nNegative prompt: blur\nSteps: 2, Sampler: Euler a, "
                                                         "CFG scale: 5, Seed: 77, Size: 64x64", "cfg_scale": 6})
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"]) == ("a fox", "blur", 77, 2)
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6 and (info["width"], info["height"]) == (64, 64)
    # override_settings_restore_afterwards=False keeps the overrides as settings, as in A1111
    r = api.post(api.base + "/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2},
                                             "override_settings_restore_afterwards": False})
    assert r.status_code == 200
    assert api.get(api.base + "/options").json()["CLIP_stop_at_last_layers"] == 2
    api.post(api.base + "/options", json={"CLIP_stop_at_last_layers": 1})


def test_options_cannot_set_paths_or_server_limits(api):
    for key, value in [("outdir_samples", "/etc"), ("api_enable_requests", True), ("queue_max_pending", 1),
                       ("api_max_request_mb", 4096)]:
        r = api.post(api.base + "/options", json={key: value})
        assert r.status_code == 422 and "server configuration" in r.json()["detail"], r.text


def test_url_images_are_off_by_default(api, api_server):
    r = api.post(api.base + "/png-info", json={"image": api_server.url + "/favicon.ico"})
    assert r.status_code == 422 and "api_enable_requests" in r.json()["detail"]


def test_two_clients_own_jobs_interrupting_one_leaves_the_other(api):
    """Without auth everyone is the same caller, so the jobs are told apart by task id."""
    results = {}

    def run(name, steps):
        results[name] = requests.post(api.base + "/txt2img", json={**SMALL, "steps": steps, "seed": 3,
                                                                   "force_task_id": name, "prompt": name})

    first = threading.Thread(target=run, args=("client-a", 300))
    first.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        r = requests.get(api.base + "/progress", params={"id_task": "client-a"})
        if r.status_code == 200 and r.json()["state"]["sampling_step"] > 2:
            break
        time.sleep(0.05)
    second = threading.Thread(target=run, args=("client-b", 3))
    second.start()
    deadline = time.time() + 60
    while requests.get(api.base + "/progress", params={"id_task": "client-b"}).status_code == 404:
        assert time.time() < deadline
        time.sleep(0.05)
    pending = requests.get(api_base_internal(api) + "/pending-tasks").json()
    assert [t["id"] for t in pending["tasks"]] == ["client-b"] and pending["running"]["id"] == "client-a"
    assert requests.post(api.base + "/interrupt", params={"id_task": "client-a"}).status_code == 200
    first.join(60)
    second.join(60)
    a, b = results["client-a"].json(), results["client-b"].json()
    assert len(a["images"]) == 1 and json.loads(a["info"])["task_id"] == "client-a"
    assert len(b["images"]) == 1 and json.loads(b["info"])["all_seeds"] == [3]
    b_alone = requests.post(api.base + "/txt2img", json={**SMALL, "seed": 3, "prompt": "client-b"}).json()
    assert b_alone["images"][0] == b["images"][0]  # the other job finished untouched
    assert requests.post(api.base + "/interrupt", params={"id_task": "nope"}).status_code == 404


def api_base_internal(api) -> str:
    return api.base.replace("/sdapi/v1", "/internal")


def test_webuiapi_client(api_server):
    import webuiapi
    client = webuiapi.WebUIApi(host="127.0.0.1", port=api_server.port, sampler="Euler a", steps=3)
    names = client.util_get_model_names()  # titles, "name [hash]"
    assert any(n.startswith("tiny-sd15.safetensors [") for n in names)
    client.util_set_model("tiny-sd15-inpainting")
    assert client.util_get_current_model().startswith("tiny-sd15-inpainting.safetensors [")
    client.util_set_model(next(n for n in names if n.startswith("tiny-sd15.safetensors [")))
    assert client.util_get_current_model().startswith("tiny-sd15.safetensors [")
    result = client.txt2img(prompt="a boat", seed=9, width=64, height=64)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [9]
    info = client.png_info(result.image)
    assert info.info.startswith("a boat\n") and info.parameters["Seed"] in (9, "9")
    opts = client.get_options()
    client.set_options({"samples_format": "jpg"})
    assert client.get_options()["samples_format"] == "jpg"
    client.set_options({"samples_format": opts["samples_format"]})
    assert "Euler a" in [s["name"] for s in client.get_samplers()]
    assert [u["name"] for u in client.get_upscalers()][:3] == ["None", "Lanczos", "Nearest"]
    scripts = client.get_scripts()
    assert "x/y/z plot" in scripts["txt2img"] and "poor man's outpainting" in scripts["img2img"]
    grid = client.txt2img(prompt="a boat", steps=2, width=64, height=64, seed=9, script_name="X/Y/Z plot",
                          script_args=["Steps", "1, 2", [], "Nothing", "", [], "Nothing", "", []])
    assert grid.image.size[0] == 128 and grid.image.size[1] > 64 and len(grid.info["xyz_timing"]) == 2
    progress = client.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job"] == ""
    client.interrupt()
    client.skip()
    up = client.extra_single_image(image=gradient(), upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert up.image.size == (80, 48)


# ---- a server with tight limits: 413, 503, and URL images on (still never to local addresses) ----

@pytest.fixture(scope="module")
def limited_server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("limited-data")
    (data / "config.json").write_text(json.dumps({"queue_max_pending": 1, "api_max_request_mb": 1,
                                                  "api_enable_requests": True, "api_max_steps": 50,
                                                  "api_max_size": 256}))
    server = Server(["--api", "--nowebui", "--models-dir", str(tiny_models)], data, ready_path="/docs")
    yield server
    server.stop()


def test_request_too_large_is_413(limited_server):
    base = limited_server.url + "/sdapi/v1"
    big = "A" * (2 * 2**20)
    r = requests.post(base + "/png-info", json={"image": big})
    assert r.status_code == 413 and "api_max_request_mb" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while it streams
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 65536
        yield b'"}'
    r = requests.post(base + "/png-info", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert requests.get(base + "/samplers").status_code == 200


def test_queue_full_is_503_and_steps_limit_is_422(limited_server):
    base = limited_server.url + "/sdapi/v1"
    r = requests.post(base + "/txt2img", json={**SMALL, "steps": 51})
    assert r.status_code == 422 and "api_max_steps" in r.json()["detail"]
    threads = [threading.Thread(target=requests.post, args=(base + "/txt2img",),
                                kwargs={"json": {**SMALL, "steps": 50, "n_iter": 4, "force_task_id": f"t{i}"}})
               for i in range(2)]
    threads[0].start()
    deadline = time.time() + 60
    while requests.get(base + "/progress", params={"id_task": "t0"}).status_code == 404 or \
            requests.get(base + "/progress", params={"id_task": "t0"}).json()["state"]["sampling_step"] == 0:
        assert time.time() < deadline
        time.sleep(0.05)
    threads[1].start()  # waits in the queue: the queue is now full
    while requests.get(base + "/progress", params={"id_task": "t1"}).status_code == 404:
        assert time.time() < deadline
        time.sleep(0.05)
    r = requests.post(base + "/txt2img", json=SMALL)
    assert r.status_code == 503 and r.headers["Retry-After"] and "waiting" in r.json()["detail"]
    for task in ("t1", "t0"):
        requests.post(base + "/interrupt", params={"id_task": task})
    for t in threads:
        t.join(60)
    assert requests.post(base + "/txt2img", json=SMALL).status_code == 200


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://localhost/x.png", "http://10.1.2.3/x.png",
                                 "http://[::1]/x.png", "http://169.254.169.254/latest/meta-data",
                                 "http://192.168.0.1/a.png", "ftp://example.com/x.png"])
def test_url_images_never_reach_local_addresses(limited_server, url):
    r = requests.post(limited_server.url + "/sdapi/v1/png-info", json={"image": url})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "loopback or private" in detail or "http(s)" in detail, detail


def test_outpainting_cannot_grow_past_the_size_limit(limited_server):
    """api_max_size holds for the canvas an outpainting script will make, not just the requested size."""
    base = limited_server.url + "/sdapi/v1"
    body = {**SMALL, "width": 192, "height": 192, "init_images": [png_b64(gradient(192, 192))],
            "script_name": "Poor man's outpainting", "script_args": [64, 4, "fill", ["left", "right"]]}
    r = requests.post(base + "/img2img", json=body)
    assert r.status_code == 422, r.text
    assert "expanded image would be 320x192" in r.json()["detail"] and "api_max_size" in r.json()["detail"]
    r = requests.post(base + "/img2img", json={**body, "script_args": [32, 4, "fill", ["left"]]})
    assert r.status_code == 200, r.text  # 224x192 fits
