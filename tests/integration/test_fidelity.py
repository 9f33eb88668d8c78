"""Fidelity: our txt2img gives the same pixels as the plain diffusers pipeline with the same generators."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)

from modules import generation
from tests.images import (
    assert_float_images_close,
    assert_pixels_close,
    mean_abs_difference,
)

# A1111's sampler -> diffusers scheduler, written out here independently of modules/core/samplers.py.
PLAIN_SCHEDULERS = {
    "Euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "Euler a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "DDIM": lambda cfg: DDIMScheduler.from_config(cfg),
    "DPM++ 2M": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
}


@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("fidelity-out"))


@pytest.fixture(scope="module")
def plain_pipe(tiny_models):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers",
                                                   local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


@pytest.mark.parametrize("sampler", list(PLAIN_SCHEDULERS))
def test_txt2img_matches_plain_diffusers(context, plain_pipe, sampler):
    """The decoded float images equal diffusers' `output_type="np"` within FLOAT_ATOL, and the 8-bit images
    within one level (see tests/images.py for why not bit for bit)."""
    plain_pipe, checkpoint_scheduler_config = plain_pipe
    seed, batch, steps = 1234, 2, 6
    req = generation.validate(generation.Txt2ImgRequest(
        prompt="a photo of a cat, highly detailed", negative_prompt="blurry", sampler_name=sampler,
        steps=steps, cfg_scale=7.0, width=64, height=64, seed=seed, batch_size=batch, save_images=False))
    ours = generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                       "return_grid": False}, keep_samples=True)
    assert len(ours.images) == batch == len(ours.samples)

    plain_pipe.scheduler = PLAIN_SCHEDULERS[sampler](checkpoint_scheduler_config)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    plain = plain_pipe(["a photo of a cat, highly detailed"] * batch, negative_prompt=["blurry"] * batch,
                       num_inference_steps=steps, guidance_scale=7.0, height=64, width=64, generator=generators,
                       output_type="np").images

    assert np.asarray(ours.samples).shape == (batch, 64, 64, 3)
    assert_float_images_close(ours.samples, plain)
    for image, expected in zip(ours.images, plain_pipe.image_processor.numpy_to_pil(plain)):
        assert_pixels_close(image, expected)
    assert mean_abs_difference(ours.images[0], ours.images[1]) > 1  # seed+1 differs


def test_same_seed_same_image_and_seed_matters(context):
    def run(seed):
        req = generation.validate(generation.Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, seed=seed,
                                                            save_images=False))
        return np.asarray(generation.run_txt2img(context, req, None, {}).images[0])

    a, b, c = run(7), run(7), run(8)
    assert_pixels_close(a, b)
    assert mean_abs_difference(a, c) > 1


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


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_on_an_inpainting_checkpoint(context, upscaler):
    """The 9-channel UNet's hires pass is the inpaint pipeline with everything masked (as its first pass),
    for a latent and a pixel upscaler alike; the second pass really changes the upscaled picture."""
    def run(denoise):
        req = generation.validate(generation.Txt2ImgRequest(
            prompt="a cat", steps=3, width=64, height=64, seed=2, save_images=False, enable_hr=True, hr_scale=1.5,
            hr_upscaler=upscaler, denoising_strength=denoise, hr_second_pass_steps=3))
        return generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15-inpainting"})
    low, high = run(0.3), run(0.9)
    a, b = np.asarray(low.images[0]).astype(int), np.asarray(high.images[0]).astype(int)
    assert a.shape == b.shape == (96, 96, 3)
    assert np.abs(a - b).mean() > 1
    assert low.info["is_using_inpainting_conditioning"] and "Hires upscale: 1.5" in low.infotexts[0]


@pytest.mark.parametrize("hr_steps,denoise", [(5, 0.3), (4, 0.75), (2, 1.0)])
def test_hires_pass_runs_exactly_the_hires_steps(context, monkeypatch, hr_steps, denoise):
    """A1111: "Hires steps: N" is N denoising steps at any denoising strength (the last N of a longer
    schedule), not N x strength; the progress counts them too."""
    from modules.model_store import sd_pipelines
    calls, handles = [], []
    make = sd_pipelines.make_pipeline

    def counting(bundle, kind, *a, **kw):
        pipe = make(bundle, kind, *a, **kw)
        if not handles:  # every pipeline shares the checkpoint's one UNet: hook it once
            handles.append(pipe.unet.register_forward_hook(lambda *_: calls.append(1)))
        return pipe
    monkeypatch.setattr(sd_pipelines, "make_pipeline", counting)
    req = generation.validate(generation.Txt2ImgRequest(
        prompt="a cat", steps=3, width=64, height=64, seed=2, save_images=False, enable_hr=True, hr_scale=1.5,
        denoising_strength=denoise, hr_second_pass_steps=hr_steps))
    try:
        generation.run_txt2img(context, req, None, {})
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 3 + hr_steps  # one UNet call per step (CFG runs as one batch)


def test_hires_schedule_lands_on_the_hires_steps():
    for hr_steps in range(1, 151):
        for denoise in (0.01, 0.05, 0.1, 0.2, 0.3, 0.33, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.9,
                        0.95, 0.999, 1.0):
            total, strength = generation.hires_schedule(hr_steps, denoise)
            assert total == max(hr_steps, int(hr_steps / min(denoise, 0.999)))  # A1111's schedule length
            assert min(int(total * strength), total) == hr_steps, (hr_steps, denoise)


def test_second_order_samplers_count_steps_and_switch_prompts_as_a1111(context, monkeypatch):
    """Heun calls the model twice per step (2N-1 calls): the progress still counts 1..N per pass and never
    goes back, and `[a cat:a dog:0.5]` switches half-way through the calls (A1111 doubles the schedule of
    second-order samplers), in the first pass and in the hires pass."""
    from modules.core.jobs import Job
    from modules.prompting import prompts as prompts_mod
    reported, used = [], []
    job = Job(lambda j: None, kind="txt2img")
    monkeypatch.setattr(job, "step", lambda step, steps, preview=None: reported.append((step, steps)))
    before = prompts_mod.ConditioningSwitch._before

    def spy(self, module, args, kwargs):
        cond = self.conditioning.conds_at(self.step)[0][1]
        used.append(cond)
        return before(self, module, args, kwargs)
    monkeypatch.setattr(prompts_mod.ConditioningSwitch, "_before", spy)
    steps, hr_steps = 4, 4

    def run(prompt):
        reported.clear()
        used.clear()
        req = generation.validate(generation.Txt2ImgRequest(
            prompt=prompt, sampler_name="Heun", steps=steps, width=64, height=64, seed=2, save_images=False,
            enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=hr_steps))
        generation.run_txt2img(context, req, job, {})
        assert {total for _, total in reported} == {steps + hr_steps}
        values = [step for step, _ in reported]
        assert values == sorted(values) and values[-1] == steps + hr_steps and values[steps * 2 - 2] == steps
        return list(used)

    def switches(calls):
        return [i for i in range(1, len(calls)) if calls[i] is not calls[i - 1]]

    # 0.5: A1111's schedule for Heun has 2 x 4 = 8 call-steps; "a cat" lasts while the call index is <= 4
    # (int(0.5 x 8)), so of the 7 calls the 6th is the first "a dog"; the hires pass needs no switching
    first = run("[a cat:a dog:0.5]")
    assert len(first) == 2 * steps - 1 and switches(first) == [int(0.5 * 2 * steps) + 1]
    # 1.5: the first pass is "a cat" throughout; the hires pass switches by the same rule over its calls
    second = run("[a cat:a dog:1.5]")
    assert len(second) == 2 * hr_steps - 1 and switches(second) == [int(0.5 * 2 * hr_steps) + 1]


def test_lcm_hires_with_a_long_schedule_is_capped(context):
    """LCM takes at most its 50 distilled steps: 8 hires steps at strength 0.1 (an 80-step schedule in A1111's
    rule) run on the 50-step schedule instead of failing."""
    req = generation.validate(generation.Txt2ImgRequest(
        prompt="a cat", sampler_name="LCM", steps=2, width=64, height=64, seed=2, save_images=False,
        enable_hr=True, hr_scale=1.5, denoising_strength=0.1, hr_second_pass_steps=8))
    res = generation.run_txt2img(context, req, None, {})
    assert res.images[0].size == (96, 96)
    assert generation.hires_schedule(8, 0.1, 50) == (50, 8.5 / 50)


def test_hires_with_denoising_strength_zero_is_the_upscale_alone(context):
    """A1111's API smoke test sends enable_hr with denoising_strength 0: the first pass upscaled, no second pass
    (a pixel upscaler gives the Lanczos-resized first pass), and the infotext says so."""
    from PIL import Image

    def run(**kw):
        req = generation.validate(generation.Txt2ImgRequest(prompt="a cat", steps=3, width=64, height=64, seed=4,
                                                            save_images=False, **kw))
        return generation.run_txt2img(context, req, None, {})
    first = run().images[0]
    for upscaler in ("Lanczos", "Latent"):
        res = run(enable_hr=True, hr_scale=2, hr_upscaler=upscaler, denoising_strength=0, hr_second_pass_steps=5)
        assert res.images[0].size == (128, 128)
        text = res.infotexts[0]
        assert "Denoising strength: 0," in text and "Hires pass: upscale only" in text and "Hires steps" not in text
        if upscaler == "Lanczos":
            assert_pixels_close(res.images[0], first.resize((128, 128), Image.Resampling.LANCZOS))


def test_outdir_samples_replaces_the_per_tab_folder(context, tmp_path):
    """A1111's "Output directory for images": set, images go to DIR/YYYY-MM-DD instead of
    outputs/txt2img-images/YYYY-MM-DD."""
    import datetime
    req = generation.validate(generation.Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64, seed=1))
    res = generation.run_txt2img(context, req, None, {"outdir_samples": str(tmp_path / "mine")})
    assert len(res.paths) == 1
    assert res.paths[0].parent == tmp_path / "mine" / datetime.date.today().isoformat()
    default = generation.run_txt2img(context, req, None, {})
    assert default.paths[0].parent.parent == context.outputs_root / "txt2img-images"
