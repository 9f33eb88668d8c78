"""The Checkpoint Merger: the service on tiny SD1 checkpoints (weighted sum at 0, 1 and 0.5, add difference,
float16, .ckpt, A1111's metadata, a baked-in VAE, discarded weights, an inpainting A, missing keys, the config
copy, refusals before anything is written, an interrupted merge) and `POST /sdapi/v1/merge` on a real server
(the result is listed and generates; bad input is a 4xx with a message)."""
from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file

from modules.demo import tiny_models as maker
from modules.model_store import checkpoint_files, checkpoints, hashing, merging, sd_vae
from modules.model_store.hashing import sha256_of_file
from tests.conftest import Server

A = "tiny-sd15.safetensors"
INPAINT = "tiny-sd15-inpainting.safetensors"
UNET_IN = checkpoint_files.UNET_INPUT_KEY


def make_models(tiny_models, root):
    """A models/ folder: tiny-sd15 (A), two more tiny SD1 checkpoints of other seeds (B, C), the inpainting one,
    tiny-sdxl, and the tiny VAE."""
    sd = root / "Stable-diffusion"
    sd.mkdir(parents=True)
    for name in (A, INPAINT, "tiny-sdxl.safetensors"):
        shutil.copy2(tiny_models / "Stable-diffusion" / name, sd / name)
    for name, seed in (("tiny-b", 10), ("tiny-c", 20)):
        maker.write_tiny_single_file(sd / f"{name}.safetensors", maker.build_tiny_sd15(seed))
    (root / "VAE").mkdir()
    shutil.copy2(tiny_models / "VAE" / "tiny-vae.safetensors", root / "VAE" / "tiny-vae.safetensors")
    return root


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    return make_models(tiny_models, tmp_path_factory.mktemp("merge-models"))


@pytest.fixture
def env(models, tmp_path):
    """A registry over the models (with a hash cache), the VAE registry, and an empty output folder."""
    cache = hashing.HashCache(tmp_path / "cache.json")
    # the output folder is listed too (made by the first merge), as the server's model folder would be
    registry = checkpoints.CheckpointRegistry([models / "Stable-diffusion", tmp_path / "out"], hash_cache=cache)
    vaes = sd_vae.VaeRegistry(models / "VAE", cache)
    vaes.refresh()
    return registry, vaes, tmp_path / "out"


def merge(env, **fields):
    registry, vaes, out = env
    return merging.merge_checkpoints(registry, vaes, merging.MergeRequest(**fields), output_dir=out)


def tensors(models, name):
    return load_file(str(models / "Stable-diffusion" / name))


def test_weighted_sum_at_0_is_a_at_1_is_b_and_at_half_the_mean(env, models):
    a, b = tensors(models, A), tensors(models, "tiny-b.safetensors")
    for m, expected in ((0.0, a), (1.0, b)):
        res = merge(env, primary_model_name="tiny-sd15", secondary_model_name="tiny-b", multiplier=m)
        out = load_file(str(res.path))
        assert set(out) == set(a)
        for key, value in out.items():
            assert value.dtype == a[key].dtype, key
            if "model" in key and key not in merging.SKIP_ON_MERGE:
                assert torch.equal(value, expected[key]), (m, key)
    res = merge(env, primary_model_name="tiny-sd15", secondary_model_name="tiny-b", multiplier=0.5)
    assert res.path.name == "tiny-sd15_tiny-b_0.5.safetensors"  # the default name: A_B_M
    out = load_file(str(res.path))
    differ = 0
    for key, value in out.items():
        if a[key].is_floating_point():
            assert torch.allclose(value, (a[key] + b[key]) / 2, atol=1e-6), key
            differ += not torch.equal(a[key], b[key])
    assert differ > 100  # the two models really differ
    assert res.sha256 == sha256_of_file(res.path)


def test_add_difference(env, models):
    a, b, c = (tensors(models, n) for n in (A, "tiny-b.safetensors", "tiny-c.safetensors"))
    res = merge(env, primary_model_name=A, secondary_model_name="tiny-b", tertiary_model_name="tiny-c",
                interp_method="Add difference", multiplier=0.7)
    assert res.path.name == "tiny-sd15_tiny-b_minus_tiny-c_0.7.safetensors"
    out = load_file(str(res.path))
    for key, value in out.items():
        if a[key].is_floating_point():
            assert torch.allclose(value, a[key] + (b[key] - c[key]) * 0.7, atol=1e-5), key


def test_float16_and_ckpt_format(env, models):
    half = load_file(str(merge(env, primary_model_name=A, secondary_model_name="tiny-b", multiplier=0.25,
                               save_as_half=True, custom_name="half").path))
    floats = [v for v in half.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)

    res = merge(env, primary_model_name=A, secondary_model_name="tiny-b", multiplier=0.25, checkpoint_format="ckpt",
                custom_name="pickled")
    assert res.path.name == "pickled.ckpt"
    loaded = torch.load(res.path, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict"}
    ref = load_file(str(merge(env, primary_model_name=A, secondary_model_name="tiny-b", multiplier=0.25,
                              custom_name="reference").path))
    assert set(loaded["state_dict"]) == set(ref)
    assert all(torch.equal(loaded["state_dict"][k], ref[k]) for k in ref)
    assert res.sha256 == sha256_of_file(res.path)
    # a .ckpt input (loaded whole) merges as its .safetensors twin does
    registry, vaes, out = env
    shutil.copy2(res.path, models / "Stable-diffusion" / "pickled-input.ckpt")
    registry.refresh()
    again = load_file(str(merge(env, primary_model_name="pickled-input.ckpt", interp_method="No interpolation",
                                custom_name="from-ckpt").path))
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_metadata_recipe(env, models):
    registry = env[0]
    res = merge(env, primary_model_name=A, secondary_model_name="tiny-b", multiplier=0.4, custom_name="with-meta",
                discard_weights="", config_source="B")
    meta = checkpoint_files.read_safetensors_metadata(res.path)
    assert meta["format"] == "pt"
    recipe = json.loads(meta["sd_merge_recipe"])
    sha_a = sha256_of_file(models / "Stable-diffusion" / A)
    sha_b = sha256_of_file(models / "Stable-diffusion" / "tiny-b.safetensors")
    assert recipe == {"type": "webui", "primary_model_hash": sha_a, "secondary_model_hash": sha_b,
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.4,
                      "save_as_half": False, "custom_name": "with-meta", "config_source": 1, "bake_in_vae": "None",
                      "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    used = json.loads(meta["sd_merge_models"])
    assert set(used) == {sha_a, sha_b}
    assert used[sha_a]["name"] == A and len(used[sha_a]["legacy_hash"]) == 8 and used[sha_a]["sd_merge_recipe"] is None
    # the loader's configs come along (the tiny models need them); a merge of a merge inherits the recipes
    assert meta[checkpoint_files.DIFFUSERS_CONFIGS_METADATA_KEY] == checkpoint_files.read_safetensors_metadata(
        models / "Stable-diffusion" / A)[checkpoint_files.DIFFUSERS_CONFIGS_METADATA_KEY]
    shutil.copy2(res.path, models / "Stable-diffusion" / "merged-once.safetensors")
    registry.refresh()
    twice = merge(env, primary_model_name="merged-once", secondary_model_name="tiny-c", custom_name="twice")
    used2 = json.loads(checkpoint_files.read_safetensors_metadata(twice.path)["sd_merge_models"])
    once_sha = sha256_of_file(models / "Stable-diffusion" / "merged-once.safetensors")
    assert used2[once_sha]["sd_merge_recipe"] == recipe and sha_a in used2 and sha_b in used2
    plain = merge(env, primary_model_name=A, secondary_model_name="tiny-b", save_metadata=False, custom_name="plain")
    assert set(checkpoint_files.read_safetensors_metadata(plain.path)) == {checkpoint_files.DIFFUSERS_CONFIGS_METADATA_KEY}
    # listed at once, with its hash known (recorded while writing, nothing read again)
    assert registry.find("plain").known_sha256 == plain.sha256


def test_bake_in_vae_and_discard_weights(env, models):
    vae = load_file(str(models / "VAE" / "tiny-vae.safetensors"))
    a = tensors(models, A)
    res = merge(env, primary_model_name=A, interp_method="No interpolation", bake_in_vae="tiny-vae.safetensors",
                discard_weights=r"^cond_stage_model\..*\.final_layer_norm\.", custom_name="baked")
    out = load_file(str(res.path))
    first_stage = [k for k in a if k.startswith("first_stage_model.")]
    assert first_stage
    for key in first_stage:
        assert torch.equal(out[key], vae[key.removeprefix("first_stage_model.")]), key
    assert not any(".final_layer_norm." in k and k.startswith("cond_stage_model.") for k in out)
    assert set(out) == {k for k in a if not (k.startswith("cond_stage_model.") and ".final_layer_norm." in k)}
    for key in out:
        if not key.startswith("first_stage_model."):
            assert torch.equal(out[key], a[key]), key
    assert json.loads(checkpoint_files.read_safetensors_metadata(res.path)["sd_merge_recipe"])["bake_in_vae"] == \
        "tiny-vae.safetensors"


def test_an_inpainting_a_merges_its_first_four_input_channels(env, models):
    a, b = tensors(models, INPAINT), tensors(models, "tiny-b.safetensors")
    res = merge(env, primary_model_name=INPAINT, secondary_model_name="tiny-b", multiplier=1.0)
    assert res.path.name == "tiny-sd15-inpainting_tiny-b_1.inpainting.safetensors" and res.is_inpainting
    out = load_file(str(res.path))
    assert out[UNET_IN].shape[1] == 9
    assert torch.equal(out[UNET_IN][:, :4], b[UNET_IN])
    assert torch.equal(out[UNET_IN][:, 4:], a[UNET_IN][:, 4:])
    assert checkpoint_files.detect_architecture(res.path).inpainting
    with pytest.raises(merging.MergeError, match="A must be the inpainting model"):
        merge(env, primary_model_name="tiny-b", secondary_model_name=INPAINT)


def test_a_key_b_lacks_keeps_a(env, models):
    registry = env[0]
    b = tensors(models, "tiny-b.safetensors")
    dropped = "model.diffusion_model.out.2.bias"
    del b[dropped]
    maker._write_safetensors(models / "Stable-diffusion" / "tiny-b-partial.safetensors", b, {})
    registry.refresh()
    out = load_file(str(merge(env, primary_model_name=A, secondary_model_name="tiny-b-partial", multiplier=1.0).path))
    assert torch.equal(out[dropped], tensors(models, A)[dropped])


def test_a_config_beside_a_is_copied(env, models):
    (models / "Stable-diffusion" / "tiny-c.yaml").write_text("model: {}\n")
    try:
        res = merge(env, primary_model_name="tiny-c", secondary_model_name="tiny-b", custom_name="configured")
        assert res.config == res.path.with_suffix(".yaml") and res.config.read_text() == "model: {}\n"
        res = merge(env, primary_model_name="tiny-c", secondary_model_name="tiny-b", custom_name="unconfigured",
                    config_source=3)
        assert res.config is None and not res.path.with_suffix(".yaml").exists()
    finally:
        (models / "Stable-diffusion" / "tiny-c.yaml").unlink()


@pytest.mark.parametrize("fields, error, message", [
    ({"primary_model_name": "nope", "secondary_model_name": "tiny-b"}, merging.MergeError, "primary model.*not found"),
    ({"primary_model_name": "", "secondary_model_name": "tiny-b"}, merging.MergeError, "needs a primary model"),
    ({"primary_model_name": A}, merging.MergeError, "needs a secondary model"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "interp_method": "Add difference"},
     merging.MergeError, "needs a tertiary model"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "multiplier": 1.5}, merging.MergeError,
     "out of range"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "discard_weights": "(["}, merging.MergeError,
     "not a valid regular expression"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "interp_method": "Sum"}, merging.MergeError,
     "interp_method"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "checkpoint_format": "bin"}, merging.MergeError,
     "checkpoint_format"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "custom_name": "../x"}, merging.MergeError,
     "plain file name"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-sdxl"}, merging.MergeError, "one family"),
    ({"primary_model_name": A, "secondary_model_name": "tiny-b", "bake_in_vae": "missing.safetensors"},
     sd_vae.UnknownVaeError, "not found"),
])
def test_bad_input_is_refused_before_anything_is_written(env, fields, error, message):
    registry, vaes, out = env
    with pytest.raises(error, match=message):
        merging.check(registry, vaes, merging.MergeRequest(**fields), out)
    with pytest.raises(error, match=message):
        merge(env, **fields)
    assert not out.exists() or not list(out.iterdir())


def test_an_existing_file_is_kept_unless_overwriting_is_asked(env):
    first = merge(env, primary_model_name=A, secondary_model_name="tiny-b", custom_name="taken", multiplier=0.0)
    with pytest.raises(merging.OutputExistsError, match="taken.safetensors already exists"):
        merge(env, primary_model_name=A, secondary_model_name="tiny-b", custom_name="taken", multiplier=1.0)
    assert sha256_of_file(first.path) == first.sha256
    second = merge(env, primary_model_name=A, secondary_model_name="tiny-b", custom_name="taken.safetensors",
                   multiplier=1.0, overwrite=True)
    assert second.path == first.path and second.sha256 != first.sha256
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["taken.safetensors"]  # no temp file left
    # one of the models being merged is never replaced, even when asked
    registry, vaes, out = env
    with pytest.raises(merging.MergeError, match="one of the models being merged"):
        merging.merge_checkpoints(registry, vaes, merging.MergeRequest(A, "tiny-b", custom_name="tiny-sd15",
                                                                       overwrite=True),
                                  output_dir=registry.dirs[0])


class Stop(Exception):
    pass


def test_an_interrupted_merge_leaves_no_file(env):
    registry, vaes, out = env

    def progress(done, total, text):
        if done > 10:
            raise Stop("stop")  # as job.step raises JobInterrupted

    with pytest.raises(Stop):
        merging.merge_checkpoints(registry, vaes, merging.MergeRequest(A, "tiny-b"), progress, output_dir=out)
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    models = make_models(tiny_models, tmp_path_factory.mktemp("merge-api-models"))
    s = Server(["--api", "--models-dir", str(models), "--device", "cpu"], tmp_path_factory.mktemp("merge-api-data"))
    yield s
    s.stop()


def post(server, path, body):
    return requests.post(server.url + "/sdapi/v1" + path, json=body, timeout=300)


def test_merge_over_the_api_lists_the_model_and_it_generates(server):
    r = post(server, "/merge", {"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-b.safetensors",
                                "multiplier": 0.5, "custom_name": "api-merge", "save_as_half": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "api-merge.safetensors" and body["filename"].endswith("/api-merge.safetensors")
    assert body["sha256"] == sha256_of_file(body["filename"])
    listed = requests.get(server.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert [m for m in listed if m["model_name"] == "api-merge"][0]["sha256"] == body["sha256"]
    r = post(server, "/txt2img", {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1,
                                  "override_settings": {"sd_model_checkpoint": body["name"]}})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (64, 64)
    assert json.loads(r.json()["info"])["sd_model_name"] == "api-merge"


@pytest.mark.parametrize("body, status, message", [
    ({"primary_model_name": "nope", "secondary_model_name": "tiny-b"}, 400, "not found"),
    ({"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-b", "interp_method": "Add difference"},
     400, "tertiary model"),
    ({"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-b", "multiplier": -0.1}, 400, "out of range"),
    ({"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-b", "discard_weights": "*x"}, 400,
     "regular expression"),
    ({"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-b", "bake_in_vae": "nope"}, 400, "VAE"),
    ({"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-sdxl"}, 400, "one family"),
    ({"secondary_model_name": "tiny-b"}, 422, "primary_model_name"),
])
def test_bad_input_over_the_api_is_a_4xx_with_a_message(server, body, status, message):
    r = post(server, "/merge", body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_a_taken_name_is_a_409(server):
    body = {"primary_model_name": "tiny-sd15", "secondary_model_name": "tiny-c", "custom_name": "api-taken"}
    assert post(server, "/merge", body).status_code == 200
    r = post(server, "/merge", body)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert post(server, "/merge", {**body, "overwrite": True, "multiplier": 0.9}).status_code == 200
