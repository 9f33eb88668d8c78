"""FLUX.1 single files: ComfyUI's all-in-one file and BFL's transformer-only file (here in fp8) with CLIP-L and T5
from models/text_encoder and the VAE from models/VAE. They are detected and listed, give the pixels of plain
diffusers' FluxPipeline over the same weights, share one T5 between checkpoints in the model manager, and a missing
part is a message naming the file to add."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from modules import generation
from modules.demo import tiny_flow
from modules.model_store import checkpoint_files, flux_files, loading
from modules.model_store.checkpoint_files import CheckpointError
from tests.images import assert_float_images_close

PROMPT = "a photo of a cat, highly detailed"
FOLDER = "tiny-flux-diffusers"


def context(models, out, *, text_encoders=True, vae=True):
    return generation.local_context(
        [models / "Stable-diffusion"], out, vae_dir=models / "VAE" if vae else None,
        text_encoder_dirs=[models / "text_encoder"] if text_encoders else ())


def ours(ctx, checkpoint, *, seed=3, batch=2, steps=3):
    req = generation.validate(generation.Txt2ImgRequest(prompt=PROMPT, steps=steps, cfg_scale=1.0, width=64, height=64,
                                                        seed=seed, batch_size=batch, save_images=False))
    return generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": checkpoint, "return_grid": False},
                                  keep_samples=True)


def plain(pipe, *, seed=3, batch=2, steps=3):
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, num_images_per_prompt=1, max_sequence_length=512)
    return pipe(prompt_embeds=embeds.repeat(batch, 1, 1), pooled_prompt_embeds=pooled.repeat(batch, 1),
                guidance_scale=3.5, num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
                max_sequence_length=512).images


@pytest.fixture(scope="module")
def plain_pipe(tiny_models):
    pipe = FluxPipeline.from_pretrained(tiny_models / "Stable-diffusion" / FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_converter_is_diffusers_own_at_flux_size_and_inverts():
    """At FLUX.1's real width (3072, where diffusers' own converter works: it assumes that width) the table gives
    diffusers' tensors exactly, and BFL -> diffusers -> BFL is the identity. bf16 random weights, one double and one
    single block (about 0.9 GB)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.empty(v.shape, dtype=torch.bfloat16).normal_(generator=g) for k, v in model.state_dict().items()}
    bfl = flux_files.to_bfl(weights, dict(model.config))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    mine = flux_files.to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(mine) == set(theirs) == set(weights)
    assert all(torch.equal(mine[k], theirs[k]) and torch.equal(mine[k], weights[k]) for k in mine)
    config = flux_files.transformer_config(bfl)
    assert {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "axes_dims_rope", "in_channels")} \
        == {"num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "in_channels": 64}
    again = flux_files.to_bfl(mine, config)
    assert set(again) == set(bfl) and all(torch.equal(again[k], bfl[k]) for k in bfl)
    with pytest.raises(KeyError, match="cannot place"):
        flux_files.to_diffusers({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)})


def test_single_files_are_detected_and_listed_last(tiny_models, tmp_path):
    root = tiny_models / "Stable-diffusion"
    flux = checkpoint_files.ModelArch("flux", False, "flow")
    assert checkpoint_files.detect_architecture(root / tiny_flow.TINY_FLUX_FILE) == flux
    assert checkpoint_files.detect_architecture(root / tiny_flow.TINY_FLUX_TRANSFORMER_FILE) == flux
    ctx = context(tiny_models, tmp_path)
    usable = [i.name for i in ctx.registry.usable()]
    assert {tiny_flow.TINY_FLUX_FILE, tiny_flow.TINY_FLUX_TRANSFORMER_FILE} <= set(usable[-5:])
    assert not usable[0].startswith(("tiny-flux", "tiny-sd3"))
    kinds = {i.name: i.kind for i in ctx.text_encoders.list()}
    assert kinds == {tiny_flow.TINY_CLIP_L_FILE: "clip_l", tiny_flow.TINY_T5_FILE: "t5"}


def test_the_all_in_one_file_gives_the_folders_pixels(tiny_models, tmp_path, plain_pipe):
    ctx = context(tiny_models, tmp_path)
    result = ours(ctx, tiny_flow.TINY_FLUX_FILE)
    assert_float_images_close(result.samples, plain(plain_pipe))
    assert "Model: tiny-flux," in result.infotexts[0] and "Distilled CFG Scale: 3.5" in result.infotexts[0]
    assert result.info["warnings"] == []


def test_an_fp8_transformer_file_with_separate_encoders_and_vae(tiny_models, tmp_path, plain_pipe):
    """The fp8 file's weights are cast up to float32: the same pixels as plain diffusers with the folder's
    transformer rounded through float8_e4m3fn. CLIP-L and T5 come from models/text_encoder, the VAE (16 channels)
    from models/VAE, named in the infotext."""
    ctx = context(tiny_models, tmp_path)
    result = ours(ctx, tiny_flow.TINY_FLUX_TRANSFORMER_FILE)
    original = {k: v.clone() for k, v in plain_pipe.transformer.state_dict().items()}
    try:
        with torch.no_grad():
            for p in plain_pipe.transformer.parameters():
                p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
        expected = plain(plain_pipe)
    finally:
        plain_pipe.transformer.load_state_dict(original)
    assert_float_images_close(result.samples, expected)
    assert f"VAE: {tiny_flow.TINY_FLUX_VAE_FILE}" in result.infotexts[0]
    assert np.abs(np.asarray(result.samples) - plain(plain_pipe)).max() > 1e-4  # fp8 really rounded the weights
    bundle = loading.load_checkpoint(ctx.registry.find(tiny_flow.TINY_FLUX_TRANSFORMER_FILE))
    assert set(bundle.separate_parts) == {"text_encoder", "text_encoder_2", "vae", "tokenizer_2"}
    assert bundle.components["transformer"].dtype == torch.float32


def test_two_transformer_files_share_one_t5_in_the_manager(tiny_models, tmp_path):
    models = tmp_path / "models"
    for sub in ("text_encoder", "VAE"):
        shutil.copytree(tiny_models / sub, models / sub)
    (models / "Stable-diffusion").mkdir()
    source = tiny_models / "Stable-diffusion" / tiny_flow.TINY_FLUX_TRANSFORMER_FILE
    for name in ("flux-a.safetensors", "flux-b.safetensors"):
        shutil.copy(source, models / "Stable-diffusion" / name)
    shutil.copytree(tiny_models / "Stable-diffusion" / FOLDER, models / "Stable-diffusion" / FOLDER)  # T5 tokenizer
    ctx = context(models, tmp_path / "out")
    a, b = ours(ctx, "flux-a.safetensors", batch=1), ours(ctx, "flux-b.safetensors", batch=1)
    np.testing.assert_allclose(np.asarray(a.samples), np.asarray(b.samples), atol=1e-6)
    entries = ctx.manager.report()
    text = [e for e in entries if e["kind"] == "text_encoder"]
    assert sorted(e["name"] for e in text) == [tiny_flow.TINY_CLIP_L_FILE, tiny_flow.TINY_T5_FILE]
    assert sum(e["kind"] == "checkpoint" for e in entries) == 2


@pytest.mark.parametrize("missing, words", [
    ("text_encoder", "holds no CLIP-L text encoder: put one"),
    ("VAE", "holds no VAE: put FLUX's VAE (ae.safetensors) in models/VAE"),
    ("tokenizer", "T5's tokenizer is not shipped with the studio"),
])
def test_a_missing_part_names_what_to_add(tiny_models, tmp_path, missing, words):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_models / "Stable-diffusion" / tiny_flow.TINY_FLUX_TRANSFORMER_FILE, models / "Stable-diffusion")
    for sub in ("text_encoder", "VAE"):
        if sub != missing:
            shutil.copytree(tiny_models / sub, models / sub)
    if missing != "tokenizer":
        shutil.copytree(tiny_models / "Stable-diffusion" / FOLDER, models / "Stable-diffusion" / FOLDER)
    ctx = context(models, tmp_path / "out")
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ours(ctx, tiny_flow.TINY_FLUX_TRANSFORMER_FILE, batch=1, steps=1)


def test_over_the_api_and_in_the_memory_report(api):
    r = api.post(api.base + "/txt2img", json={
        "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "cfg_scale": 1, "seed": 3,
        "override_settings": {"sd_model_checkpoint": tiny_flow.TINY_FLUX_TRANSFORMER_FILE}})
    assert r.status_code == 200, r.text
    assert f"VAE: {tiny_flow.TINY_FLUX_VAE_FILE}" in r.json()["info"]
    models = {m["title"].split(" [")[0] for m in api.get(api.base + "/sd-models").json()}
    assert {tiny_flow.TINY_FLUX_FILE, tiny_flow.TINY_FLUX_TRANSFORMER_FILE} <= models
    loaded = api.get(api.base + "/memory").json()["models"]
    assert {m["name"] for m in loaded if m["kind"] == "text_encoder"} == {tiny_flow.TINY_CLIP_L_FILE,
                                                                           tiny_flow.TINY_T5_FILE}
