"""LoRA and embeddings in txt2img: applied per request only, cached by the manager, named in the infotext."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modules import extra_networks, generation, sd_models
from modules.model_manager import ModelManager
from modules.styles import StyleDatabase


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
    (lora / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return root


def unet_modules(tiny_models):
    from modules.tiny_models import build_tiny_sd15
    unet = build_tiny_sd15()["unet"]
    return [(n.replace(".", "_"), n) for n, _ in unet.named_modules()]


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
    out = tmp_path_factory.mktemp("lora-out")
    registry = sd_models.CheckpointRegistry([tiny_models / "Stable-diffusion"], [], sd_models.HashCache(out / "c.json"))
    registry.refresh()
    nets = extra_networks.ExtraNetworks([folders / "Lora"], [tiny_models / "embeddings"])
    return generation.GenerationContext(registry=registry, manager=ModelManager("cpu", 0, 8 * 2**30),
                                        styles=StyleDatabase(out / "styles.csv"), outputs_root=out, networks=nets)


def run(context, prompt, negative_prompt="blurry"):
    req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, steps=4,
                                                        width=64, height=64, seed=11, save_images=False))
    res = generation.run_txt2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors"})
    return np.asarray(res.images[0]).astype(int), res


def test_a_lora_changes_the_image_for_that_request_only(context, base):
    with_lora, res = run(context, "a cat <lora:tiny-lora:1>")
    assert np.abs(with_lora - base).mean() > 5  # plainly visible
    after, _ = run(context, "a cat")
    np.testing.assert_array_equal(after, base)  # exact removal: nothing leaks into the next request
    zero, _ = run(context, "a cat <lora:tiny-lora:0>")
    np.testing.assert_array_equal(zero, base)
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


def test_two_loras_at_once(context):
    one, _ = run(context, "a cat <lora:tiny-lora:0.5>")
    two, res = run(context, "a cat <lora:tiny-lora:0.5> <lora:tiny-lora-peft:0.5>")
    full, _ = run(context, "a cat <lora:tiny-lora:1>")
    assert np.abs(two - full).max() <= 1 and np.abs(two - one).mean() > 1  # the deltas add up
    assert "tiny-lora: " in res.info["extra_generation_params"]["Lora hashes"]
    assert "tiny-lora-peft: " in res.info["extra_generation_params"]["Lora hashes"]


@pytest.mark.parametrize("tag,why", [
    ("<lora:nope:1>", "no LoRA named 'nope'"),
    ("<lora:tiny-lora:abc>", "'abc' is not a number"),
    ("<lora:broken:1>", "cannot read broken.safetensors"),
    ("<hypernet:x:1>", "unknown extra network type 'hypernet'"),
])
def test_bad_tags_still_make_the_image_and_say_why(context, base, tag, why):
    image, res = run(context, f"a cat {tag}")
    np.testing.assert_array_equal(image, base)
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
    np.testing.assert_array_equal(run(context, "[a cat|a cat]")[0], base)  # through the switch, same tensors
    np.testing.assert_array_equal(run(context, "[a cat:a dog:3]")[0], base)  # steps 0..3 of 4: all "a cat"
    np.testing.assert_array_equal(run(context, "a cat AND a dog :0")[0], base)
    mixed = run(context, "a cat :0.5 AND (a dog:1.4) :0.5")[0]
    assert np.abs(mixed - base).mean() > 0.5 and 0 < mixed.mean() < 255
