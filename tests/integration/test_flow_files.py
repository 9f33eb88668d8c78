"""FLUX.1 and SD3 single files: ComfyUI's FLUX all-in-one file and BFL's transformer-only file (here in fp8) with
CLIP-L and T5 from models/text_encoder and the VAE from models/VAE; Stability AI's SD3 all-in-one file and a
transformer-only one. They are detected and listed, give the pixels of plain diffusers' pipelines over the same
weights, share one T5 between checkpoints in the model manager, a missing part is a message naming the file to
add, and kohya-layout FLUX LoRAs land on diffusers' layers."""
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
    loaded = loading.load_checkpoint(ctx.registry.find(tiny_flow.TINY_FLUX_TRANSFORMER_FILE))
    assert set(loaded.separate_parts) == {"text_encoder", "text_encoder_2", "vae", "tokenizer_2"}
    transformer = loaded.components["transformer"]
    assert transformer.dtype == torch.float32  # what it computes in
    # what it keeps in memory: the linear layers' fp8 weights (a quarter of float32), norms in float32
    stored = {p.dtype for n, p in transformer.named_parameters() if n.endswith("attn.to_q.weight")}
    assert stored == {torch.float8_e4m3fn}
    fp8_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert fp8_bytes < 0.4 * sum(p.numel() * 4 for p in transformer.parameters())


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
    options = api.get(api.base + "/options").json()
    assert options["sd_text_encoder_t5"] == "Automatic"
    r = api.post(api.base + "/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64, "height": 64,
                                              "override_settings": {
                                                  "sd_model_checkpoint": tiny_flow.TINY_FLUX_TRANSFORMER_FILE,
                                                  "sd_text_encoder_t5": "no-such-t5"}})
    assert r.status_code == 400 and "sd_text_encoder_t5' must be one of" in r.text, r.text


def _merged_with(bundle, path):
    from modules import networks
    weights = networks.load_lora(path)
    info = networks.LoraInfo(name=path.stem, path=path, alias=path.stem)
    warnings: list[str] = []
    with networks.applied_loras(bundle, [networks.AppliedLora(info, 1.0, 1.0, weights)], warnings):
        merged = {k: v.clone() for k, v in bundle.components["transformer"].state_dict().items()}
        te = {k: v.clone() for k, v in bundle.components["text_encoder"].state_dict().items()}
    return merged, te, warnings


@pytest.mark.parametrize("layout", ["kohya", "diffusion_model"])
def test_a_kohya_layout_flux_lora_lands_on_the_split_modules(tiny_models, tmp_path, layout):
    """kohya's FLUX LoRA (BFL's joined layers) merged on diffusers' modules equals the LoRA added to the BFL
    weights and converted by the (diffusers-checked) table; the BFL-named `diffusion_model.*.lora_A/B` spelling
    gives the same; CLIP-L's layers (`lora_te1_*`) change too, and everything is restored after."""
    from safetensors.torch import load_file, save_file

    from modules.demo.tiny_networks import TINY_FLUX_KOHYA_LORA
    from modules.model_store import sd_pipelines
    path = tiny_models / "Lora" / f"{TINY_FLUX_KOHYA_LORA}.safetensors"
    state = load_file(str(path))
    if layout == "diffusion_model":
        renamed = {}
        for key, value in state.items():
            if key.startswith("lora_unet_"):
                stem, _, role = key.partition(".")
                bfl = next(b for b in _bfl_names() if b.replace(".", "_") == stem.removeprefix("lora_unet_"))
                role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)
                renamed[f"diffusion_model.{bfl}.{role}"] = value
            else:
                renamed[key] = value
        path = tmp_path / "bfl-named.safetensors"
        save_file(renamed, str(path))
    ctx = context(tiny_models, tmp_path / "out")
    bundle = sd_pipelines.CheckpointBundle(loading.load_checkpoint(ctx.registry.find(FOLDER)))
    transformer = bundle.components["transformer"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    te_before = {k: v.clone() for k, v in bundle.components["text_encoder"].state_dict().items()}
    merged, te, warnings = _merged_with(bundle, path)
    assert warnings == []
    bfl = flux_files.to_bfl(before, dict(transformer.config))
    for key in list(bfl):
        stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if key.endswith(".weight") and stem + ".lora_up.weight" in state:
            up, down = state[stem + ".lora_up.weight"], state[stem + ".lora_down.weight"]
            bfl[key] = bfl[key] + up @ down * (float(state[stem + ".alpha"]) / down.shape[0])
    expected = flux_files.to_diffusers(bfl)
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sum(not torch.equal(merged[k], before[k]) for k in merged) > 20
    assert any(not torch.equal(te[k], te_before[k]) for k in te)
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())  # removed exactly


def _bfl_names() -> list[str]:
    from modules.demo.tiny_flow import TINY_FLUX_TRANSFORMER
    return [row[0] for row in flux_files._table(TINY_FLUX_TRANSFORMER["num_layers"],
                                                TINY_FLUX_TRANSFORMER["num_single_layers"])]


def test_a_kohya_flux_lora_in_txt2img(tiny_models, tmp_path):
    import dataclasses

    from modules import networks
    ctx = dataclasses.replace(context(tiny_models, tmp_path), networks=networks.ExtraNetworks([tiny_models / "Lora"],
                                                                                              []))
    base = ours(ctx, tiny_flow.TINY_FLUX_FILE, batch=1)
    req = generation.validate(generation.Txt2ImgRequest(
        prompt=PROMPT + " <lora:tiny-flux-kohya-lora:0.8>", steps=3, cfg_scale=1.0, width=64, height=64, seed=3,
        batch_size=1, save_images=False))
    with_lora = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": tiny_flow.TINY_FLUX_FILE,
                                                        "return_grid": False}, keep_samples=True)
    assert with_lora.info["warnings"] == [] and 'Lora hashes: "tiny-flux-kohya-lora: ' in with_lora.infotexts[0]
    assert np.abs(np.asarray(with_lora.samples) - np.asarray(base.samples)).max() > 0.01
    again = ours(ctx, tiny_flow.TINY_FLUX_FILE, batch=1)
    assert_float_images_close(again.samples, base.samples)  # nothing left behind


def test_the_kohya_flux_lora_mapping_is_diffusers_own_at_flux_size():
    """At FLUX.1's real width every kohya layer (joined q|k|v, a single block's q|k|v|mlp, the swapped final
    modulation) lands on the diffusers module diffusers' own kohya converter puts it on, with the same delta
    (probed with random vectors). alpha = rank here: diffusers drops the alpha of the two final layers, kohya's
    trainer (and this project) apply it to every layer."""
    import types

    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    from modules.networks.lora_files import LoraModule
    from modules.networks.merge import _scale, kohya_flow_modules
    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    state, modules = {}, {}
    for key, weight in sorted(flux_files.to_bfl(model.state_dict(), dict(model.config)).items()):
        if key.endswith(".weight") and weight.ndim == 2:
            stem = key.removesuffix(".weight").replace(".", "_")
            down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g)
            state.update({f"lora_unet_{stem}.lora_down.weight": down, f"lora_unet_{stem}.lora_up.weight": up,
                          f"lora_unet_{stem}.alpha": torch.tensor(4.0)})
            modules[stem] = LoraModule(down=down, up=up, alpha=4.0)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    theirs = {k.removeprefix("transformer.").removesuffix(".lora_A.weight").replace(".", "_"):
              (v, converted[k.replace("lora_A", "lora_B")])
              for k, v in converted.items() if k.endswith(".lora_A.weight")}
    mine = kohya_flow_modules(types.SimpleNamespace(components={"transformer": model}, cache={},
                                                    arch=types.SimpleNamespace(family="flux")), modules)
    assert set(mine) == set(theirs) and len(mine) == 30
    for name, m in mine.items():
        a, b = theirs[name]
        x = torch.randn(a.shape[1], 3, generator=g)
        torch.testing.assert_close(m.up @ (m.down @ x) * _scale(m), b @ (a @ x), rtol=1e-4, atol=1e-3, msg=name)


def test_an_fp8_t5_file_keeps_fp8_layers_and_encodes_as_its_weights_cast_up(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from modules.model_store import text_encoders
    source = load_file(str(tiny_models / "text_encoder" / tiny_flow.TINY_T5_FILE))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and "relative_attention" not in k else v
           for k, v in source.items()}
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(fp8, str(path))
    info = text_encoders.TextEncoderInfo(path, text_encoders.classify(path))
    assert info.kind == "t5"
    model = text_encoders.load_file(info, torch.float32)
    assert model.dtype == torch.float32
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert model.shared.weight.dtype == torch.float32  # the embedding (the model's dtype) is not kept in fp8
    rounded = text_encoders.load_t5({k: v.float() for k, v in fp8.items()}, torch.float32, "rounded")
    ids = torch.tensor([[5, 9, 14, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, rounded(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    registry = text_encoders.TextEncoderRegistry([tmp_path, tiny_models / "text_encoder"])
    registry.refresh()
    assert registry.first("t5").path.name == tiny_flow.TINY_T5_FILE  # full precision before fp8


def test_a_lora_on_an_fp8_file_merges_in_full_precision_and_leaves_fp8(tiny_models, tmp_path):
    """Merged into fp8-stored layers a LoRA's deltas would round away: those layers hold float32 weights while the
    LoRA applies (the fp8 values plus the delta, as on the same weights cast up), and go back to the exact fp8
    values after."""
    from modules.demo.tiny_networks import TINY_FLUX_KOHYA_LORA
    from modules.model_store import sd_pipelines
    ctx = context(tiny_models, tmp_path)
    fp8 = sd_pipelines.CheckpointBundle(loading.load_checkpoint(ctx.registry.find(tiny_flow.TINY_FLUX_TRANSFORMER_FILE)))
    folder = sd_pipelines.CheckpointBundle(loading.load_checkpoint(ctx.registry.find(FOLDER)))
    fp8 = fp8.with_components(text_encoder=folder.components["text_encoder"])
    transformer = fp8.components["transformer"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with torch.no_grad():  # the folder's transformer with the same fp8-rounded values, held in float32
        for name, p in folder.components["transformer"].named_parameters():
            p.copy_(before[name].float())
    path = tiny_models / "Lora" / f"{TINY_FLUX_KOHYA_LORA}.safetensors"
    merged, _, warnings = _merged_with(fp8, path)
    expected, _, _ = _merged_with(folder, path)
    assert warnings == []
    for key, value in merged.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, expected[key], msg=key)  # float32's default tolerances
    after = transformer.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k].float(), v.float()) for k, v in before.items())
    assert after["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn



SD3_FOLDER = "tiny-sd3-diffusers"


@pytest.mark.parametrize("config", [
    {},  # SD3 Medium's design: no q/k norms, patch 2
    {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},  # SD3.5 Medium's
])
def test_the_sd3_table_is_diffusers_own_converter_read_both_ways(config):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    from modules.model_store import sd3_files
    torch.manual_seed(0)
    head_dim = 64 if not config else 8  # without q/k norms the head size is SD3's own 64
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3,
                                  attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=48,
                                  caption_projection_dim=2 * head_dim, pooled_projection_dim=32, out_channels=16,
                                  pos_embed_max_size=16, **config)
    weights = model.state_dict()
    sai = sd3_files.to_sai(weights, dict(model.config))
    assert "joint_blocks.2.context_block.adaLN_modulation.1.weight" in sai and "pos_embed" in sai
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    mine = sd3_files.to_diffusers(sai)
    assert set(mine) == set(theirs) == set(weights)
    assert all(torch.equal(mine[k], theirs[k]) and torch.equal(mine[k], weights[k]) for k in weights)
    read = sd3_files.transformer_config(sai)
    assert {k: v for k, v in read.items() if k != "sample_size"} == \
        {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(model.config).items() if k in read
         and k != "sample_size"}


def test_the_sd3_all_in_one_file_gives_the_folders_pixels(tiny_models, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    assert checkpoint_files.detect_architecture(tiny_models / "Stable-diffusion" / tiny_flow.TINY_SD3_FILE) == \
        checkpoint_files.ModelArch("sd3", False, "flow")
    ctx = context(tiny_models, tmp_path)
    result = _sd3(ctx, tiny_flow.TINY_SD3_FILE)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models / "Stable-diffusion" / SD3_FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert_float_images_close(result.samples, _plain_sd3(pipe))
    assert "Model: tiny-sd3," in result.infotexts[0] and result.info["warnings"] == []


def _sd3(ctx, checkpoint):
    req = generation.validate(generation.Txt2ImgRequest(prompt=PROMPT, negative_prompt="blurry", steps=3, cfg_scale=5.0,
                                                        width=64, height=64, seed=3, batch_size=1, save_images=False))
    return generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": checkpoint, "return_grid": False},
                                  keep_samples=True)


def _plain_sd3(pipe):
    e, n, p, np_ = pipe.encode_prompt(PROMPT, None, None, num_images_per_prompt=1, negative_prompt="blurry",
                                      do_classifier_free_guidance=True, max_sequence_length=256)
    return pipe(prompt_embeds=e, negative_prompt_embeds=n, pooled_prompt_embeds=p, negative_pooled_prompt_embeds=np_,
                guidance_scale=5.0, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(3)], max_sequence_length=256).images


def _sd3_parts(tiny_models, models):
    """tiny-sd3.safetensors taken apart as SAI ships SD3.5: the transformer alone, CLIP-L, CLIP-G and T5 files in
    models/text_encoder, the VAE in models/VAE (named for SD3); the tokenizer from the SD3 folder."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from modules.model_store import sd3_files
    source = tiny_models / "Stable-diffusion" / tiny_flow.TINY_SD3_FILE
    with safe_open(str(source), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        configs = json.loads(f.metadata()["diffusers_configs"])
    parts = sd3_files.split_parts(state)
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "text_encoder").mkdir()
    (models / "VAE").mkdir()
    save_file(parts["transformer"], str(models / "Stable-diffusion" / "sd3-transformer.safetensors"))
    for part, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        save_file(parts[part], str(models / "text_encoder" / f"{part}.safetensors"),
                  {"diffusers_configs": json.dumps({"text_encoder": configs[component]})})
    save_file(parts["t5xxl"], str(models / "text_encoder" / "t5xxl_fp16.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v for k, v in parts["vae"].items()}
    save_file(vae, str(models / "VAE" / "sd3-vae.safetensors"), {"diffusers_configs": json.dumps({"vae": configs["vae"]})})
    shutil.copytree(tiny_models / "Stable-diffusion" / SD3_FOLDER, models / "Stable-diffusion" / SD3_FOLDER)


def test_an_sd3_transformer_file_with_separate_encoders_and_vae(tiny_models, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    models = tmp_path / "models"
    _sd3_parts(tiny_models, models)
    ctx = context(models, tmp_path / "out")
    assert {i.name: i.kind for i in ctx.text_encoders.list()} == {"clip_g.safetensors": "clip_g",
                                                                  "clip_l.safetensors": "clip_l",
                                                                  "t5xxl_fp16.safetensors": "t5"}
    result = _sd3(ctx, "sd3-transformer.safetensors")
    pipe = StableDiffusion3Pipeline.from_pretrained(models / "Stable-diffusion" / SD3_FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert_float_images_close(result.samples, _plain_sd3(pipe))
    assert "VAE: sd3-vae.safetensors" in result.infotexts[0]
    # FLUX's VAE has SD3's shape but not its weights: it is never taken for an SD3 file
    (models / "VAE" / "sd3-vae.safetensors").rename(models / "VAE" / "ae.safetensors")
    ctx = context(models, tmp_path / "out2")
    with pytest.raises(CheckpointError, match="holds no VAE: put SD3's VAE"):
        _sd3(ctx, "sd3-transformer.safetensors")


def test_the_demo_set_runs_the_flux_transformer_file(tiny_models, tmp_path):
    """--demo lists the tiny FLUX files, and the transformer-only one finds its text encoders and VAE in the demo
    set (its text_encoder/ and VAE/ folders join the user's)."""
    import requests

    from tests.conftest import Server
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "demo-models")  # the set --demo would make, made already
    srv = Server(["--demo", "--api", "--models-dir", str(tmp_path / "empty-models")], data)
    try:
        base = srv.url + "/sdapi/v1"
        vaes = [v["model_name"] for v in requests.get(base + "/sd-vae", timeout=30).json()]
        assert tiny_flow.TINY_FLUX_VAE_FILE in vaes
        r = requests.post(base + "/txt2img", timeout=300, json={
            "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "cfg_scale": 1,
            "override_settings": {"sd_model_checkpoint": tiny_flow.TINY_FLUX_TRANSFORMER_FILE}})
        assert r.status_code == 200, r.text
        assert f"VAE: {tiny_flow.TINY_FLUX_VAE_FILE}" in r.json()["info"]
    finally:
        srv.stop()



def test_a_kohya_layout_sd3_lora_lands_on_the_split_modules(tiny_models, tmp_path):
    """kohya's SD3 LoRA names (`lora_unet_joint_blocks_0_x_block_attn_qkv`, SAI's joined q|k|v) merged on diffusers'
    modules equal the LoRA added to the SAI-layout weights and converted by the (diffusers-checked) SD3 table; in
    txt2img it changes the picture and is named in the infotext."""
    import dataclasses

    from safetensors.torch import save_file

    from modules import networks
    from modules.model_store import sd3_files, sd_pipelines
    ctx = context(tiny_models, tmp_path / "out")
    bundle = sd_pipelines.CheckpointBundle(loading.load_checkpoint(ctx.registry.find(SD3_FOLDER)))
    transformer = bundle.components["transformer"]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    sai = sd3_files.to_sai(before, dict(transformer.config))
    g = torch.Generator().manual_seed(5)
    state = {}
    for key, weight in sorted(sai.items()):
        if key.endswith(".weight") and weight.ndim == 2:
            stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            state[stem + ".lora_down.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.3
            state[stem + ".lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.3
            state[stem + ".alpha"] = torch.tensor(2.0)
    (tmp_path / "Lora").mkdir()
    path = tmp_path / "Lora" / "sd3-kohya.safetensors"
    save_file(state, str(path))
    merged, _, warnings = _merged_with(bundle, path)
    assert warnings == []
    for key in list(sai):
        stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if stem + ".lora_up.weight" in state:
            sai[key] = sai[key] + state[stem + ".lora_up.weight"] @ state[stem + ".lora_down.weight"] * 0.5
    expected = sd3_files.to_diffusers(sai)
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    ctx = dataclasses.replace(ctx, networks=networks.ExtraNetworks([tmp_path / "Lora"], []))
    req = generation.validate(generation.Txt2ImgRequest(prompt=PROMPT + " <lora:sd3-kohya:1>", negative_prompt="blurry",
                                                        steps=3, cfg_scale=5.0, width=64, height=64, seed=3,
                                                        save_images=False))
    result = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": SD3_FOLDER, "return_grid": False},
                                    keep_samples=True)
    assert result.info["warnings"] == [] and 'Lora hashes: "sd3-kohya: ' in result.infotexts[0]
    base = _sd3(ctx, SD3_FOLDER)
    assert np.abs(np.asarray(result.samples) - np.asarray(base.samples)).max() > 0.01


def test_a_setting_picks_the_text_encoder_file(tiny_models, tmp_path):
    """Two T5 files: Automatic takes the full-precision one, the `sd_text_encoder_t5` setting the one it names
    (an fp8 copy here, its layers kept in fp8), and a name that is not there is a message listing what is."""
    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    for sub in ("text_encoder", "VAE"):
        shutil.copytree(tiny_models / sub, models / sub)
    (models / "Stable-diffusion").mkdir()
    shutil.copy(tiny_models / "Stable-diffusion" / tiny_flow.TINY_FLUX_TRANSFORMER_FILE, models / "Stable-diffusion")
    shutil.copytree(tiny_models / "Stable-diffusion" / FOLDER, models / "Stable-diffusion" / FOLDER)
    t5 = load_file(str(models / "text_encoder" / tiny_flow.TINY_T5_FILE))
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and "relative" not in k else v for k, v in t5.items()},
              str(models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"))
    ctx = context(models, tmp_path / "out")
    assert ctx.text_encoders.choices("t5") == ["Automatic", "t5xxl_fp8_e4m3fn.safetensors", tiny_flow.TINY_T5_FILE]

    def t5_entries():
        return sorted(e["name"] for e in ctx.manager.report() if e["kind"] == "text_encoder" and "t5" in e["name"])

    def run(choice):
        req = generation.validate(generation.Txt2ImgRequest(prompt=PROMPT, steps=1, cfg_scale=1.0, width=64, height=64,
                                                            seed=1, save_images=False))
        return generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": tiny_flow.TINY_FLUX_TRANSFORMER_FILE,
                                                       "sd_text_encoder_t5": choice})
    run("Automatic")
    assert t5_entries() == [tiny_flow.TINY_T5_FILE]
    run("t5xxl_fp8_e4m3fn")  # the name without its extension works too
    assert t5_entries() == ["t5xxl_fp8_e4m3fn.safetensors", tiny_flow.TINY_T5_FILE]
    with pytest.raises(CheckpointError, match="no T5-XXL text encoder named 'nope' in the text-encoder folders"):
        run("nope")
