"""The SD VAE setting: Automatic, None and files of models/VAE (single files in the LDM layout, .safetensors or a
weights-only .pt, and diffusers folders), through the model manager, in the infotext, and over the API."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline

from modules import generation
from modules.model_store import checkpoint_files, loading, sd_vae
from tests.images import (
    assert_float_images_close,
    assert_pixels_close,
    mean_abs_difference,
)


@pytest.fixture(scope="module")
def vae_models(tiny_models, tmp_path_factory):
    """The tiny checkpoints, tiny-vae.safetensors, the same VAE as a .pt pickle and as a diffusers folder."""
    root = tmp_path_factory.mktemp("vae-models")
    shutil.copytree(tiny_models / "Stable-diffusion", root / "Stable-diffusion")
    (root / "VAE").mkdir()
    shutil.copy2(tiny_models / "VAE" / "tiny-vae.safetensors", root / "VAE" / "tiny-vae.safetensors")
    state = checkpoint_files.load_state_dict(root / "VAE" / "tiny-vae.safetensors")
    torch.save({"state_dict": state}, root / "VAE" / "tiny-vae-pickle.pt")
    folder_vae = sd_vae.load_vae(sd_vae.VaeInfo("x", root / "VAE" / "tiny-vae.safetensors"),
                                 loading.checkpoint_config_dir(root / "Stable-diffusion" / "tiny-sd15.safetensors"),
                                 torch.float32)
    folder_vae.save_pretrained(root / "VAE" / "tiny-vae-folder")
    return root


@pytest.fixture(scope="module")
def context(vae_models, tmp_path_factory):
    return generation.local_context([vae_models / "Stable-diffusion"], tmp_path_factory.mktemp("vae-out"),
                                    vae_dir=vae_models / "VAE")


def run(context, vae, **kw):
    req = generation.validate(generation.Txt2ImgRequest(prompt="a cat", steps=3, width=64, height=64, seed=11,
                                                        save_images=False, **kw))
    return generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                       "sd_vae": vae}, keep_samples=True)


def test_registry_lists_files_and_folders(context):
    assert context.vaes.names() == ["tiny-vae-folder", "tiny-vae-pickle.pt", "tiny-vae.safetensors"]
    assert context.vaes.choices()[:2] == ["Automatic", "None"]
    with pytest.raises(sd_vae.UnknownVaeError, match="not found"):
        context.vaes.choose("nope.safetensors", "x.safetensors")


def test_a_vae_file_equals_plain_diffusers_with_that_vae(context, vae_models):
    """Our image with tiny-vae equals the plain pipeline whose VAE is diffusers' own load of that file."""
    ours = run(context, "tiny-vae.safetensors", sampler_name="Euler")
    text = ours.infotexts[0]
    info = context.vaes.find("tiny-vae.safetensors")
    assert f"VAE hash: {info.shorthash}, VAE: tiny-vae.safetensors" in text
    assert ours.info["sd_vae_name"] == "tiny-vae.safetensors" and ours.info["sd_vae_hash"] == info.shorthash
    plain = StableDiffusionPipeline.from_pretrained(  # the same weights as tiny-sd15.safetensors
        vae_models / "Stable-diffusion" / "tiny-sd15-diffusers", local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    plain.vae = AutoencoderKL.from_single_file(
        str(vae_models / "VAE" / "tiny-vae.safetensors"),
        config=str(loading.checkpoint_config_dir(vae_models / "Stable-diffusion" / "tiny-sd15.safetensors")),
        subfolder="vae", local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = EulerDiscreteScheduler.from_config(plain.scheduler.config, timestep_spacing="linspace")
    expected = plain("a cat", num_inference_steps=3, guidance_scale=7.0, height=64, width=64,
                     generator=[torch.Generator().manual_seed(11)], output_type="np").images
    assert_float_images_close(ours.samples, expected)


def test_none_is_the_checkpoint_vae_and_every_form_of_a_file_is_the_same_vae(context):
    own = run(context, "None")
    assert "VAE" not in own.infotexts[0] and own.info["sd_vae_name"] is None
    automatic = run(context, "Automatic")  # no tiny-sd15.vae.* anywhere: the checkpoint's own
    assert_pixels_close(automatic.images[0], own.images[0])
    file_vae = run(context, "tiny-vae.safetensors")
    assert mean_abs_difference(file_vae.images[0], own.images[0]) > 1  # another VAE, another picture
    for name in ("tiny-vae-pickle.pt", "tiny-vae-folder"):
        assert_pixels_close(run(context, name).images[0], file_vae.images[0])
    loaded = {r["name"]: r for r in context.manager.report() if r["kind"] == "vae"}
    assert set(loaded) == {"tiny-vae.safetensors", "tiny-vae-pickle.pt", "tiny-vae-folder"}
    assert all(r["loads"] == 1 for r in loaded.values())  # each loaded once, then reused from the manager


def test_automatic_takes_the_vae_named_after_the_checkpoint(context, vae_models):
    beside = vae_models / "Stable-diffusion" / "tiny-sd15.vae.safetensors"
    shutil.copy2(vae_models / "VAE" / "tiny-vae.safetensors", beside)
    try:
        automatic = run(context, "Automatic")
        assert "VAE: tiny-sd15.vae.safetensors" in automatic.infotexts[0]
        assert_pixels_close(automatic.images[0], run(context, "tiny-vae.safetensors").images[0])
    finally:
        beside.unlink()


def test_api_lists_picks_and_refuses_vaes(api, api_server, tiny_models):
    names = [v["model_name"] for v in api.get(api.base + "/sd-vae").json()]
    assert names == ["tiny-flux-ae.safetensors", "tiny-vae.safetensors"]
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5}
    r = api.post(api.base + "/txt2img", json={**body, "override_settings": {"sd_vae": "tiny-vae.safetensors"}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_vae_name"] == "tiny-vae.safetensors" and "VAE: tiny-vae.safetensors" in info["infotexts"][0]
    r = api.post(api.base + "/txt2img", json={**body, "override_settings": {"sd_vae": "missing.safetensors"}})
    assert r.status_code == 400 and "sd_vae" in r.json()["detail"]
    extra = tiny_models / "VAE" / "added.safetensors"
    shutil.copy2(tiny_models / "VAE" / "tiny-vae.safetensors", extra)
    try:
        assert "added.safetensors" not in [v["model_name"] for v in api.get(api.base + "/sd-vae").json()]
        assert api.post(api.base + "/refresh-vae").status_code == 200
        assert "added.safetensors" in [v["model_name"] for v in api.get(api.base + "/sd-vae").json()]
    finally:
        extra.unlink()
        api.post(api.base + "/refresh-vae")
