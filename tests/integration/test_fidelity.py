"""Fidelity: our txt2img gives the same pixels as the plain diffusers pipeline with the same generators."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline)

from modules import generation, sd_models
from modules.model_manager import ModelManager
from modules.styles import StyleDatabase

# A1111's sampler -> diffusers scheduler, written out here independently of modules/samplers.py.
PLAIN_SCHEDULERS = {
    "Euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "Euler a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "DDIM": lambda cfg: DDIMScheduler.from_config(cfg),
    "DPM++ 2M": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
}


@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity-out")
    cache = sd_models.HashCache(out / "cache.json")
    registry = sd_models.CheckpointRegistry([tiny_models / "Stable-diffusion"], [], cache)
    registry.refresh()
    manager = ModelManager("cpu", 0, 8 * 2**30)
    return generation.GenerationContext(registry=registry, manager=manager, styles=StyleDatabase(out / "styles.csv"),
                                        outputs_root=out / "outputs")


@pytest.fixture(scope="module")
def plain_pipe(tiny_models):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers",
                                                   local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.parametrize("sampler", list(PLAIN_SCHEDULERS))
def test_txt2img_matches_plain_diffusers(context, plain_pipe, sampler):
    plain_pipe, checkpoint_scheduler_config = plain_pipe
    seed, batch, steps = 1234, 2, 6
    req = generation.validate(generation.Txt2ImgRequest(
        prompt="a photo of a cat, highly detailed", negative_prompt="blurry", sampler_name=sampler,
        steps=steps, cfg_scale=7.0, width=64, height=64, seed=seed, batch_size=batch, save_images=False))
    ours = generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                       "return_grid": False})
    assert len(ours.images) == batch

    plain_pipe.scheduler = PLAIN_SCHEDULERS[sampler](checkpoint_scheduler_config)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    plain = plain_pipe(["a photo of a cat, highly detailed"] * batch, negative_prompt=["blurry"] * batch,
                       num_inference_steps=steps, guidance_scale=7.0, height=64, width=64, generator=generators,
                       output_type="pil").images

    for a, b in zip(ours.images, plain):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == (64, 64, 3)
        assert a.std() > 1  # a real picture, not a flat field, so equality means something
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(ours.images[0]), np.asarray(ours.images[1]))  # seed+1 differs


def test_same_seed_same_image_and_seed_matters(context):
    def run(seed):
        req = generation.validate(generation.Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, seed=seed,
                                                            save_images=False))
        return np.asarray(generation.run_txt2img(context, req, None, {}).images[0])

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_variation_seed_moves_away_from_the_seed(context):
    def run(strength):
        req = generation.validate(generation.Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, seed=5,
                                                            subseed=99, subseed_strength=strength,
                                                            save_images=False))
        res = generation.run_txt2img(context, req, None, {})
        return np.asarray(res.images[0]).astype(float), res.infotexts[0]

    base, _ = run(0.0)
    small, _ = run(0.1)
    big, text = run(0.9)
    assert 0 < np.abs(base - small).mean() < np.abs(base - big).mean()
    assert "Variation seed: 99" in text and "Variation seed strength: 0.9" in text
