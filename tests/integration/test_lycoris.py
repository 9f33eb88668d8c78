"""LyCORIS files (LoHa, LoKr, LoCon with a CP core, full diffs) under kohya names: merged into the checkpoint's
weights exactly as PEFT's own LoHa/LoKr layers merge them (PEFT implements LyCORIS' formulas), applied by
`<lora:...>` like any LoRA, and removed bit for bit."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules import generation, networks
from modules.model_store import checkpoints, loading
from tests.images import assert_pixels_close

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["conv1", "conv2"]  # the resnets' 3x3 convolutions: LyCORIS' conv path (CP cores with effective conv)


@pytest.fixture(scope="module")
def checkpoint(tiny_models):
    registry = checkpoints.CheckpointRegistry([tiny_models / "Stable-diffusion"], [], None)
    registry.refresh()
    return loading.load_checkpoint(registry.find("tiny-sd15.safetensors"))


def peft_lyco(unet, config) -> tuple[dict, dict]:
    """(kohya-named LyCORIS tensors, the UNet weights PEFT's merge_and_unload gives) for a random adapter."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model
    model = copy.deepcopy(unet)
    torch.manual_seed(0)
    model = inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    lyco = {}
    for key, tensor in state.items():
        module, _, role = key.rpartition(".")
        lyco[f"lora_unet_{module.replace('.', '_')}.{role}"] = tensor.detach().clone().contiguous()
    for module in {k.rpartition(".")[0] for k in state}:
        lyco[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(float(config.alpha))
    for _, layer in model.named_modules():
        if hasattr(layer, "merge") and hasattr(layer, "get_base_layer"):
            layer.merge()
    merged = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "get_base_layer"):
            merged[name] = layer.get_base_layer().weight.detach().clone()
    return lyco, merged


def merge_ours(checkpoint, path):
    from modules.model_store import sd_pipelines
    bundle = sd_pipelines.CheckpointBundle(checkpoint)
    weights = networks.load_lora(path)
    info = networks.LoraInfo(name=path.stem, path=path, alias=path.stem)
    unet = bundle.components["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    warnings: list[str] = []
    with networks.applied_loras(bundle, [networks.AppliedLora(info, 1.0, 1.0, weights)], warnings):
        during = {k: v.clone() for k, v in unet.state_dict().items()}
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored exactly"
    return weights, during, before, warnings


def configs():
    from peft import LoHaConfig, LoKrConfig
    return {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=ATTENTION, init_weights=False),
        "loha-cp": LoHaConfig(r=4, alpha=2, target_modules=CONVS, use_effective_conv2d=True, init_weights=False),
        "lokr": LoKrConfig(r=2, alpha=4, target_modules=ATTENTION, init_weights=False),
        "lokr-conv": LoKrConfig(r=2, alpha=4, target_modules=CONVS, init_weights=False),
    }


@pytest.mark.parametrize("name", ["loha", "loha-cp", "lokr", "lokr-conv"])
def test_lyco_merge_equals_peft(checkpoint, tmp_path, name):
    config = configs()[name]
    lyco, peft_merged = peft_lyco(checkpoint.components["unet"], config)
    path = tmp_path / f"{name}.safetensors"
    save_file(lyco, str(path))
    weights, ours, before, warnings = merge_ours(checkpoint, path)
    assert warnings == [] and not weights.unknown_keys
    kinds = {m.kind for m in weights.modules["unet"].values()}
    assert kinds == {name.split("-")[0]}
    if name == "loha-cp":
        assert all("hada_t1" in m.tensors for m in weights.modules["unet"].values())
    assert len(peft_merged) == len(weights.modules["unet"]) > 0
    for module, merged in peft_merged.items():
        key = module + ".weight"
        assert not torch.equal(ours[key], before[key]), key
        torch.testing.assert_close(ours[key], merged, rtol=1e-5, atol=1e-6, msg=key)


def test_locon_cp_and_full_diff_follow_a1111(checkpoint, tmp_path):
    """LoCon's CP form (lora_down [r,in,1,1], lora_mid [r,r,k,k], lora_up [out,r,1,1]) and a full `diff`."""
    unet = checkpoint.components["unet"]
    conv = "down_blocks.0.resnets.0.conv1"
    linear = "down_blocks.0.attentions.0.proj_in"
    w_conv = dict(unet.named_modules())[conv].weight
    w_lin = dict(unet.named_modules())[linear].weight
    g = torch.Generator().manual_seed(3)
    out_c, in_c, k, _ = w_conv.shape
    r = 4
    down = torch.randn(r, in_c, 1, 1, generator=g)
    mid = torch.randn(r, r, k, k, generator=g)
    up = torch.randn(out_c, r, 1, 1, generator=g)
    diff = torch.randn(w_lin.shape, generator=g) * 0.1
    conv_key, lin_key = "lora_unet_" + conv.replace(".", "_"), "lora_unet_" + linear.replace(".", "_")
    path = tmp_path / "locon.safetensors"
    save_file({f"{conv_key}.lora_down.weight": down, f"{conv_key}.lora_mid.weight": mid,
               f"{conv_key}.lora_up.weight": up, f"{conv_key}.alpha": torch.tensor(2.0),
               f"{lin_key}.diff": diff}, str(path))
    weights, ours, before, warnings = merge_ours(checkpoint, path)
    assert warnings == []
    # the CP rebuild written out independently: up . mid . down per output/input channel and kernel position
    rebuilt = torch.zeros_like(w_conv)
    for i in range(out_c):
        for j in range(in_c):
            rebuilt[i, j] = torch.einsum("n,nmkl,m->kl", up[i, :, 0, 0], mid, down[:, j, 0, 0])
    torch.testing.assert_close(ours[conv + ".weight"], before[conv + ".weight"] + rebuilt * (2.0 / r),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[linear + ".weight"], before[linear + ".weight"] + diff, rtol=0, atol=1e-6)


def test_lyco_tag_in_txt2img(checkpoint, tiny_models, tmp_path):
    """A LoHa file is used by `<lora:NAME:W>` like any LoRA: no warning, its hash in the infotext, weight 0
    is exactly the image without it, and nothing is left behind."""
    lyco, _ = peft_lyco(checkpoint.components["unet"], configs()["loha"])
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    save_file({k: v * 3 for k, v in lyco.items()}, str(lora_dir / "tiny-loha.safetensors"))
    ctx = generation.local_context([tiny_models / "Stable-diffusion"], tmp_path, lora_dirs=[lora_dir])

    def run(prompt):
        req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, seed=4,
                                                            save_images=False))
        res = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": "tiny-sd15", "return_grid": False})
        return np.asarray(res.images[0]).astype(int), res

    plain, _ = run("a cat")
    with_lyco, res = run("a cat <lora:tiny-loha:1>")
    assert res.info["warnings"] == [] and 'Lora hashes: "tiny-loha: ' in res.infotexts[0]
    assert np.abs(with_lyco - plain).mean() > 1
    assert_pixels_close(run("a cat <lora:tiny-loha:0>")[0], plain)
    assert_pixels_close(run("a cat")[0], plain)


def test_unreadable_kinds_in_a_lora_file_are_named_in_a_warning(checkpoint, tiny_models, tmp_path):
    """DoRA's dora_scale (not read here) next to plain LoRA weights: the LoRA part is applied, and the answer
    says that some tensors were left out."""
    from safetensors.torch import load_file
    state = load_file(str(tiny_models / "Lora" / "tiny-lora.safetensors"))
    first = next(k for k in state if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    state[f"{first}.dora_scale"] = torch.ones(1, 4)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    save_file(state, str(lora_dir / "mixed.safetensors"))
    ctx = generation.local_context([tiny_models / "Stable-diffusion"], tmp_path, lora_dirs=[lora_dir])
    req = generation.validate(generation.Txt2ImgRequest(prompt="a cat <lora:mixed:1>", steps=2, width=64,
                                                        height=64, seed=4, save_images=False))
    res = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": "tiny-sd15", "return_grid": False})
    assert 'Lora hashes: "mixed: ' in res.infotexts[0]
    assert any("<lora:mixed>: 1 of its tensors" in w and "dora_scale" in w for w in res.info["warnings"])


def test_malformed_lyco_layers_are_skipped_with_a_warning(checkpoint, tmp_path):
    """Factors that do not chain (rank 4 against rank 3) or a LoHa whose halves differ: those layers are
    skipped and said to be, the rest applies, and nothing raises inside the request."""
    unet = checkpoint.components["unet"]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    good = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    out_f, in_f = dict(unet.named_modules())[name].weight.shape
    key, good_key = "lora_unet_" + name.replace(".", "_"), "lora_unet_" + good.replace(".", "_")
    g = torch.Generator().manual_seed(5)
    path = tmp_path / "bad.safetensors"
    save_file({f"{key}.hada_w1_a": torch.randn(out_f, 4, generator=g), f"{key}.hada_w1_b": torch.randn(3, in_f),
               f"{key}.hada_w2_a": torch.randn(out_f, 4), f"{key}.hada_w2_b": torch.randn(4, in_f),
               f"{good_key}.hada_w1_a": torch.randn(out_f, 2), f"{good_key}.hada_w1_b": torch.randn(2, in_f),
               f"{good_key}.hada_w2_a": torch.randn(out_f, 2), f"{good_key}.hada_w2_b": torch.randn(2, in_f)},
              str(path))
    weights, ours, before, warnings = merge_ours(checkpoint, path)
    assert warnings == ["LoRA bad: 1 of its layers do not match this checkpoint and were skipped"]
    assert torch.equal(ours[name + ".weight"], before[name + ".weight"])
    assert not torch.equal(ours[good + ".weight"], before[good + ".weight"])
