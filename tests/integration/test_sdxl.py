"""SDXL: the tiny SDXL single file loads as the diffusers folder does, its prompt conditioning (both text
encoders and the pooled output) equals diffusers' `encode_prompt`, and txt2img gives plain diffusers' pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

from modules import generation
from modules.model_store import checkpoint_files, loading, sd_pipelines
from modules.prompting import prompts
from tests.images import assert_float_images_close, assert_pixels_close

PLAIN_SCHEDULERS = {
    "Euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
    "Euler a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"),
}


@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("sdxl-out"))


@pytest.fixture(scope="module")
def plain_pipe(tiny_models):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sdxl-diffusers",
                                                     local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    # safetensors' memory map can leave a weight at an address that is not 64-byte aligned, and the CPU
    # matmul then rounds its last bit differently (seen on text_projection: 2e-7 in the pooled output, one
    # pixel level in the image). Fresh copies hold the same values at aligned addresses, like our loader's.
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for param in module.parameters():
                param.data = param.data.clone()
    return pipe


@pytest.fixture(scope="module")
def single_file(context):
    info = context.registry.find("tiny-sdxl.safetensors")
    assert info is not None
    return loading.load_checkpoint(info)


def test_tiny_sdxl_single_file_is_detected_and_loads_the_folders_weights(tiny_models, single_file, plain_pipe):
    path = tiny_models / "Stable-diffusion" / "tiny-sdxl.safetensors"
    arch = checkpoint_files.detect_architecture(path)
    assert (arch.family, arch.inpainting, arch.prediction_type) == ("sdxl", False, "epsilon")
    assert single_file.arch.family == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, plain = single_file.components[name].state_dict(), getattr(plain_pipe, name).state_dict()
        assert ours.keys() == plain.keys(), name
        for key in ours:
            torch.testing.assert_close(ours[key], plain[key], rtol=0, atol=0, msg=f"{name}.{key}")
    # The second encoder is the projected one, and its q/k/v came back out of OpenCLIP's joined in_proj.
    assert type(single_file.components["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert single_file.components["text_encoder_2"].config.hidden_size == 48


def test_conditioning_equals_diffusers_encode_prompt(plain_pipe):
    conditioner = prompts.TextConditioner(dict(plain_pipe.components), "sdxl")
    for text in ("a photo of a cat, highly detailed", "", "x"):
        ours = conditioner.encode(text)
        embeds, _, pooled, _ = plain_pipe.encode_prompt(text, do_classifier_free_guidance=False)
        assert ours.embeds.shape == (1, 77, 80) and ours.pooled.shape == (1, 32)
        torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_empty_negative_is_zeros_and_a_given_one_is_encoded(plain_pipe):
    conditioner = prompts.TextConditioner(dict(plain_pipe.components), "sdxl")
    zeroed = prompts.build_conditioning(conditioner, "a cat", "", steps=4)
    uncond = zeroed.uncond_at(0)
    assert not uncond.embeds.any() and not uncond.pooled.any()
    given = prompts.build_conditioning(conditioner, "a cat", "blurry", steps=4).uncond_at(0)
    _, negative, _, negative_pooled = plain_pipe.encode_prompt("a cat", negative_prompt="blurry")
    torch.testing.assert_close(given.embeds, negative, rtol=0, atol=0)
    torch.testing.assert_close(given.pooled, negative_pooled, rtol=0, atol=0)


def test_long_prompt_chunks_keep_the_first_chunks_pooled_output(plain_pipe):
    conditioner = prompts.TextConditioner(dict(plain_pipe.components), "sdxl")
    words = ", ".join(f"word{i}" for i in range(40))  # well over 75 tokens
    long = conditioner.encode(words)
    chunks, _ = conditioner.encoders[0].chunker.chunks(words)
    assert len(chunks) >= 2 and long.embeds.shape == (1, 77 * len(chunks), 80)
    first_ids, _ = conditioner.encoders[1].chunker.padded_ids(chunks[0])
    with torch.no_grad():
        pooled = plain_pipe.text_encoder_2(torch.tensor([first_ids]))[0]
    torch.testing.assert_close(long.pooled, pooled, rtol=0, atol=0)


def test_emphasis_and_clip_skip_follow_a1111_on_sdxl(plain_pipe):
    components = dict(plain_pipe.components)
    plain = prompts.TextConditioner(components, "sdxl").encode("a (cat:1.4)")
    unweighted = prompts.TextConditioner(components, "sdxl").encode("a cat")
    assert not torch.equal(plain.embeds, unweighted.embeds)
    torch.testing.assert_close(plain.pooled, unweighted.pooled, rtol=0, atol=0)  # weights never touch pooled
    # A1111 ignores Clip skip on SDXL unless "sdxl_clip_l_skip" is set; then only CLIP-L moves.
    skip2 = prompts.TextConditioner(components, "sdxl", clip_skip=2).encode("a cat")
    torch.testing.assert_close(skip2.embeds, unweighted.embeds, rtol=0, atol=0)
    skip_l = prompts.TextConditioner(components, "sdxl", clip_skip=3, sdxl_clip_l_skip=True).encode("a cat")
    assert not torch.equal(skip_l.embeds[..., :32], unweighted.embeds[..., :32])
    torch.testing.assert_close(skip_l.embeds[..., 32:], unweighted.embeds[..., 32:], rtol=0, atol=0)


@pytest.mark.parametrize("sampler,negative", [("Euler", "blurry"), ("Euler a", "")])
def test_sdxl_txt2img_matches_plain_diffusers(context, plain_pipe, sampler, negative):
    seed, batch, steps, size = 77, 2, 5, 64
    prompt = "a photo of a cat, highly detailed"
    req = generation.validate(generation.Txt2ImgRequest(
        prompt=prompt, negative_prompt=negative, sampler_name=sampler, steps=steps, cfg_scale=6.0,
        width=size, height=size, seed=seed, batch_size=batch, save_images=False))
    ours = generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sdxl.safetensors",
                                                       "return_grid": False}, keep_samples=True)
    assert "Model: tiny-sdxl" in ours.infotexts[0]

    plain_pipe.scheduler = PLAIN_SCHEDULERS[sampler](dict(plain_pipe.scheduler.config))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    # The prompt is encoded once and repeated over the batch, as A1111 does: CLIP's projection run on a
    # batch of 2 differs from a batch of 1 in the last bit, which alone would move a pixel by one level.
    embeds = plain_pipe.encode_prompt(prompt, negative_prompt=negative or None)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    repeated = {name: t.repeat(batch, *[1] * (t.ndim - 1)) for name, t in zip(names, embeds)}
    if not negative:
        assert not repeated["negative_prompt_embeds"].any()  # diffusers' force_zeros_for_empty_prompt
    plain = plain_pipe(**repeated, num_inference_steps=steps, guidance_scale=6.0, height=size, width=size,
                       generator=generators, output_type="np").images
    assert np.asarray(ours.samples).shape == (batch, size, size, 3)
    assert_float_images_close(ours.samples, plain)
    for a, b in zip(ours.images, plain_pipe.image_processor.numpy_to_pil(plain)):
        assert_pixels_close(a, b)


def test_sdxl_prompt_language_hires_and_img2img(context):
    """Prompt editing, AND and hires fix run on SDXL (pooled outputs switch with the text) and change the image."""
    def run(prompt, **kw):
        req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, seed=3,
                                                            save_images=False, **kw))
        return generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sdxl",
                                                           "return_grid": False})
    base = np.asarray(run("a cat").images[0])
    edited = np.asarray(run("a [dog:cat:2]").images[0])
    anded = np.asarray(run("a cat AND a dog:0.7").images[0])
    assert not np.array_equal(base, edited) and not np.array_equal(base, anded)
    hires = run("a cat", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
                hr_second_pass_steps=2)
    assert hires.images[0].size == (96, 96) and "Hires upscale: 1.5" in hires.infotexts[0]

    from PIL import Image

    from modules.generation import img2img, img2img_params
    init = Image.fromarray(base)
    req = img2img_params.validate_img2img(img2img_params.Img2ImgRequest(
        prompt="a cat", init_images=[init], denoising_strength=0.6, steps=4, seed=3, width=64, height=64,
        save_images=False))
    result = img2img.run_img2img(context, req, None, {"sd_model_checkpoint": "tiny-sdxl", "return_grid": False})
    out = np.asarray(result.images[0])
    assert out.shape == (64, 64, 3) and not np.array_equal(out, base)


def test_sdxl_bundle_uses_the_xl_pipelines(context, single_file):
    bundle = sd_pipelines.CheckpointBundle(single_file)
    pipe = sd_pipelines.make_pipeline(bundle, "txt2img", EulerDiscreteScheduler.from_config(bundle.scheduler_config))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet is single_file.components["unet"]


def test_sdxl_embedding_matches_diffusers_textual_inversion(tiny_models):
    """An SDXL embedding (clip_l + clip_g vectors) conditions as diffusers' load_textual_inversion does it;
    the SD1 embedding (CLIP-L width only) is not used by SDXL: its name stays plain words."""
    from safetensors.torch import load_file

    from modules import networks
    folder = tiny_models / "Stable-diffusion" / "tiny-sdxl-diffusers"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    db = networks.EmbeddingDatabase([tiny_models / "embeddings"])
    loaded, skipped = db.split_for({32, 48})
    assert "tiny-emb-xl" in loaded and {"tiny-emb", "tiny-emb-pt"} <= skipped.keys()
    assert loaded["tiny-emb-xl"].shape == 80
    ours = prompts.TextConditioner(dict(pipe.components), "sdxl", embeddings=db.all())
    assert set(ours.used_embeddings) == {"tiny-emb-xl"}
    with_emb = ours.encode("a tiny-emb-xl cat")
    plain_words = prompts.TextConditioner(dict(pipe.components), "sdxl").encode("a tiny-emb cat")
    torch.testing.assert_close(ours.encode("a tiny-emb cat").embeds, plain_words.embeds, rtol=0, atol=0)

    data = load_file(str(tiny_models / "embeddings" / "tiny-emb-xl.safetensors"))
    pipe.load_textual_inversion(data["clip_l"], token="tiny-emb-xl", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token="tiny-emb-xl", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, _, _, _ = pipe.encode_prompt("a tiny-emb-xl cat", do_classifier_free_guidance=False)
    torch.testing.assert_close(with_emb.embeds, embeds, rtol=0, atol=0)
    assert not torch.equal(with_emb.embeds, plain_words.embeds)
    # The pooled output is read at the end-of-text token. diffusers' own pooled output is not compared:
    # its new token ids sort above <|endoftext|>, and CLIP's legacy argmax pooling then reads the
    # embedding's position instead (A1111 keeps the original ids, so it reads the end token).
    text = pipe.maybe_convert_prompt("a tiny-emb-xl cat", pipe.tokenizer_2)
    ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
    with torch.no_grad():
        hidden = pipe.text_encoder_2(ids, output_hidden_states=True).last_hidden_state
        expected = pipe.text_encoder_2.text_projection(hidden[:, eos])
    torch.testing.assert_close(with_emb.pooled, expected, rtol=0, atol=0)


def test_sdxl_through_the_api_with_its_embedding(api):
    """A user picks the SDXL checkpoint per request over the REST API; its SDXL embedding is applied and
    hashed in the infotext, and the SD1 one is listed as skipped while SDXL is the current model."""
    import base64
    import io
    import json

    from PIL import Image
    before = api.get(api.base + "/options").json()["sd_model_checkpoint"]
    r = api.post(api.base + "/txt2img", json={
        "prompt": "a tiny-emb-xl cat", "negative_prompt": "tiny-emb", "steps": 3, "width": 64, "height": 64,
        "seed": 5, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
        "override_settings_restore_afterwards": False})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "tiny-sdxl"
    assert "TI hashes: \"tiny-emb-xl: " in info["infotexts"][0] and "tiny-emb:" not in info["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (64, 64)
    try:
        body = api.get(api.base + "/embeddings").json()
        assert "tiny-emb-xl" in body["loaded"] and body["loaded"]["tiny-emb-xl"]["shape"] == 80
        assert "tiny-emb" in body["skipped"]
    finally:
        assert api.post(api.base + "/options", json={"sd_model_checkpoint": before}).status_code == 200
    assert "tiny-emb" in api.get(api.base + "/embeddings").json()["loaded"]


def test_kohya_sdxl_lora_merges_as_diffusers_loads_it(tiny_models, single_file):
    """The tiny kohya SDXL LoRA (lora_te1_/lora_te2_, LDM-named UNet layers) touches every layer it names,
    with the weights diffusers' own kohya loader gives after fuse_lora, and is fully removed afterwards."""
    from modules import networks
    path = tiny_models / "Lora" / "tiny-xl-lora.safetensors"
    weights = networks.load_lora(path)
    assert set(weights.modules) == {"unet", "te1", "te2"} and not weights.unknown_keys
    bundle = sd_pipelines.CheckpointBundle(single_file)
    info = networks.LoraInfo(name="tiny-xl-lora", path=path, alias="tiny-xl-lora")
    models = {"unet": bundle.components["unet"], "text_encoder": bundle.components["text_encoder"],
              "text_encoder_2": bundle.components["text_encoder_2"]}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    warnings: list[str] = []
    with networks.applied_loras(bundle, [networks.AppliedLora(info, 1.0, 1.0, weights)], warnings):
        merged = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    assert warnings == []
    for name, m in models.items():  # removed exactly
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[name][k]), (name, k)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sdxl-diffusers",
                                                     local_files_only=True, add_watermarker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    changed = 0
    for name in models:
        plain = getattr(pipe, name).state_dict()
        for k, ours in merged[name].items():
            if not torch.equal(ours, before[name][k]):
                changed += 1
            torch.testing.assert_close(ours, plain[k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    # every LoRA module changed its layer's weight (q, k, v, out of each attention)
    assert changed == sum(len(part) for part in weights.modules.values())


def test_sdxl_lora_tag_in_txt2img(context, tiny_models):
    """`<lora:tiny-xl-lora:W>` on the SDXL checkpoint: applied without warnings, hashed in the infotext,
    weight 0 is exactly the image without it, and nothing is left behind for the next request."""
    import dataclasses

    from modules import networks
    nets = networks.ExtraNetworks([tiny_models / "Lora"], [tiny_models / "embeddings"])
    ctx = dataclasses.replace(context, networks=nets)

    def run(prompt):
        req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, seed=9,
                                                            save_images=False))
        res = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": "tiny-sdxl", "return_grid": False})
        return np.asarray(res.images[0]), res

    plain, _ = run("a cat")
    with_lora, res = run("a cat <lora:tiny-xl-lora:1>")
    assert res.info["warnings"] == [] and 'Lora hashes: "tiny-xl-lora: ' in res.infotexts[0]
    assert np.abs(with_lora.astype(float) - plain).mean() > 1
    zero, _ = run("a cat <lora:tiny-xl-lora:0>")
    assert_pixels_close(zero, plain)
    assert_pixels_close(run("a cat")[0], plain)
