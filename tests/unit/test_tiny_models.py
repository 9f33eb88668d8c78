"""The tiny model set: written once, found by the registry, detected right, loads the same from the
single file and the diffusers folder, and generates images that depend on the seed."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from modules.demo.tiny_models import TINY_MODELS_VERSION, make_tiny_models
from modules.model_store.checkpoint_files import (
    ModelArch,
    detect_architecture,
    read_safetensors_metadata,
)
from modules.model_store.checkpoints import CheckpointRegistry
from modules.model_store.hashing import HashCache
from modules.model_store.loading import load_checkpoint
from modules.prompting.clip_tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = make_tiny_models(root)
    return root, paths


@pytest.fixture(scope="module")
def registry(models_dir, tmp_path_factory):
    root, _ = models_dir
    cache = HashCache(tmp_path_factory.mktemp("cache") / "hashes.json")
    return CheckpointRegistry([root / "Stable-diffusion"], [], cache)


def test_layout_and_registry(models_dir, registry):
    root, paths = models_dir
    assert set(paths) == {"tiny-sd15", "tiny-sd15-diffusers", "tiny-sd15-inpainting", "tiny-sdxl",
                          "tiny-sdxl-diffusers", "tiny-sd2", "tiny-sd2-diffusers", "tiny-sd2-v",
                          "tiny-sd2-v-diffusers", "tiny-sd2-inpainting", "tiny-flux-diffusers", "tiny-sd3-diffusers",
                          "tiny-flux", "tiny-flux-transformer-fp8", "tiny-sd3"}
    assert all(p.parent == root / "Stable-diffusion" and p.exists() for p in paths.values())
    assert [i.name for i in registry.list()] == [
        "tiny-flux-diffusers",
        "tiny-flux-transformer-fp8.safetensors",
        "tiny-flux.safetensors",
        "tiny-sd15-diffusers",
        "tiny-sd15-inpainting.safetensors",
        "tiny-sd15.safetensors",
        "tiny-sd2-diffusers",
        "tiny-sd2-inpainting.safetensors",
        "tiny-sd2-v-diffusers",
        "tiny-sd2-v.safetensors",
        "tiny-sd2.safetensors",
        "tiny-sd3-diffusers",
        "tiny-sd3.safetensors",
        "tiny-sdxl-diffusers",
        "tiny-sdxl.safetensors",
    ]
    assert registry.find("tiny-sd15-diffusers").is_diffusers_folder
    assert (paths["tiny-sd15-diffusers"] / "tokenizer").is_dir()
    assert read_safetensors_metadata(paths["tiny-sd15"])["tiny_models_version"] == TINY_MODELS_VERSION


def test_detected_architectures(models_dir):
    _, paths = models_dir
    assert detect_architecture(paths["tiny-sd15"]) == ModelArch("sd1", False, "epsilon")
    assert detect_architecture(paths["tiny-sd15-inpainting"]) == ModelArch("sd1", True, "epsilon")
    assert detect_architecture(paths["tiny-sd15-diffusers"]) == ModelArch("sd1", False, "epsilon")
    assert detect_architecture(paths["tiny-sdxl"]) == ModelArch("sdxl", False, "epsilon")
    assert detect_architecture(paths["tiny-sd2"]) == ModelArch("sd2", False, "epsilon")
    assert detect_architecture(paths["tiny-sd2-diffusers"]) == ModelArch("sd2", False, "epsilon")
    assert detect_architecture(paths["tiny-sd2-v"]) == ModelArch("sd2", False, "v_prediction")
    assert detect_architecture(paths["tiny-sd2-v-diffusers"]) == ModelArch("sd2", False, "v_prediction")
    assert detect_architecture(paths["tiny-sd2-inpainting"]) == ModelArch("sd2", True, "epsilon")
    assert detect_architecture(paths["tiny-sdxl-diffusers"]) == ModelArch("sdxl", False, "epsilon")


def test_single_file_and_folder_load_identically(registry):
    single = load_checkpoint(registry.find("tiny-sd15"))
    folder = load_checkpoint(registry.find("tiny-sd15-diffusers"))
    assert single.arch == folder.arch
    for name in ("unet", "vae", "text_encoder"):
        a, b = single.components[name].state_dict(), folder.components[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert dict(single.components["scheduler"].config) == dict(folder.components["scheduler"].config)
    text = "a photo of a cat, (masterpiece:1.2)"
    assert folder.components["tokenizer"](text).input_ids == clip_tokenizer()(text).input_ids
    assert single.components["tokenizer"] is clip_tokenizer()


def _generate(pipe, seed, **kwargs):
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images[0]


def test_generates_seed_dependent_64px_images(registry):
    loaded = load_checkpoint(registry.find("tiny-sd15.safetensors"))
    pipe = StableDiffusionPipeline(**loaded.components)
    pipe.set_progress_bar_config(disable=True)
    first = _generate(pipe, 1)
    again = _generate(pipe, 1)
    other = _generate(pipe, 2)
    assert first.shape == (64, 64, 3)  # the default size: sample_size 8 x vae_scale_factor 8
    assert np.isfinite(first).all()
    assert first.var() > 1e-3
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3


def test_inpainting_model_runs_in_the_inpaint_pipeline(registry):
    loaded = load_checkpoint(registry.find("tiny-sd15-inpainting"))
    assert loaded.arch.inpainting
    assert loaded.components["unet"].config.in_channels == 9
    pipe = StableDiffusionInpaintPipeline(**loaded.components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = _generate(pipe, 3, image=image, mask_image=mask, height=64, width=64)
    assert out.shape == (64, 64, 3)
    assert np.isfinite(out).all() and out.var() > 1e-3


def test_second_call_keeps_files_and_recipe_is_deterministic(models_dir, tmp_path):
    root, paths = models_dir
    before = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    again = make_tiny_models(root)
    assert again == paths
    assert {name: p.stat().st_mtime_ns for name, p in again.items()} == before

    fresh = make_tiny_models(tmp_path)
    for name in ("tiny-sd15", "tiny-sd15-inpainting"):
        digest = hashlib.sha256(paths[name].read_bytes()).hexdigest()
        assert hashlib.sha256(fresh[name].read_bytes()).hexdigest() == digest
    assert (paths["tiny-sd15"].read_bytes()) != paths["tiny-sd15-inpainting"].read_bytes()


def test_making_the_set_prints_one_line_per_model_and_no_library_noise(tmp_path):
    """What a new user sees on the first `--demo` start: what is made, where, how long; no progress bars of
    saving shards and no torchvision fallback notes from transformers."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "modules.demo.tiny_models", str(tmp_path / "m")], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Writing model shards" not in output and "requires torchvision" not in output, output
    assert "%|" not in output, output  # no tqdm bar at all
    made = [line for line in output.splitlines() if "made tiny-sd15 (single file and diffusers folder) in" in line]
    assert len(made) == 1 and str(tmp_path / "m") in made[0], output
