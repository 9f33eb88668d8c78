"""Checkpoints on disk: shipped configs, architecture detection, safe reading, hashes, the registry and
loading into pipeline components."""
import hashlib
import inspect
import json
import os
import pickle
import threading

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from modules.core.paths import SD_CONFIGS_DIR
from modules.model_store import checkpoint_files, hashing, loading
from modules.model_store.checkpoint_files import (
    UNET_INPUT_KEY,
    CheckpointError,
    ModelArch,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    detect_architecture,
    load_state_dict,
    read_safetensors_metadata,
    read_safetensors_shapes,
)
from modules.model_store.checkpoints import CheckpointInfo, CheckpointRegistry
from modules.model_store.hashing import HashCache
from modules.model_store.loading import checkpoint_config_dir, load_checkpoint

FAMILY_FOLDERS = ["sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-inpainting"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- shipped configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, unet_params, text_params, text2_params",
    [
        ("sd1", 859_520_964, 123_060_480, None),
        ("sd1-inpainting", 859_535_364, 123_060_480, None),  # + 5 extra input channels of conv_in
        ("sd2", 865_910_724, 340_387_840, None),  # OpenCLIP ViT-H text tower, 23 of its 24 layers
        ("sd2-inpainting", 865_925_124, 340_387_840, None),
        ("sdxl", 2_567_463_684, 123_060_480, 694_659_840),  # CLIP-L + OpenCLIP bigG with projection
        ("sdxl-inpainting", 2_567_478_084, 123_060_480, 694_659_840),
    ],
)
def test_shipped_configs_have_the_published_sizes(family, unet_params, text_params, text2_params):
    folder = SD_CONFIGS_DIR / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
            if text2_params
            else None
        )
    assert count(unet) == unet_params
    assert count(vae) == 83_653_863
    assert count(text_encoder) == text_params
    assert (count(text_encoder_2) if text_encoder_2 else None) == text2_params
    assert unet.config.in_channels == (9 if "inpainting" in family else 4)


@pytest.mark.parametrize("family", FAMILY_FOLDERS)
def test_shipped_config_folders_are_complete_and_tokenizer_free(family):
    folder = SD_CONFIGS_DIR / family
    index = json.loads((folder / "model_index.json").read_text())
    for component, (library, _cls) in ((k, v) for k, v in index.items() if isinstance(v, list)):
        if library is None:
            continue
        if component.startswith("tokenizer"):
            assert not (folder / component).exists()  # tokenizers come from clip_tokenizer()
        elif component == "scheduler":
            assert (folder / "scheduler" / "scheduler_config.json").is_file()
        else:
            assert (folder / component / "config.json").is_file(), component
    # The folders describe themselves: detection on them names the same folder.
    assert detect_architecture(folder).config_name == family


def test_shipped_sd2_is_768_v_and_sd1_scheduler_is_sd15s():
    assert detect_architecture(SD_CONFIGS_DIR / "sd2") == ModelArch("sd2", False, "v_prediction")
    sched = json.loads((SD_CONFIGS_DIR / "sd1" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert (sched["steps_offset"], sched["skip_prk_steps"], sched["set_alpha_to_one"]) == (1, True, False)


def test_bpe_file_has_its_license_note():
    note = (SD_CONFIGS_DIR / "LICENSE-bpe_simple_vocab_16e6.txt").read_text()
    assert "MIT License" in note and "OpenAI" in note


# --- architecture detection -------------------------------------------------------------------------

SD1_TE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TE = "cond_stage_model.model.token_embedding.weight"
XL_TE1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
XL_TE2 = "conditioner.embedders.1.model.token_embedding.weight"


def shapes(te_keys, in_channels=4, **extra):
    result = {UNET_INPUT_KEY: (320, in_channels, 3, 3), **{k: (49408, 768) for k in te_keys}}
    result.update(extra)
    return result


@pytest.mark.parametrize(
    "state, expected",
    [
        (shapes([SD1_TE]), ModelArch("sd1", False, "epsilon")),
        (shapes([SD1_TE], 9), ModelArch("sd1", True, "epsilon")),
        (shapes([SD2_TE]), ModelArch("sd2", False, "v_prediction")),
        (shapes([SD2_TE], 9), ModelArch("sd2", True, "epsilon")),
        (shapes([XL_TE1, XL_TE2]), ModelArch("sdxl", False, "epsilon")),
        (shapes([XL_TE1, XL_TE2], 9), ModelArch("sdxl", True, "epsilon")),
        (shapes([XL_TE1, XL_TE2], v_pred=()), ModelArch("sdxl", False, "v_prediction")),
        (shapes([SD1_TE], v_pred=()), ModelArch("sd1", False, "v_prediction")),
    ],
)
def test_detect_architecture_from_shapes(state, expected):
    assert detect_architecture(state) == expected
    assert expected.config_name in FAMILY_FOLDERS


def test_detect_accepts_tensors_and_modelspec_metadata():
    state = {UNET_INPUT_KEY: torch.zeros(320, 4, 3, 3), SD2_TE: torch.zeros(1)}
    assert detect_architecture(state).prediction_type == "v_prediction"
    base = {"modelspec.architecture": "stable-diffusion-v2-512"}
    assert detect_architecture(state, metadata=base).prediction_type == "epsilon"
    assert detect_architecture(state, metadata={"modelspec.prediction_type": "epsilon"}).prediction_type == "epsilon"
    assert detect_architecture(shapes([SD1_TE]), metadata={"modelspec.prediction_type": "v"}).prediction_type == (
        "v_prediction"
    )


@pytest.mark.parametrize(
    "state, message",
    [
        ({"lora_unet_down_blocks_0.alpha": ()}, "LoRA"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE"),
        (shapes([SD1_TE], 8), "instruct-pix2pix"),
        (shapes(["conditioner.embedders.0.model.token_embedding.weight"]), "refiner"),
        (shapes([]), "no text encoder"),
    ],
)
def test_unsupported_checkpoints_say_why(state, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        detect_architecture(state)
    assert issubclass(UnsupportedCheckpointError, ValueError)


def test_sd2_prediction_from_weights():
    v_like = {checkpoint_files.SD2_V_STATISTIC_KEY: torch.linspace(-0.5, 0.5, 1280)}
    base_like = {checkpoint_files.SD2_V_STATISTIC_KEY: torch.linspace(-0.05, 0.05, 1280)}
    assert checkpoint_files.sd2_prediction(v_like, None) == "v_prediction"
    assert checkpoint_files.sd2_prediction(base_like, None) == "epsilon"
    assert checkpoint_files.sd2_prediction(v_like, checkpoint_files.SD2_BASE_GLOBAL_STEP) == "epsilon"
    assert checkpoint_files.sd2_prediction({}, None) is None


# --- reading files ----------------------------------------------------------------------------------


def test_safetensors_header_only(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(5)}, str(path), metadata={"k": "v"})
    # Cut off most tensor data: the header alone must be enough.
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 16)
    assert read_safetensors_shapes(path) == {"a": (2, 3), "b": (5,)}
    assert read_safetensors_metadata(path) == {"k": "v"}


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 4, (10**12).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"],
)
def test_bad_safetensors_headers_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        read_safetensors_shapes(path)


def test_load_state_dict_formats(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": tensors, "global_step": 7, "epoch": 1}, tmp_path / "m.ckpt")
    torch.save(tensors, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.ckpt", "m.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    _, extras = checkpoint_files.load_state_dict_and_extras(tmp_path / "m.ckpt")
    assert extras["global_step"] == 7


class _CreatesFileWhenUnpickled:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1), "x": _CreatesFileWhenUnpickled(str(marker))}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    # Sanity: the payload really does create the file when unpickled without protection.
    if writer == "raw pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()
    info = CheckpointInfo(filename=str(path), name=path.name, model_name="evil")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(info)
    assert not marker.exists()


# --- hashes -----------------------------------------------------------------------------------------


@pytest.fixture
def count_hashing(monkeypatch):
    calls = []
    real = hashing.sha256_of_file

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(hashing, "sha256_of_file", counting)
    return calls


def test_hash_cache(tmp_path, count_hashing):
    data = tmp_path / "model.safetensors"
    data.write_bytes(b"A" * 3_000_000)  # more than one read chunk
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    cache = HashCache(tmp_path / "cache" / "hashes.json")

    assert cache.peek(data) is None
    assert cache.sha256(data) == expected
    assert cache.autov2(data) == expected[:10]
    assert cache.peek(data) == expected
    assert len(count_hashing) == 1

    # Same size and mtime: the cached value is trusted and the file is not read again.
    st = data.stat()
    data.write_bytes(b"B" * 3_000_000)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(data) == expected
    assert len(count_hashing) == 1

    # Persisted (atomically: no temp files left) and reused by a new instance.
    saved = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert saved["files"][str(data.resolve())]["sha256"] == expected
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hashes.json"]
    assert HashCache(tmp_path / "cache" / "hashes.json").sha256(data) == expected
    assert len(count_hashing) == 1

    # A new mtime means new contents: recomputed.
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.sha256(data) == hashlib.sha256(b"B" * 3_000_000).hexdigest()
    assert len(count_hashing) == 2


def test_hash_cache_threads_hash_once(tmp_path, count_hashing):
    data = tmp_path / "m.ckpt"
    data.write_bytes(os.urandom(2_000_000))
    cache = HashCache(tmp_path / "hashes.json")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.sha256(data))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [hashlib.sha256(data.read_bytes()).hexdigest()] * 8
    assert len(count_hashing) == 1


def test_corrupt_hash_cache_is_ignored(tmp_path):
    (tmp_path / "hashes.json").write_text("{not json")
    data = tmp_path / "f.bin"
    data.write_bytes(b"x")
    assert HashCache(tmp_path / "hashes.json").sha256(data) == hashlib.sha256(b"x").hexdigest()


# --- registry ---------------------------------------------------------------------------------------


@pytest.fixture
def model_tree(tmp_path):
    root = tmp_path / "Stable-diffusion"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"a-weights")
    (root / "sub" / "b.ckpt").write_bytes(b"b-weights")
    (root / "sub" / "notes.txt").write_text("not a model")
    (root / "pipe" / "unet").mkdir(parents=True)
    (root / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet-weights")
    (root / ".trash").mkdir()
    (root / ".trash" / "old.safetensors").write_bytes(b"old")
    extra = tmp_path / "elsewhere" / "Extra.ckpt"
    extra.parent.mkdir()
    extra.write_bytes(b"extra-weights")
    return root, extra


def test_registry_lists_and_finds(tmp_path, model_tree, count_hashing):
    root, extra = model_tree
    registry = CheckpointRegistry([root], [extra], HashCache(tmp_path / "hashes.json"))
    items = registry.list()
    assert [i.name for i in items] == ["a.safetensors", "Extra.ckpt", "pipe", "sub/b.ckpt"]
    assert [i.model_name for i in items] == ["a", "Extra", "pipe", "sub/b"]
    assert [i.is_diffusers_folder for i in items] == [False, False, True, False]
    assert all(os.path.isabs(i.filename) for i in items)
    assert count_hashing == []  # listing never hashes
    assert [i.display_title for i in items] == [i.name for i in items]

    b = registry.find("sub/b.ckpt")
    assert b.filename == str((root / "sub" / "b.ckpt").absolute())
    assert b.sha256 == hashlib.sha256(b"b-weights").hexdigest()
    assert b.shorthash == b.sha256[:10]
    assert b.title == f"sub/b.ckpt [{b.shorthash}]"
    assert b.display_title == b.title

    for text in (b.title, "sub/b.ckpt", "sub/b", "b.ckpt", "b", "SUB/B.CKPT", "sub\\b.ckpt", b.shorthash,
                 b.sha256, b.filename, f"  {b.title}  "):
        assert registry.find(text) is b, text
    # A title whose hash went stale (file re-saved) still finds the file by its name.
    assert registry.find("sub/b.ckpt [0123456789]") is b
    a = registry.find("a")
    # An unknown hash is found by hashing the files not hashed yet.
    assert registry.find(hashlib.sha256(b"a-weights").hexdigest()[:10]) is a
    assert registry.find("Extra") is registry.find("Extra.ckpt") is not None
    for missing in ("nope", "", None, "deadbeef00", "old"):
        assert registry.find(missing) is None


def test_registry_refresh_and_diffusers_folder_hash(tmp_path, model_tree):
    root, _ = model_tree
    registry = CheckpointRegistry([root], [], HashCache(tmp_path / "hashes.json"))
    pipe = registry.find("pipe")
    expected = hashlib.sha256(
        (hashlib.sha256(b'{"_class_name": "StableDiffusionPipeline"}').hexdigest()
         + hashlib.sha256(b"unet-weights").hexdigest()).encode()
    ).hexdigest()
    assert pipe.sha256 == expected
    assert [f.name for f in pipe.hash_files()] == ["model_index.json", "diffusion_pytorch_model.safetensors"]

    # A link back up the tree (users link model folders in) must not make the scan loop.
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    assert [i.name for i in registry.refresh()] == ["a.safetensors", "pipe", "sub/b.ckpt"]

    (root / "new.ckpt").write_bytes(b"new")
    (root / "a.safetensors").unlink()
    assert registry.find("new") is None  # not until a refresh
    registry.refresh()
    assert registry.find("new") is not None
    assert registry.find("a") is None


# --- loading ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny_models):
    # tiny_models (tests/conftest.py): the set made once per test run by modules.demo.tiny_models.
    return tiny_models / "Stable-diffusion"


def info_for(path):
    return CheckpointInfo(filename=str(path), name=path.name, model_name=path.stem)


def required_and_accepted(pipeline_cls):
    params = inspect.signature(pipeline_cls.__init__).parameters
    accepted = {n for n in params if n != "self"}
    required = {n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
    return required, accepted


def test_components_are_exactly_pipeline_keywords(tiny_dir):
    loaded = load_checkpoint(info_for(tiny_dir / "tiny-sd15.safetensors"))
    required, accepted = required_and_accepted(StableDiffusionPipeline)
    assert required <= set(loaded.components) <= accepted
    assert loaded.components["safety_checker"] is None
    assert loaded.components["requires_safety_checker"] is False
    for value in loaded.components.values():
        if isinstance(value, torch.nn.Module):
            assert not value.training
            assert {p.device.type for p in value.parameters()} == {"cpu"}
    _, xl_accepted = required_and_accepted(StableDiffusionXLPipeline)
    assert set(loading.pipeline_extras(ModelArch("sdxl", False, "epsilon"))) <= xl_accepted


def test_dtypes(tiny_dir):
    source = tiny_dir / "tiny-sd15.safetensors"
    a = load_checkpoint(info_for(source))
    b = load_checkpoint(info_for(source), torch_dtype=torch.float16, vae_dtype=torch.float32)
    assert next(a.components["unet"].parameters()).dtype == torch.float32
    assert next(b.components["unet"].parameters()).dtype == torch.float16
    assert next(b.components["text_encoder"].parameters()).dtype == torch.float16
    assert next(b.components["vae"].parameters()).dtype == torch.float32
    assert torch.equal(a.components["vae"].decoder.conv_out.weight, b.components["vae"].decoder.conv_out.weight)


def test_ckpt_without_configs_uses_shipped_config_and_fails_clearly_on_wrong_shapes(tiny_dir, tmp_path):
    source = tiny_dir / "tiny-sd15.safetensors"
    reference = load_file(str(source))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": reference, "global_step": 1}, ckpt)
    state = load_state_dict(ckpt)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    # No embedded configs in a .ckpt: the shipped SD 1.5 config is used, and tiny shapes do not fit it.
    assert detect_architecture(ckpt) == ModelArch("sd1", False, "epsilon")
    with pytest.raises(CheckpointError, match="Cannot load the UNet of tiny.ckpt as sd1"):
        load_checkpoint(info_for(ckpt))


def test_incomplete_checkpoint_is_a_clear_error(tiny_dir, tmp_path):
    source = tiny_dir / "tiny-sd15.safetensors"
    state = load_file(str(source))
    del state["model.diffusion_model.out.2.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=read_safetensors_metadata(source))
    with pytest.raises(CheckpointError, match="UNet weights are incomplete"):
        load_checkpoint(info_for(broken))


def test_diffusers_configs_metadata_cannot_name_other_paths(tiny_dir, tmp_path):
    source = tiny_dir / "tiny-sd15.safetensors"
    metadata = read_safetensors_metadata(source)
    configs = json.loads(metadata["diffusers_configs"])
    configs["../../escape"] = {"x": 1}
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(str(source)), str(hostile), metadata={"diffusers_configs": json.dumps(configs)})
    with pytest.raises(CheckpointError, match="Unknown components"):
        load_checkpoint(info_for(hostile))


def test_config_dir_choice(tiny_dir, tmp_path):
    tiny = tiny_dir / "tiny-sd15.safetensors"
    materialized = checkpoint_config_dir(tiny)
    assert materialized != SD_CONFIGS_DIR / "sd1"
    assert json.loads((materialized / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64]
    assert checkpoint_config_dir(tiny) == materialized  # cached per content
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(tiny)), str(plain))  # no metadata: the shipped folder
    assert checkpoint_config_dir(plain) == SD_CONFIGS_DIR / "sd1"


@pytest.mark.parametrize("keys", [
    ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.img_in.weight"],  # ComfyUI
    ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"],  # BFL's transformer-only file
])
def test_flux_single_files_are_detected(tmp_path, keys):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    assert checkpoint_files.detect_architecture(path) == checkpoint_files.ModelArch("flux", False, "flow")


def test_sd3_single_files_are_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, str(path))
    assert checkpoint_files.detect_architecture(path) == checkpoint_files.ModelArch("sd3", False, "flow")
