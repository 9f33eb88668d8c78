"""SD2: the tiny SD2 models (epsilon and v-prediction, single file and diffusers folder, inpainting) load as
plain diffusers loads them, their conditioning equals diffusers' `encode_prompt`, and txt2img, img2img,
inpainting and LoRA give plain diffusers' pixels. The prediction type comes from the configs, an A1111 sidecar
`.yaml` or the `sd_prediction_type` setting, and a wrong one really changes the image."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from modules import generation
from modules.generation import img2img
from modules.generation.img2img_params import Img2ImgRequest, validate_img2img
from modules.model_store import checkpoint_files, loading
from modules.prompting import prompts
from tests.images import (
    assert_float_images_close,
    assert_pixels_close,
    mean_abs_difference,
)

PLAIN_SCHEDULERS = {  # A1111's sampler names -> diffusers schedulers, written out independently of the project
    "Euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "DDIM": lambda cfg: DDIMScheduler.from_config(cfg),
}
PROMPT, NEGATIVE = "a photo of a cat, highly detailed", "blurry"


@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("sd2-out"))


def plain(tiny_models, folder: str, cls=StableDiffusionPipeline):
    pipe = cls.from_pretrained(tiny_models / "Stable-diffusion" / folder, local_files_only=True,
                               safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def txt2img(context, checkpoint: str, seed=1234, batch=1, steps=5, sampler="Euler", **settings):
    req = generation.validate(generation.Txt2ImgRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name=sampler, steps=steps, cfg_scale=7.0, width=64,
        height=64, seed=seed, batch_size=batch, save_images=False))
    return generation.run_txt2img(context, req, None, {"sd_model_checkpoint": checkpoint, "return_grid": False,
                                                       **settings}, keep_samples=True)


@pytest.mark.parametrize("name,prediction", [("tiny-sd2", "epsilon"), ("tiny-sd2-v", "v_prediction")])
def test_sd2_single_files_and_folders_are_detected_and_hold_the_same_weights(context, tiny_models, name,
                                                                             prediction):
    root = tiny_models / "Stable-diffusion"
    for path in (root / f"{name}.safetensors", root / f"{name}-diffusers"):
        arch = checkpoint_files.detect_architecture(path)
        assert (arch.family, arch.inpainting, arch.prediction_type) == ("sd2", False, prediction), path
    header, _ = checkpoint_files.read_safetensors_header(root / f"{name}.safetensors")
    layers = {k.split(".")[4] for k in header if k.startswith("cond_stage_model.model.transformer.resblocks.")}
    single = loading.load_checkpoint(context.registry.find(f"{name}.safetensors"))
    used = single.components["text_encoder"].config.num_hidden_layers
    assert len(layers) == used + 1  # the file's last OpenCLIP layer is never run (SD2 uses the penultimate)
    folder = plain(tiny_models, f"{name}-diffusers")
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = single.components[part].state_dict(), getattr(folder, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{part}.{key}")
    assert single.components["scheduler"].config.prediction_type == prediction
    assert single.components["tokenizer"].pad_token == "!"  # OpenCLIP pads with "!", OpenAI CLIP with its EOS
    assert single.components["text_encoder"].config.hidden_act == "gelu"


def test_sd2_conditioning_equals_diffusers_encode_prompt(tiny_models):
    pipe = plain(tiny_models, "tiny-sd2-v-diffusers")
    conditioner = prompts.TextConditioner(dict(pipe.components), "sd2")
    for text in (PROMPT, "", "x"):
        embeds, _ = pipe.encode_prompt(text, "cpu", 1, do_classifier_free_guidance=False)
        ours = conditioner.encode(text)
        assert ours.embeds.shape == (1, 77, 40)
        torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)


@pytest.mark.parametrize("name,sampler", [("tiny-sd2", "Euler"), ("tiny-sd2-v", "Euler"), ("tiny-sd2-v", "DDIM")])
def test_sd2_txt2img_matches_plain_diffusers(context, tiny_models, name, sampler):
    seed, batch, steps = 1234, 2, 5
    ours = txt2img(context, f"{name}.safetensors", seed, batch, steps, sampler)
    assert f"Model: {name}" in ours.infotexts[0]
    pipe = plain(tiny_models, f"{name}-diffusers")
    pipe.scheduler = PLAIN_SCHEDULERS[sampler](dict(pipe.scheduler.config))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    expected = pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
                    guidance_scale=7.0, height=64, width=64, generator=generators, output_type="np").images
    assert_float_images_close(ours.samples, expected)
    for a, b in zip(ours.images, pipe.image_processor.numpy_to_pil(expected)):
        assert_pixels_close(a, b)


def test_the_prediction_type_setting_overrides_and_a_wrong_one_changes_the_image(context, tiny_models):
    own = txt2img(context, "tiny-sd2-v")
    same = txt2img(context, "tiny-sd2-v", sd_prediction_type="v_prediction")
    wrong = txt2img(context, "tiny-sd2-v", sd_prediction_type="epsilon")
    assert_pixels_close(own.images[0], same.images[0])
    assert mean_abs_difference(own.images[0], wrong.images[0]) > 1
    # the override is exactly plain diffusers with that prediction type on the scheduler
    pipe = plain(tiny_models, "tiny-sd2-v-diffusers")
    pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config), timestep_spacing="linspace",
                                                        prediction_type="epsilon")
    expected = pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=5, guidance_scale=7.0, height=64,
                    width=64, generator=[torch.Generator("cpu").manual_seed(1234)], output_type="np").images
    assert_float_images_close(wrong.samples, expected)
    again = txt2img(context, "tiny-sd2-v")  # nothing stays behind for the next request
    assert_pixels_close(own.images[0], again.images[0])


def test_an_a1111_sidecar_yaml_sets_the_prediction_type(tiny_models, tmp_path):
    folder = tmp_path / "Stable-diffusion"
    folder.mkdir()
    shutil.copy(tiny_models / "Stable-diffusion" / "tiny-sd2-v.safetensors", folder / "mine.safetensors")
    assert checkpoint_files.detect_architecture(folder / "mine.safetensors").prediction_type == "v_prediction"
    (folder / "mine.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
                                      "    linear_start: 0.00085\n", encoding="utf-8")  # no parameterization: eps
    assert checkpoint_files.detect_architecture(folder / "mine.safetensors").prediction_type == "epsilon"
    context = generation.local_context([folder], tmp_path / "out")
    loaded = loading.load_checkpoint(context.registry.find("mine.safetensors"))
    assert loaded.arch.prediction_type == "epsilon"
    assert loaded.components["scheduler"].config.prediction_type == "epsilon"
    (folder / "mine.yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    assert checkpoint_files.detect_architecture(folder / "mine.safetensors").prediction_type == "v_prediction"
    (folder / "mine.yaml").write_text('model:\n  params:\n    parameterization: "x0"\n', encoding="utf-8")
    with pytest.raises(checkpoint_files.CheckpointError, match="parameterization 'x0'"):
        checkpoint_files.detect_architecture(folder / "mine.safetensors")


def test_sd2_img2img_matches_plain_diffusers(context, tiny_models):
    seed, batch, steps, strength = 99, 2, 8, 0.6
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    req = validate_img2img(Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler",
                                          steps=steps, width=64, height=64, seed=seed, batch_size=batch,
                                          init_images=[init], denoising_strength=strength, save_images=False))
    ours = img2img.run_img2img(context, req, None, {"sd_model_checkpoint": "tiny-sd2-v.safetensors",
                                                    "return_grid": False}, keep_samples=True)
    pipe = plain(tiny_models, "tiny-sd2-v-diffusers", StableDiffusionImg2ImgPipeline)
    pipe.scheduler = PLAIN_SCHEDULERS["Euler"](dict(pipe.scheduler.config))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    expected = pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, image=[init] * batch, strength=strength,
                    num_inference_steps=steps, guidance_scale=7.0, generator=generators, output_type="np").images
    assert_float_images_close(ours.samples, expected)
    for a, b in zip(ours.images, pipe.image_processor.numpy_to_pil(expected)):
        assert_pixels_close(a, b)


def test_sd2_inpainting_matches_plain_diffusers_inside_the_mask(context, tiny_models):
    """SD2's inpainting layout (9 UNet input channels): with no blur and the whole picture as the area, what is
    painted inside the mask is plain StableDiffusionInpaintPipeline's; outside it the picture is kept."""
    seed, steps, strength = 5, 6, 1.0
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    req = validate_img2img(Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler",
                                          steps=steps, width=64, height=64, seed=seed, init_images=[init],
                                          mask=mask, mask_blur_x=0, mask_blur_y=0, inpainting_fill=1, inpaint_full_res=False,
                                          denoising_strength=strength, save_images=False))
    ours = img2img.run_img2img(context, req, None, {"sd_model_checkpoint": "tiny-sd2-inpainting",
                                                    "return_grid": False}, keep_samples=True)
    assert ours.info["is_using_inpainting_conditioning"]
    loaded = loading.load_checkpoint(context.registry.find("tiny-sd2-inpainting"))
    pipe = StableDiffusionInpaintPipeline(**loaded.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PLAIN_SCHEDULERS["Euler"](dict(pipe.scheduler.config))
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, image=init, mask_image=mask, strength=strength,
                    num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    got, want, src = (np.asarray(x, np.int16) for x in (ours.images[0], expected, init))
    inside = (slice(18, 46), slice(18, 46))  # two pixels in from the mask's edge (VAE blending at the border)
    assert np.abs(got[inside] - want[inside]).max() <= 1
    keep = np.ones((64, 64), bool)
    keep[14:50, 14:50] = False
    assert np.abs(got[keep] - src[keep]).max() <= 1  # A1111 pastes the original back outside the mask


def test_sd2_lora_merges_as_diffusers_loads_it_and_applies_in_txt2img(context, tiny_models):
    from modules import networks
    path = tiny_models / "Lora" / "tiny-sd2-lora.safetensors"
    weights = networks.load_lora(path)
    assert set(weights.modules) == {"unet", "te1"} and not weights.unknown_keys
    nets = networks.ExtraNetworks([tiny_models / "Lora"], [tiny_models / "embeddings"])
    ctx = dataclasses.replace(context, networks=nets)
    loaded = loading.load_checkpoint(context.registry.find("tiny-sd2-v.safetensors"))
    from modules.model_store import sd_pipelines
    bundle = sd_pipelines.CheckpointBundle(loaded)
    info = networks.LoraInfo(name="tiny-sd2-lora", path=path, alias="tiny-sd2-lora")
    models = {"unet": bundle.components["unet"], "text_encoder": bundle.components["text_encoder"]}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    warnings: list[str] = []
    with networks.applied_loras(bundle, [networks.AppliedLora(info, 1.0, 1.0, weights)], warnings):
        merged = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    assert warnings == []
    pipe = plain(tiny_models, "tiny-sd2-v-diffusers")
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    changed = 0
    for name in models:
        theirs = getattr(pipe, name).state_dict()
        for key, value in merged[name].items():
            changed += not torch.equal(value, before[name][key])
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
    assert changed == sum(len(part) for part in weights.modules.values())

    def run(prompt):
        req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, seed=9,
                                                            save_images=False))
        return generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": "tiny-sd2-v", "return_grid": False})
    base = run("a cat")
    with_lora = run("a cat <lora:tiny-sd2-lora:1>")
    assert with_lora.info["warnings"] == [] and 'Lora hashes: "tiny-sd2-lora: ' in with_lora.infotexts[0]
    assert mean_abs_difference(base.images[0], with_lora.images[0]) > 1
    assert_pixels_close(run("a cat <lora:tiny-sd2-lora:0>").images[0], base.images[0])
