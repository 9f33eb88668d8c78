"""diffusers -> LDM writer: what it writes loads back, through this project's loader and through plain
diffusers, into exactly the original tensors; and the full-size SD1.5 layout matches the reference."""
import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from modules.core.paths import SD_CONFIGS_DIR
from modules.demo.tiny_models import build_tiny_sd15, write_tiny_single_file
from modules.model_store.checkpoints import CheckpointInfo
from modules.model_store.ldm_convert import (
    diffusers_to_ldm,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from modules.model_store.loading import checkpoint_config_dir, load_checkpoint
from modules.prompting.clip_tokenizer import clip_tokenizer


def assert_same_tensors(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd15(seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm") / "tiny.safetensors"
    write_tiny_single_file(path, tiny)
    return path


def test_round_trip_through_project_loader(tiny, tiny_file):
    info = CheckpointInfo(filename=str(tiny_file), name=tiny_file.name, model_name="tiny")
    loaded = load_checkpoint(info)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_tensors(tiny[name], loaded.components[name])


def test_round_trip_through_plain_diffusers(tiny, tiny_file):
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_file),
        config=str(checkpoint_config_dir(tiny_file)),
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        local_files_only=True,
    )
    for name in ("unet", "vae", "text_encoder"):
        assert_same_tensors(tiny[name], getattr(pipe, name))


def test_other_block_layouts_round_trip(tmp_path):
    """Attention in the deeper blocks only (as diffusers' tests do), three levels, one layer per
    block, a VAE with three levels: the index arithmetic must not assume SD's shape."""
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=8,
    ).eval()
    for name, model in (("unet", unet), ("vae", vae)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(model.to_json_string())

    state = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config))}
    # The upsampler of an attention up block sits after the attention (slot 2), else at slot 1.
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in state
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in state
    path = tmp_path / "layout.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    unet_back = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path), subfolder="unet",
                                                      local_files_only=True)
    vae_back = AutoencoderKL.from_single_file(str(path), config=str(tmp_path), subfolder="vae",
                                              local_files_only=True)
    assert_same_tensors(unet, unet_back)
    assert_same_tensors(vae, vae_back)


def test_full_size_sd15_layout_on_meta_device():
    config_dir = SD_CONFIGS_DIR / "sd1"
    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    state = diffusers_to_ldm(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), unet_config=unet_config, vae_config=vae_config
    )
    # The key counts of a real SD 1.5 single file (without position_ids / EMA / schedule buffers).
    assert sum(k.startswith("model.diffusion_model.") for k in state) == 686
    assert sum(k.startswith("first_stage_model.") for k in state) == 248
    assert sum(k.startswith("cond_stage_model.transformer.text_model.") for k in state) == 196
    assert len(state) == 1130
    assert infer_diffusers_model_type(state) == "v1"
    # Well-known LDM names land where the real checkpoints have them, with their shapes.
    assert state["model.diffusion_model.input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert state["model.diffusion_model.output_blocks.8.2.conv.weight"].shape == (640, 640, 3, 3)
    assert state["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)

    # diffusers' own LDM -> diffusers converters map every written key back to the model's keys.
    unet_back = convert_ldm_unet_checkpoint(state, dict(unet_config))
    vae_back = convert_ldm_vae_checkpoint(state, dict(vae_config))
    for original, back in ((unet.state_dict(), unet_back), (vae.state_dict(), vae_back)):
        assert back.keys() == original.keys()
        assert all(back[k].shape == original[k].shape for k in back)


def test_text_encoder_prefix_spellings():
    tensor = torch.zeros(1)
    flat = text_encoder_to_ldm({"embeddings.token_embedding.weight": tensor})
    wrapped = text_encoder_to_ldm({"text_model.embeddings.token_embedding.weight": tensor})
    assert flat == wrapped == {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": tensor}


def test_unknown_keys_are_errors(tiny):
    unet_config = dict(tiny["unet"].config)
    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm({"class_embedding.linear_1.weight": torch.zeros(1)}, unet_config)
    with pytest.raises(ValueError, match="encoder.mystery"):
        vae_to_ldm({"encoder.mystery.weight": torch.zeros(1)}, dict(tiny["vae"].config))


def test_metadata_configs_describe_the_written_models(tiny_file, tiny):
    from modules.model_store.checkpoint_files import read_safetensors_metadata

    configs = json.loads(read_safetensors_metadata(tiny_file)["diffusers_configs"])
    assert set(configs) == {"unet", "vae", "text_encoder", "scheduler"}
    assert configs["unet"]["block_out_channels"] == [32, 64]
    assert configs["vae"]["block_out_channels"] == [16, 32, 32, 32]
    assert configs["text_encoder"]["hidden_size"] == 32
    assert configs["scheduler"]["_class_name"] == "PNDMScheduler"


@pytest.fixture(scope="module")
def tiny_xl():
    from modules.demo.tiny_models import build_tiny_sdxl
    return build_tiny_sdxl()


def test_sdxl_layout_round_trips_through_plain_diffusers(tiny_xl, tmp_path):
    """The SDXL writer's file (CLIP-L as conditioner.embedders.0, OpenCLIP-G as .1, label_emb) loads back
    through diffusers' own single-file code into exactly the original tensors."""
    from diffusers import StableDiffusionXLPipeline
    path = tmp_path / "tiny-xl.safetensors"
    write_tiny_single_file(path, tiny_xl)
    from safetensors.torch import load_file
    state = load_file(str(path))
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 32)  # [hidden, projection]
    assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(checkpoint_config_dir(path)), tokenizer=tiny_xl["tokenizer"],
        tokenizer_2=tiny_xl["tokenizer_2"], add_watermarker=False, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_tensors(tiny_xl[name], getattr(pipe, name))


def test_open_clip_writer_rejects_unknown_and_incomplete_keys():
    from modules.model_store.ldm_convert import open_clip_to_ldm
    with pytest.raises(ValueError, match="mystery"):
        open_clip_to_ldm({"text_model.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="q/k/v"):
        open_clip_to_ldm({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
