"""LoRA and embeddings in txt2img: applied per request only, cached by the manager, named in the infotext."""
from __future__ import annotations

import hashlib
import shutil
import struct
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modules import generation, networks
from tests.images import assert_pixels_close


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-models")
    lora = root / "Lora"
    lora.mkdir()
    shutil.copy2(tiny_models / "Lora" / "tiny-lora.safetensors", lora)
    # the same LoRA in PEFT/diffusers layout (alpha folded into B, as PEFT files carry no alpha)
    peft = {}
    for key, value in load_file(str(lora / "tiny-lora.safetensors")).items():
        if key.endswith(".alpha"):
            continue
        stem, role = key.rsplit(".lora_", 1)
        part, name = ("unet", stem[len("lora_unet_"):]) if stem.startswith("lora_unet_") else \
            ("text_encoder", stem[len("lora_te_"):])
        module = dict(unet_modules(tiny_models)).get(name) if part == "unet" else te_module(name)
        new_role = "lora_A" if role.startswith("down") else "lora_B"
        peft[f"{part}.{module}.{new_role}.weight"] = value.contiguous()  # alpha == rank: scale 1
    save_file(peft, str(lora / "tiny-lora-peft.safetensors"))
    # the same LoRA with its UNet layers named in the LDM layout, as kohya writes SDXL (and some SD1) LoRAs
    ldm_names = unet_ldm_names()
    ldm = {}
    for key, value in load_file(str(lora / "tiny-lora.safetensors")).items():
        if key.startswith("lora_unet_"):
            stem, dot, role = key.partition(".")
            key = "lora_unet_" + ldm_names[stem[len("lora_unet_"):]] + dot + role
        ldm[key] = value
    save_file(ldm, str(lora / "tiny-lora-ldm.safetensors"))
    (lora / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return root


def unet_modules(tiny_models):
    from modules.demo.tiny_models import build_tiny_sd15
    unet = build_tiny_sd15()["unet"]
    return [(n.replace(".", "_"), n) for n, _ in unet.named_modules()]


def unet_ldm_names():
    """flat diffusers UNet module name -> flat LDM name, by ldm_convert's own state-dict conversion."""
    from modules.demo.tiny_models import build_tiny_sd15
    from modules.model_store.ldm_convert import UNET_PREFIX, unet_to_ldm
    unet = build_tiny_sd15()["unet"]
    converted = unet_to_ldm({k: k for k in unet.state_dict()}, unet.config)  # LDM key -> diffusers key
    flat = lambda key: key.removesuffix(".weight").replace(".", "_")  # noqa: E731
    return {flat(d): flat(k.removeprefix(UNET_PREFIX)) for k, d in converted.items() if d.endswith(".weight")}


def te_module(flat):
    # "text_model_encoder_layers_0_self_attn_q_proj" -> "text_model.encoder.layers.0.self_attn.q_proj"
    parts = flat.split("_")
    out, i = [], 0
    joined = {"text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj"}
    while i < len(parts):
        if i + 1 < len(parts) and f"{parts[i]}_{parts[i + 1]}" in joined:
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


@pytest.fixture(scope="module")
def base(context):
    return run(context, "a cat")[0]


@pytest.fixture(scope="module")
def context(tiny_models, folders, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("lora-out"),
                                    lora_dirs=[folders / "Lora"], embedding_dirs=[tiny_models / "embeddings"])


def run(context, prompt, negative_prompt="blurry", **fields):
    req = generation.validate(generation.Txt2ImgRequest(**{
        "prompt": prompt, "negative_prompt": negative_prompt, "steps": 4, "width": 64, "height": 64, "seed": 11,
        "save_images": False, **fields}))
    res = generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                      "return_grid": False})
    return np.asarray(res.images[0]).astype(int), res


HIRES = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, denoising_strength=0.6)


def hires(context, prompt, hr_prompt="", **fields):
    return run(context, prompt, hr_prompt=hr_prompt, **{**HIRES, **fields})


@pytest.fixture(scope="module")
def hires_base(context):
    return hires(context, "a cat")[0]


@pytest.fixture
def first_passes(monkeypatch):
    """The latents each hires pass starts from (the first pass's result), in order."""
    seen = []
    from modules.generation import hires
    hires_pass = hires.hires_pass

    def spy(ctx, bundle, req, latents, *rest):
        seen.append(latents.clone())
        return hires_pass(ctx, bundle, req, latents, *rest)
    monkeypatch.setattr(hires, "hires_pass", spy)
    return seen


def test_a_lora_changes_the_image_for_that_request_only(context, base):
    with_lora, res = run(context, "a cat <lora:tiny-lora:1>")
    assert np.abs(with_lora - base).mean() > 5  # plainly visible
    after, _ = run(context, "a cat")
    assert_pixels_close(after, base)  # exact removal: nothing leaks into the next request
    zero, _ = run(context, "a cat <lora:tiny-lora:0>")
    assert_pixels_close(zero, base)
    # the tag is stripped before encoding, but the infotext keeps the prompt as written, with the hash
    assert res.infotexts[0].startswith("a cat <lora:tiny-lora:1>\n")
    path = context.networks.loras.find("tiny-lora").path
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        autov3 = hashlib.sha256(f.read()).hexdigest()[:12]
    assert f'Lora hashes: "tiny-lora: {autov3}"' in res.infotexts[0]
    assert res.info["extra_generation_params"]["Lora hashes"] == f"tiny-lora: {autov3}"
    assert res.info["warnings"] == []


def test_the_same_lora_again_is_a_cache_hit(context):
    run(context, "x <lora:tiny-lora:0.5>")
    run(context, "y <lora:tiny-lora:0.7>")
    loras = [r for r in context.manager.report() if r["kind"] == "lora" and r["name"] == "LoRA tiny-lora"]
    assert len(loras) == 1 and loras[0]["loads"] == 1


def test_te_and_unet_weights_split(context, base):
    both, _ = run(context, "a cat <lora:tiny-lora:1:1>")
    unet_only, _ = run(context, "a cat <lora:tiny-lora:0:1>")
    te_only, _ = run(context, "a cat <lora:tiny-lora:1:0>")
    assert np.abs(unet_only - both).mean() > 0.5 and np.abs(te_only - base).mean() > 0.5
    assert np.abs(unet_only - base).mean() > 0.5


def test_kohya_and_peft_layouts_give_the_same_image(context):
    kohya, _ = run(context, "a cat <lora:tiny-lora:0.8>")
    peft, res = run(context, "a cat <lora:tiny-lora-peft:0.8>")
    assert np.abs(kohya - peft).max() <= 1  # same deltas; fp32 alpha/rank scaling may round a level
    assert res.info["warnings"] == []


def merged_weights(context, tags):
    """Every UNet and text-encoder weight of tiny-sd15 while the tags' LoRAs are merged."""
    from modules.model_store import sd_pipelines
    resolved = context.networks.resolve("x " + tags)
    info = context.registry.find("tiny-sd15.safetensors")
    with sd_pipelines.use_checkpoint(context.manager, info, dtype=torch.float32) as bundle, \
            context.networks.leased(context.manager, resolved, []) as applied, \
            networks.applied_loras(bundle, applied, []):
        return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
                for k, v in bundle.components[part].state_dict().items()}


def test_two_loras_at_once(context):
    one, _ = run(context, "a cat <lora:tiny-lora:0.5>")
    two, res = run(context, "a cat <lora:tiny-lora:0.5> <lora:tiny-lora-peft:0.5>")
    assert np.abs(two - one).mean() > 1
    assert "tiny-lora: " in res.info["extra_generation_params"]["Lora hashes"]
    assert "tiny-lora-peft: " in res.info["extra_generation_params"]["Lora hashes"]
    # the deltas add up: two halves merge into the weights of the whole (to float rounding; the random tiny
    # model amplifies a last-bit difference into visible pixels, so the check is on the weights)
    halves = merged_weights(context, "<lora:tiny-lora:0.5> <lora:tiny-lora-peft:0.5>")
    whole = merged_weights(context, "<lora:tiny-lora:1>")
    plain = merged_weights(context, "")
    changed = [k for k in whole if not torch.equal(whole[k], plain[k])]
    lora = networks.load_lora(context.networks.loras.find("tiny-lora").path)
    assert len(changed) == sum(len(part) for part in lora.modules.values()) == 4 * 5 + 8 * 6  # 5 CLIP, 6 UNet
    for k in changed:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the order of the tags does not matter, bit for bit
    swapped = merged_weights(context, "<lora:tiny-lora-peft:0.5> <lora:tiny-lora:0.5>")
    assert all(torch.equal(swapped[k], halves[k]) for k in changed)


@pytest.mark.parametrize("tag,why", [
    ("<lora:nope:1>", "no LoRA named 'nope'"),
    ("<lora:tiny-lora:abc>", "'abc' is not a number"),
    ("<lora:broken:1>", "cannot read broken.safetensors"),
    ("<hypernet:x:1>", "unknown extra network type 'hypernet'"),
])
def test_bad_tags_still_make_the_image_and_say_why(context, base, tag, why):
    image, res = run(context, f"a cat {tag}")
    assert_pixels_close(image, base)
    assert len(res.info["warnings"]) == 1 and why in res.info["warnings"][0] and tag.split(":")[0] in res.info["warnings"][0]


def test_an_embedding_in_the_prompt(context, tiny_models):
    image, res = run(context, "a cat tiny-emb")
    plain_word, _ = run(context, "a cat tiny emb")
    assert np.abs(image - plain_word).mean() > 0.5
    digest = hashlib.sha256((tiny_models / "embeddings" / "tiny-emb.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "tiny-emb: {digest}"' in res.infotexts[0]
    _, res_pt = run(context, "a cat", negative_prompt="tiny-emb-pt")
    assert "tiny-emb-pt: " in res_pt.infotexts[0]


def test_prompt_editing_and_and_in_txt2img(context, base):
    assert_pixels_close(run(context, "[a cat|a cat]")[0], base)  # through the switch, same tensors
    assert_pixels_close(run(context, "[a cat:a dog:3]")[0], base)  # steps 0..3 of 4: all "a cat"
    assert_pixels_close(run(context, "a cat AND a dog :0")[0], base)
    mixed = run(context, "a cat :0.5 AND (a dog:1.4) :0.5")[0]
    assert np.abs(mixed - base).mean() > 0.5 and 0 < mixed.mean() < 255


def ldm_index(components, pairs):
    """The LoRA module index of these components, checking that each (LDM name, diffusers name) pair is one
    UNet layer and that every UNet layer has both names."""
    bundle = types.SimpleNamespace(components=components, cache={})
    index = networks.merge.module_index(bundle)
    unet = index["unet"]
    for ldm, diffusers in pairs:
        assert unet[ldm] is unet[diffusers], (ldm, diffusers)
    names_per_layer = {}
    for name, module in unet.items():
        names_per_layer.setdefault(id(module), []).append(name)
    assert {len(names) for names in names_per_layer.values()} == {2}
    assert networks.merge.module_index(bundle) is index  # kept with the bundle
    return index


def test_ldm_named_unet_layers_are_the_same_layers():
    from modules.demo.tiny_models import build_tiny_sd15
    index = ldm_index(build_tiny_sd15(), [
        ("input_blocks_1_1_proj_in", "down_blocks_0_attentions_0_proj_in"),
        ("input_blocks_2_1_transformer_blocks_0_attn2_to_k", "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"),
        ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1"),
        ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
        ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
        ("middle_block_1_proj_out", "mid_block_attentions_0_proj_out"),
        ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
        ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_3_1_proj_out", "up_blocks_1_attentions_0_proj_out"),
        ("output_blocks_5_0_emb_layers_1", "up_blocks_1_resnets_2_time_emb_proj"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
    ])
    assert not any(name.startswith(("input_blocks", "middle_block", "output_blocks")) for name in index["te1"])


def test_sdxl_unet_layers_have_kohya_sdxl_names():
    from modules.demo.tiny_models import build_tiny_sdxl
    ldm_index(build_tiny_sdxl(), [
        ("input_blocks_4_1_transformer_blocks_1_attn2_to_k", "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"),
        ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
        ("output_blocks_0_1_proj_out", "up_blocks_0_attentions_0_proj_out"),
        ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),  # after the block's attention
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ])


def test_ldm_named_kohya_lora_gives_the_same_image(context, base, folders):
    keys = load_file(str(folders / "Lora" / "tiny-lora-ldm.safetensors")).keys()
    assert any(k.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in keys)
    kohya, _ = run(context, "a cat <lora:tiny-lora:0.8>")
    ldm, res = run(context, "a cat <lora:tiny-lora-ldm:0.8>")
    assert_pixels_close(ldm, kohya)
    assert np.abs(ldm - base).mean() > 5
    assert res.info["warnings"] == []


def test_hires_prompt_loras_apply_to_the_hires_pass(context, hires_base, monkeypatch):
    # the same tags in both prompts: exactly the request whose hires prompt is left empty
    same, _ = hires(context, "a cat <lora:tiny-lora:1>", "a cat <lora:tiny-lora:1>")
    empty, _ = hires(context, "a cat <lora:tiny-lora:1>")
    assert_pixels_close(same, empty)
    # a LoRA in the hires prompt only changes the hires pass: its UNet part ...
    hr_only, res = hires(context, "a cat", "a cat <lora:tiny-lora:1>")
    assert np.abs(hr_only - hires_base).mean() > 1 and np.abs(hr_only - empty).mean() > 1
    unet_only, _ = hires(context, "a cat", "a cat <lora:tiny-lora:0:1>")
    assert np.abs(unet_only - hires_base).mean() > 1
    # ... and its text encoder part, which encodes the hires prompt but not the first pass's
    encoded = []
    from modules.prompting import prompts
    build = prompts.build_conditioning
    monkeypatch.setattr(prompts, "build_conditioning",
                        lambda *a, **kw: encoded.append(build(*a, **kw)) or encoded[-1])
    hires(context, "a cat", "a cat")
    hires(context, "a cat", "a cat <lora:tiny-lora:1:0>")
    (plain_first, plain_hr), (first, hr) = [[c.conds[0][1][0][1].embeds for c in encoded[i:i + 2]] for i in (0, 2)]
    torch.testing.assert_close(first, plain_first, rtol=0, atol=0)
    torch.testing.assert_close(plain_hr, plain_first, rtol=0, atol=0)
    assert (hr - plain_hr).abs().max() > 1
    monkeypatch.undo()
    zero, _ = hires(context, "a cat", "a cat <lora:tiny-lora:0>")
    assert_pixels_close(zero, hires_base)
    assert res.info["warnings"] == []
    assert "tiny-lora: " in res.info["extra_generation_params"]["Lora hashes"]
    assert res.info["extra_generation_params"]["Hires prompt"] == "a cat <lora:tiny-lora:1>"


def test_a_first_pass_lora_is_left_out_of_a_hires_prompt_without_it(context, base, hires_base, first_passes):
    first_only, res = hires(context, "a cat <lora:tiny-lora:1>", "a cat")
    both, _ = hires(context, "a cat <lora:tiny-lora:1>")
    assert np.abs(first_only - both).mean() > 1 and np.abs(first_only - hires_base).mean() > 1
    torch.testing.assert_close(first_passes[0], first_passes[1], rtol=0, atol=0)  # the same first pass
    assert "tiny-lora: " in res.info["extra_generation_params"]["Lora hashes"]
    # nothing of either pass's LoRAs stays in the checkpoint
    assert_pixels_close(hires(context, "a cat")[0], hires_base)
    assert_pixels_close(run(context, "a cat")[0], base)


def test_hires_loras_in_the_infotext_and_warnings_once(context):
    _, res = hires(context, "a cat <lora:tiny-lora:0.5> <lora:nope:1>", "a dog <lora:tiny-lora-peft:0.5> <lora:nope:1>")
    hashes = res.info["extra_generation_params"]["Lora hashes"]
    assert hashes.startswith("tiny-lora: ") and ", tiny-lora-peft: " in hashes
    assert f'Lora hashes: "{hashes}"' in res.infotexts[0]
    assert len(res.info["warnings"]) == 1 and "no LoRA named 'nope'" in res.info["warnings"][0]
    _, res = hires(context, "a cat", "a dog <lora:broken:1>")
    assert len(res.info["warnings"]) == 1 and "cannot read broken.safetensors" in res.info["warnings"][0]
    assert "Lora hashes" not in res.info["extra_generation_params"]


def test_each_iteration_starts_with_the_first_pass_loras(context, first_passes):
    first, second = "a cat <lora:tiny-lora:1>", "a cat <lora:tiny-lora-peft:0.5>"
    _, res = hires(context, first, second, n_iter=2)
    assert len(res.images) == 2
    for i, image in enumerate(res.images):
        alone, _ = hires(context, first, second, seed=11 + i)
        assert_pixels_close(np.asarray(image).astype(int), alone)
        hires(context, first, seed=11 + i)  # no hires prompt: the first pass's LoRAs throughout
    # each iteration's first pass is that of a request whose hires pass keeps the first pass's LoRAs
    n_iter_passes, alone_passes, plain_passes = first_passes[:2], first_passes[2::2], first_passes[3::2]
    for a, b, c in zip(n_iter_passes, alone_passes, plain_passes):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_styles_apply_to_the_hires_prompts_too(context):
    """A1111 applies the selected styles to the hires prompt and hires negative prompt as well."""
    from modules.prompting.styles import PromptStyle
    context.styles.save(PromptStyle("hr-style", "{prompt}, oil painting <lora:tiny-lora:1>", "lowres"))
    styled, res = hires(context, "a cat", hr_prompt="a dog", hr_negative_prompt="ugly", styles=["hr-style"])
    assert res.info["warnings"] == []
    by_hand, _ = hires(context, "a cat, oil painting <lora:tiny-lora:1>", negative_prompt="blurry, lowres",
                       hr_prompt="a dog, oil painting <lora:tiny-lora:1>", hr_negative_prompt="ugly, lowres")
    assert_pixels_close(styled, by_hand)
    unstyled_hr, _ = hires(context, "a cat, oil painting <lora:tiny-lora:1>", negative_prompt="blurry, lowres",
                           hr_prompt="a dog", hr_negative_prompt="ugly")
    assert not np.array_equal(styled, unstyled_hr)
