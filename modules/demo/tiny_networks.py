"""Tiny random LoRA and textual inversion files for the tiny checkpoint (tests and --demo).

- DIR/Lora/tiny-lora.safetensors: kohya layout (`lora_unet_*`, `lora_te_*`, `.alpha`) over every attention
  projection of the tiny UNet and text encoder, rank 4, seeded non-zero weights large enough that its
  effect on an image is plain to see;
- DIR/Lora/tiny-xl-lora.safetensors: the same for the tiny SDXL, in kohya's SDXL layout (`lora_te1_*`,
  `lora_te2_*`, UNet modules by their LDM names);
- DIR/Lora/tiny-sd2-lora.safetensors: the same for the tiny SD2 (kohya's SD2 names are SD1's: `lora_te_*` over
  the transformers layout of OpenCLIP), with kohya's `ss_v2` metadata;
- DIR/Lora/tiny-flux-lora.safetensors: a LoRA for the tiny FLUX in diffusers'/PEFT's layout
  (`transformer.<module>.lora_A/lora_B.weight`) over the transformer's attention projections;
- DIR/Lora/tiny-flux-kohya-lora.safetensors: one in kohya's FLUX layout (`lora_unet_double_blocks_0_img_attn_qkv`,
  BFL's joined q|k|v and q|k|v|mlp, `.alpha`) over every BFL linear layer, and CLIP-L's attention (`lora_te1_*`);
- DIR/embeddings/tiny-emb.safetensors: a 2-vector embedding (`emb_params`) for the tiny text encoder (width 32);
- DIR/embeddings/tiny-emb-pt.pt: a 1-vector embedding in A1111's own `.pt` layout (`string_to_param`);
- DIR/embeddings/tiny-emb-xl.safetensors: a 2-vector SDXL embedding (`clip_l` width 32, `clip_g` width 48)
  for the tiny SDXL checkpoint.
"""
from __future__ import annotations

from pathlib import Path

LORA_SUBDIR = "Lora"
EMBEDDINGS_SUBDIR = "embeddings"
TINY_LORA = "tiny-lora"
TINY_EMBEDDING = "tiny-emb"
TINY_EMBEDDING_PT = "tiny-emb-pt"
TINY_EMBEDDING_XL = "tiny-emb-xl"
TINY_XL_LORA = "tiny-xl-lora"  # not "tiny-lora-xl": searching "tiny-lora" should find one card
TINY_SD2_LORA = "tiny-sd2-lora"
TINY_FLUX_LORA = "tiny-flux-lora"
TINY_FLUX_KOHYA_LORA = "tiny-flux-kohya-lora"
_FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out")
LORA_RANK = 4
LORA_SEED = 10
EMBEDDING_SEED = 11

_UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def kohya_lora_state(components: dict, rank: int = LORA_RANK, seed: int = LORA_SEED, scale: float = 0.5) -> dict:
    """kohya-format LoRA tensors for the Linear layers of `components` that the targets name. With a
    second text encoder (SDXL) the names are kohya's SDXL ones: `lora_te1_`/`lora_te2_`, and the UNet's
    modules by their original LDM names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)."""
    import torch

    from modules.model_store.ldm_convert import unet_key_to_ldm
    g = torch.Generator("cpu").manual_seed(seed)
    state: dict = {}
    sdxl = "text_encoder_2" in components
    unet_config = dict(components["unet"].config)
    parts = [("lora_unet_", components["unet"], _UNET_TARGETS)]
    if sdxl:
        parts += [("lora_te1_text_model_", components["text_encoder"], _TE_TARGETS),
                  ("lora_te2_text_model_", components["text_encoder_2"], _TE_TARGETS)]
    else:
        parts += [("lora_te_text_model_", components["text_encoder"], _TE_TARGETS)]
    for prefix, model, targets in parts:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.endswith(targets):
                continue
            if sdxl and prefix == "lora_unet_":
                name = unet_key_to_ldm(name + ".weight", unet_config).removesuffix(".weight")
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def peft_lora_state(model, prefix: str, targets: tuple[str, ...], rank: int = LORA_RANK, seed: int = LORA_SEED,
                    scale: float = 0.5) -> dict:
    """diffusers/PEFT-layout LoRA tensors (`{prefix}.{module}.lora_A/lora_B.weight`, no alpha: scale 1) for the
    Linear layers of `model` the targets name."""
    import torch
    g = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            state[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
            state[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
    return state


def kohya_flux_lora_state(components: dict, rank: int = LORA_RANK, seed: int = LORA_SEED + 1,
                          scale: float = 0.3) -> dict:
    """kohya-layout FLUX LoRA tensors over the BFL layers of a FLUX transformer (`lora_unet_<bfl name>` with
    `.lora_down/.lora_up.weight` and `.alpha` = rank / 2) and CLIP-L's attention (`lora_te1_*`)."""
    import torch

    from modules.model_store import flux_files
    transformer = components["transformer"]
    bfl = flux_files.to_bfl(transformer.state_dict(), dict(transformer.config))
    g = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for key, weight in sorted(bfl.items()):
        if not key.endswith(".weight") or weight.ndim != 2:
            continue
        stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        state[stem + ".lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * scale
        state[stem + ".lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * scale
        state[stem + ".alpha"] = torch.tensor(rank / 2)
    for name, module in components["text_encoder"].named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_TE_TARGETS):
            stem = "lora_te1_text_model_" + name.removeprefix("text_model.").replace(".", "_")
            state[stem + ".lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
            state[stem + ".lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
            state[stem + ".alpha"] = torch.tensor(float(rank))
    return state


def make_tiny_extra_networks(dir: str | Path, components: dict | None = None) -> dict[str, Path]:
    """Write the tiny LoRA and embeddings under `dir` (kept when already written by this recipe version)."""
    import torch

    from modules.core.fileio import atomic_open
    from modules.demo import tiny_models
    root = Path(dir)
    paths = {
        TINY_LORA: root / LORA_SUBDIR / f"{TINY_LORA}.safetensors",
        TINY_XL_LORA: root / LORA_SUBDIR / f"{TINY_XL_LORA}.safetensors",
        TINY_SD2_LORA: root / LORA_SUBDIR / f"{TINY_SD2_LORA}.safetensors",
        TINY_FLUX_LORA: root / LORA_SUBDIR / f"{TINY_FLUX_LORA}.safetensors",
        TINY_FLUX_KOHYA_LORA: root / LORA_SUBDIR / f"{TINY_FLUX_KOHYA_LORA}.safetensors",
        TINY_EMBEDDING: root / EMBEDDINGS_SUBDIR / f"{TINY_EMBEDDING}.safetensors",
        TINY_EMBEDDING_PT: root / EMBEDDINGS_SUBDIR / f"{TINY_EMBEDDING_PT}.pt",
        TINY_EMBEDDING_XL: root / EMBEDDINGS_SUBDIR / f"{TINY_EMBEDDING_XL}.safetensors",
    }
    if not tiny_models._is_current(paths[TINY_LORA]):
        components = components or tiny_models.build_tiny_sd15(tiny_models.TINY_SEED)
        tiny_models._write_safetensors(paths[TINY_LORA], kohya_lora_state(components),
                                       {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK)})
    if not tiny_models._is_current(paths[TINY_XL_LORA]):
        tiny_models._write_safetensors(paths[TINY_XL_LORA], kohya_lora_state(tiny_models.build_tiny_sdxl()),
                                       {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
                                        "ss_base_model_version": "sdxl_base_v1-0"})
    if not tiny_models._is_current(paths[TINY_SD2_LORA]):
        tiny_models._write_safetensors(paths[TINY_SD2_LORA], kohya_lora_state(tiny_models.build_tiny_sd2()),
                                       {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
                                        "ss_v2": "True", "ss_base_model_version": "sd_v2"})
    if not tiny_models._is_current(paths[TINY_FLUX_LORA]):
        from modules.demo.tiny_flow import build_tiny_flux
        tiny_models._write_safetensors(paths[TINY_FLUX_LORA],
                                       peft_lora_state(build_tiny_flux()["transformer"], "transformer", _FLUX_TARGETS),
                                       {"ss_base_model_version": "flux1"})
    if not tiny_models._is_current(paths[TINY_FLUX_KOHYA_LORA]):
        from modules.demo.tiny_flow import build_tiny_flux
        tiny_models._write_safetensors(paths[TINY_FLUX_KOHYA_LORA], kohya_flux_lora_state(build_tiny_flux()),
                                       {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(LORA_RANK),
                                        "ss_base_model_version": "flux1"})
    dim = tiny_models.TINY_TEXT_ENCODER["hidden_size"]
    g = torch.Generator("cpu").manual_seed(EMBEDDING_SEED)
    emb = torch.randn(2, dim, generator=g)
    if not tiny_models._is_current(paths[TINY_EMBEDDING]):
        tiny_models._write_safetensors(paths[TINY_EMBEDDING], {"emb_params": emb}, {})
    if not tiny_models._is_current(paths[TINY_EMBEDDING_XL]):
        g_xl = torch.Generator("cpu").manual_seed(EMBEDDING_SEED + 1)
        xl = {"clip_l": torch.randn(2, tiny_models.TINY_SDXL_TEXT_ENCODER["hidden_size"], generator=g_xl),
              "clip_g": torch.randn(2, tiny_models.TINY_SDXL_TEXT_ENCODER_2["hidden_size"], generator=g_xl)}
        tiny_models._write_safetensors(paths[TINY_EMBEDDING_XL], xl, {})
    if not paths[TINY_EMBEDDING_PT].exists():
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, dim, generator=g)},
                "name": TINY_EMBEDDING_PT, "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None}
        with atomic_open(paths[TINY_EMBEDDING_PT], "wb") as f:
            torch.save(data, f)
    preview = paths[TINY_LORA].with_suffix(".png")  # the picture A1111 shows on the LoRA's card
    if not preview.exists():
        from PIL import Image
        picture = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
        with atomic_open(preview, "wb") as f:
            picture.save(f, format="PNG")
    return paths
