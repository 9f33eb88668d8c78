"""Training through its CLI (`python -m modules.train`, the command the server runs as a child) on the tiny models:
the files it writes load here and in plain diffusers and change txt2img's pixels; loss falls; resume is exact;
a 2-process gloo run equals one process with twice the batch; DreamBooth class images are made once; missing
captions are written by a captioner; bad input is refused before any work with exit code 2."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

TINY = "tiny-sd15.safetensors"


def make_dataset(root: Path, folder: str = "2_sks cube", count: int = 3, size=(64, 64), captions=True,
                 seed: int = 0) -> Path:
    """Small coloured images with a shape on them (something a LoRA can learn)."""
    rng = np.random.default_rng(seed)
    d = root / folder if folder else root
    d.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = size if isinstance(size, tuple) else size[i]
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(d / f"img{i}.png")
        if captions:
            (d / f"img{i}.txt").write_text(f"sks cube, red, studio photo {i}")
    return root


def train_cli(args: list[str], *, timeout: float = 600, env: dict | None = None, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable, "-m"]) + ["modules.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, events


def base_args(models: Path, data: Path, out: Path, name: str, *extra: str, method: str = "lora",
              steps: int = 4) -> list[str]:
    return [method, "--pretrained_model_name_or_path", TINY, "--models_dir", str(models), "--train_data_dir",
            str(data), "--output_dir", str(out), "--output_name", name, "--resolution", "64", "--max_train_steps",
            str(steps), "--learning_rate", "0.01", "--device", "cpu", "--run_dir", str(out / f"{name}-run"),
            *extra]


def safetensors_file(path: Path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def txt2img(ctx, prompt: str, checkpoint: str = TINY):
    from modules import generation
    req = generation.validate(generation.Txt2ImgRequest(prompt=prompt, steps=4, width=64, height=64, seed=5,
                                                        save_images=False))
    res = generation.run_txt2img(ctx, req, None, {"sd_model_checkpoint": checkpoint, "return_grid": False},
                                 keep_samples=True)
    return np.asarray(res.samples[0]), res


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    """One CLI LoRA run (UNet and text encoder), saving a state every 2 steps."""
    root = tmp_path_factory.mktemp("train-lora")
    data = make_dataset(root / "data")
    out = root / "out"
    proc, events = train_cli(base_args(tiny_models, data, out, "cube", "--save_every_n_steps", "2", "--save_state",
                                       "--network_dim", "4", "--network_alpha", "2", steps=6))
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "data": data, "out": out, "events": events, "file": out / "cube.safetensors",
            "run_dir": out / "cube-run"}


def test_the_lora_file_is_kohya_layout_with_ss_metadata(lora_run):
    from modules.networks.hashes import autov3
    tensors, meta = safetensors_file(lora_run["file"])
    unet = [k for k in tensors if k.startswith("lora_unet_")]
    te = [k for k in tensors if k.startswith("lora_te_text_model_encoder_layers_")]
    assert unet and te, sorted(tensors)[:5]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {2.0}  # the run's alpha, not the rank
    down = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert down.shape[0] == 4
    for key in ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_resolution",
                "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_tag_frequency",
                "ss_dataset_dirs", "ss_training_started_at", "ss_sd_model_name", "sshs_model_hash"):
        assert meta.get(key), key
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4" and meta["ss_num_train_images"] == "6"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks cube": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"])["2_sks cube"]["sks cube"] == 3
    assert meta["sshs_model_hash"] == autov3(lora_run["file"])  # kohya's hash is the data after the header


def test_progress_lines_count_the_steps(lora_run):
    steps = [e for e in lora_run["events"] if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e["total_steps"] == 6 and np.isfinite(e["loss"]) and e["lr"] > 0 for e in steps)
    assert lora_run["events"][-1]["event"] == "done"
    lines = (lora_run["run_dir"] / "progress.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines][-1] == "done"
    assert (lora_run["run_dir"] / "config.toml").is_file()
    # intermediate results beside the final one, and the last two states kept
    assert (lora_run["out"] / "cube-step000002.safetensors").is_file()
    assert sorted(p.name for p in (lora_run["run_dir"] / "states").glob("step-*")) == ["step-000004", "step-000006"]


@pytest.fixture(scope="module")
def lora_context(tiny_models, lora_run, tmp_path_factory):
    from modules import generation
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("train-gen"),
                                    lora_dirs=[lora_run["out"]])


def test_the_trained_lora_changes_txt2img_and_weight_zero_is_the_original(lora_context):
    from tests.images import assert_float_images_close
    base, _ = txt2img(lora_context, "sks cube")
    with_lora, res = txt2img(lora_context, "sks cube <lora:cube:1>")
    zero, _ = txt2img(lora_context, "sks cube <lora:cube:0>")
    assert np.abs(with_lora - base).max() > 0.02, "the LoRA has no visible effect"
    assert_float_images_close(zero, base)
    assert "cube" in res.infotexts[0]


def test_diffusers_load_lora_weights_reads_the_file_and_agrees(tiny_models, lora_run, lora_context):
    """Plain diffusers loads our kohya file; its image with the LoRA matches ours (same seed and sampler)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from modules import generation
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers",
                                                   safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_run["out"]), weight_name="cube.safetensors")
    plain = pipe("sks cube", num_inference_steps=4, width=64, height=64, guidance_scale=7.0,
                 generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    req = generation.validate(generation.Txt2ImgRequest(prompt="sks cube <lora:cube:1>", steps=4, width=64,
                                                        height=64, seed=5, sampler_name="DDIM", save_images=False))
    ours = generation.run_txt2img(lora_context, req, None, {"sd_model_checkpoint": "tiny-sd15-diffusers",
                                                           "return_grid": False}, keep_samples=True).samples[0]
    diff = np.abs(np.asarray(ours, np.float64) - plain).max()
    assert diff <= 2e-3, f"our LoRA image and diffusers' differ by {diff}"


def test_resume_from_a_state_ends_with_the_same_weights(tiny_models, lora_run):
    """Resuming the step-4 state of the run gives, after steps 5 and 6, the same LoRA as the run itself."""
    out = lora_run["root"] / "resumed"
    state = lora_run["run_dir"] / "states" / "step-000004"
    proc, events = train_cli(base_args(tiny_models, lora_run["data"], out, "cube", "--network_dim", "4",
                                       "--network_alpha", "2", "--resume", str(state), steps=6))
    assert proc.returncode == 0, proc.stderr
    assert [e["step"] for e in events if e["event"] == "step"] == [5, 6]
    start = next(e for e in events if e["event"] == "start")
    assert start["step"] == 4 and start["total_steps"] == 6
    a, meta = safetensors_file(lora_run["file"])
    b, meta_b = safetensors_file(out / "cube.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    assert meta_b["ss_steps"] == "6"


def test_loss_on_a_fixed_batch_falls_for_each_method(tiny_models, tmp_path):
    """In-process: the loss of micro-batch 0 (fixed images, captions, noise and timesteps) before and after
    a few updates, for a LoRA, a full DreamBooth fine-tune and an embedding."""
    from modules.training import config, engine, plan
    data = make_dataset(tmp_path / "data", count=2)
    results = {}
    for method, extra in (("lora", {}), ("dreambooth", {"full_fine_tune": True, "learning_rate": 1e-3}),
                          ("embedding", {"token_string": "sksemb", "learning_rate": 0.05})):
        cfg = config.from_dict({"method": method, "pretrained_model_name_or_path": TINY,
                                "models_dir": str(tiny_models), "train_data_dir": str(data),
                                "output_dir": str(tmp_path / method), "output_name": f"fixed-{method}",
                                "resolution": 64, "max_train_steps": 8, "learning_rate": 0.01, "device": "cpu",
                                "run_dir": str(tmp_path / f"run-{method}"), **extra})
        trainer = engine.Trainer(plan.make_plan(cfg), progress_stream=open(os.devnull, "w"))
        trainer._setup()
        before = trainer.fixed_loss()
        trainer.run()
        after = trainer.fixed_loss()
        results[method] = (before, after)
    for method, (before, after) in results.items():
        assert after < before, f"{method}: loss {before:.5f} -> {after:.5f}"


def test_a_stopped_run_saves_a_state_and_kill_9_leaves_no_partial_file(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = base_args(tiny_models, data, out, "long", "--save_every_n_steps", "1", "--save_state", steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "modules.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        if '"event": "state"' in line:
            seen += 1
            if seen == 3:
                break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(120) == 0, proc.stderr.read()
    events = [json.loads(x) for x in rest.splitlines() if x.startswith("{")]
    stopped = next(e for e in events if e["event"] == "stopped")
    assert stopped["state"] and Path(stopped["state"]).is_dir()
    # now kill -9 in the middle of the saves: every visible file is whole
    proc = subprocess.Popen([sys.executable, "-m", "modules.train", *args, "--resume", str(out / "long-run")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if '"event": "saved"' in line:
            break
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    from modules.training.engine import resolve_state
    for f in out.glob("*.safetensors"):
        safetensors_file(f)  # loads: no half-written file under a real name
    state = resolve_state(out / "long-run")
    assert (state / "trainable.safetensors").is_file() and (state / "state.json").is_file()
    json.loads((state / "state.json").read_text())


def test_two_processes_train_like_one_with_twice_the_batch(tiny_models, tmp_path):
    """SGD (an update linear in the gradient, unlike Adam's, which turns last-bit noise in near-zero gradients into
    whole steps), so the two runs agree to float precision."""
    data = make_dataset(tmp_path / "data", count=4)
    sgd = ("--optimizer_type", "SGD", "--learning_rate", "0.5")
    one, _ = train_cli(base_args(tiny_models, data, tmp_path / "one", "dp", "--train_batch_size", "2", *sgd, steps=3))
    assert one.returncode == 0, one.stderr
    two, events = train_cli(base_args(tiny_models, data, tmp_path / "two", "dp", "--train_batch_size", "1", *sgd,
                                      steps=3),
                            launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node", "2", "-m"], env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    start = next(e for e in events if e["event"] == "start")
    assert start["processes"] == 2 and start["samples_per_step"] == 2
    a, _ = safetensors_file(tmp_path / "one" / "dp.safetensors")
    b, _ = safetensors_file(tmp_path / "two" / "dp.safetensors")
    ups = [k for k in a if k.endswith("lora_up.weight")]
    assert max(float(a[k].abs().max()) for k in ups) > 1e-3, "nothing was trained"
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, f"2 processes x batch 1 and 1 process x batch 2 differ by {worst}"


def test_sdxl_lora_with_buckets_uses_kohya_sdxl_names(tiny_models, tmp_path):
    from modules import generation
    data = make_dataset(tmp_path / "data", count=3, size=[(96, 64), (64, 96), (96, 64)])
    out = tmp_path / "out"
    args = base_args(tiny_models, data, out, "xl", "--enable_bucket", "--min_bucket_reso", "32",
                     "--max_bucket_reso", "128", "--bucket_reso_steps", "32", steps=3)
    args[args.index(TINY)] = "tiny-sdxl.safetensors"
    proc, events = train_cli(args)
    assert proc.returncode == 0, proc.stderr
    plan = next(e for e in events if e["event"] == "plan")
    sizes = {tuple(b["size"]) for b in plan["dataset"]["buckets"]}
    assert len(sizes) == 2, plan["dataset"]["buckets"]  # wide and tall images in their own buckets
    tensors, meta = safetensors_file(out / "xl.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors), sorted(tensors)[:3]
    ctx = generation.local_context([tiny_models / "Stable-diffusion"], tmp_path / "gen", lora_dirs=[out])
    base, _ = txt2img(ctx, "sks cube", "tiny-sdxl.safetensors")
    lora, res = txt2img(ctx, "sks cube <lora:xl:1>", "tiny-sdxl.safetensors")
    assert not res.info.get("warnings"), res.info
    assert np.abs(lora - base).max() > 0.0


def test_sd2_v_prediction_lora_and_full_fine_tune_stay_sd2(tiny_models, tmp_path):
    """On the tiny SD2 768-v model: the LoRA says so in kohya's metadata (ss_v2, ss_v_parameterization) and
    changes the image; a full fine-tune is written in SD2's layout (OpenCLIP keys) and loads as a v-prediction
    SD2 model again."""
    from modules import generation
    from modules.model_store import checkpoint_files
    data = make_dataset(tmp_path / "data", folder="1_sks cube")
    args = base_args(tiny_models, data, tmp_path / "lora", "v2", steps=2)
    args[args.index(TINY)] = "tiny-sd2-v.safetensors"
    proc, _ = train_cli(args)
    assert proc.returncode == 0, proc.stderr
    tensors, meta = safetensors_file(tmp_path / "lora" / "v2.safetensors")
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == ("sd_v2", "True", "True")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    args = base_args(tiny_models, data, tmp_path / "ckpt", "v2-full", "--full_fine_tune", method="dreambooth",
                     steps=1)
    args[args.index(TINY)] = "tiny-sd2-v.safetensors"
    proc, _ = train_cli(args)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / "ckpt" / "v2-full.safetensors"
    arch = checkpoint_files.detect_architecture(written)
    assert (arch.family, arch.prediction_type) == ("sd2", "v_prediction")
    ctx = generation.local_context([tiny_models / "Stable-diffusion", tmp_path / "ckpt"], tmp_path / "gen",
                                   lora_dirs=[tmp_path / "lora"])
    base, _ = txt2img(ctx, "sks cube", "tiny-sd2-v.safetensors")
    lora, res = txt2img(ctx, "sks cube <lora:v2:1>", "tiny-sd2-v.safetensors")
    assert not res.info.get("warnings"), res.info
    assert np.abs(lora - base).max() > 0.0
    trained, _ = txt2img(ctx, "sks cube", "v2-full.safetensors")
    assert np.abs(trained - base).max() > 0.0


def test_dreambooth_prior_preservation_makes_class_images_once(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", folder="1_sks cube")
    runs = tmp_path / "runs"
    outs = []
    for i in range(2):
        args = base_args(tiny_models, data, tmp_path / f"out{i}", f"db{i}", "--class_prompt", "a cube",
                         "--num_class_images", "2", method="dreambooth", steps=2)
        args[args.index("--run_dir") + 1] = str(runs / f"db{i}")
        proc, events = train_cli(args)
        assert proc.returncode == 0, proc.stderr
        outs.append([e for e in events if e["event"] == "class_images"])
    assert outs[0][0]["generating"] == 2 and outs[1][0]["generating"] == 0
    folder = Path(outs[0][0]["folder"])
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]
    _, meta = safetensors_file(tmp_path / "out1" / "db1.safetensors")
    assert meta["ss_num_reg_images"] == "2"


def test_full_dreambooth_writes_a_checkpoint_the_studio_loads(tiny_models, tmp_path):
    from modules import generation
    data = make_dataset(tmp_path / "data", folder="1_sks cube")
    out = tmp_path / "ckpts"
    proc, events = train_cli(base_args(tiny_models, data, out, "db-full", "--full_fine_tune", method="dreambooth",
                                       steps=2))
    assert proc.returncode == 0, proc.stderr
    ctx = generation.local_context([tiny_models / "Stable-diffusion", out], tmp_path / "gen")
    assert ctx.registry.find("db-full") is not None
    trained, _ = txt2img(ctx, "sks cube", "db-full.safetensors")
    base, _ = txt2img(ctx, "sks cube")
    assert np.abs(trained - base).max() > 0.0


def test_an_embedding_run_writes_an_a1111_embedding(tiny_models, tmp_path):
    from modules import generation
    data = make_dataset(tmp_path / "data", folder="1_sksemb")
    out = tmp_path / "emb"
    proc, _ = train_cli(base_args(tiny_models, data, out, "sksemb", "--num_vectors_per_token", "2",
                                  "--init_word", "cube", method="embedding", steps=3))
    assert proc.returncode == 0, proc.stderr
    tensors, _ = safetensors_file(out / "sksemb.safetensors")
    assert tensors["emb_params"].shape == (2, 32)
    ctx = generation.local_context([tiny_models / "Stable-diffusion"], tmp_path / "gen", embedding_dirs=[out])
    with_emb, res = txt2img(ctx, "a photo of sksemb")
    assert "sksemb" in res.infotexts[0]


def test_missing_captions_are_written_by_a_captioner_first(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", folder="", count=2, captions=False)
    proc, events = train_cli(base_args(tiny_models, data, tmp_path / "out", "capt", "--caption_missing_with",
                                       "tiny-blip", steps=1))
    assert proc.returncode == 0, proc.stderr
    written = next(e for e in events if e["event"] == "captioned")["files"]
    assert sorted(Path(p).name for p in written) == ["img0.txt", "img1.txt"]
    assert all(Path(p).read_text().strip() for p in written)


@pytest.mark.parametrize("change, message", [
    ({"--train_data_dir": "MISSING"}, "does not exist"),
    ({"--train_data_dir": "EMPTY"}, "no images"),
    ({"--pretrained_model_name_or_path": "no-such-model"}, "not found"),
    ({"--max_train_steps": "0"}, "max_train_steps or max_train_epochs"),
    ({"--network_dim": "0"}, "network_dim must be at least 1"),
    ({"--learning_rate": "-1"}, "learning_rate must not be negative"),
    ({"--output_name": "../evil"}, "output_name must be a plain file name"),
    ({"--train_batch_size": "64"}, "larger than the dataset"),
    ({"--cache_text_encoder_outputs": None}, "SDXL option"),
    ({"--bogus_flag": "1"}, "unknown options"),
    ({"--optimizer_type": "AdamW8bit"}, "bitsandbytes"),
])
def test_bad_input_exits_2_with_the_reason_before_any_work(tiny_models, tmp_path, change, message):
    from modules import train
    data = make_dataset(tmp_path / "data", count=1)
    (tmp_path / "empty").mkdir()
    args = base_args(tiny_models, data, tmp_path / "out", "bad")
    for flag, value in change.items():
        value = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}.get(value, value)
        if flag in args:
            i = args.index(flag)
            args[i + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train.main(args)
    assert code == 2
    assert message in stderr.getvalue(), stderr.getvalue()
    assert not (tmp_path / "out").exists()  # nothing was done
    if "bitsandbytes" in message:
        assert "AdamW, SGD or Adafactor" in stderr.getvalue()


def test_an_unreadable_image_is_skipped_and_named(tiny_models, tmp_path):
    from modules.training import config, plan
    data = make_dataset(tmp_path / "data", count=2)
    (data / "2_sks cube" / "broken.png").write_text("not an image")
    cfg = config.from_dict({"pretrained_model_name_or_path": TINY, "models_dir": str(tiny_models),
                            "train_data_dir": str(data), "output_dir": str(tmp_path / "o"), "output_name": "x",
                            "max_train_steps": 1})
    p = plan.make_plan(cfg)
    assert [Path(s[0]).name for s in p.data.skipped] == ["broken.png"]
    assert p.summary()["dataset"]["images"] == 2


def test_nan_loss_stops_with_the_cause_and_a_state(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    proc, events = train_cli(base_args(tiny_models, data, out, "nan", "--optimizer_type", "SGD", "--learning_rate",
                                       "1e30", "--max_grad_norm", "0", steps=20))
    assert proc.returncode == 3, proc.stderr
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "nan" and "learning rate" in error["message"] and error["state"]
    assert Path(error["state"], "trainable.safetensors").is_file()


def test_a_second_run_in_the_same_run_folder_is_refused(tiny_models, tmp_path):
    from modules import train
    data = make_dataset(tmp_path / "data", count=1)
    run_dir = tmp_path / "out" / "busy-run"
    run_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "run.lock").write_text(str(sleeper.pid))
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main(base_args(tiny_models, data, tmp_path / "out", "busy"))
        assert code == 2 and "already training" in err.getvalue()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sample_images_are_made_with_their_infotext(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", count=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nsks cube --n blurry --w 64 --h 64 --d 3 --l 5 --s 3 --ss euler_a\n")
    out = tmp_path / "out"
    proc, events = train_cli(base_args(tiny_models, data, out, "smp", "--sample_prompts", str(prompts),
                                       "--sample_every_n_steps", "1", steps=2))
    assert proc.returncode == 0, proc.stderr
    paths = [Path(e["path"]) for e in events if e["event"] == "sample"]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    info = Image.open(paths[0]).info["parameters"]
    assert "sks cube" in info and "Negative prompt: blurry" in info and "Seed: 3" in info
    assert "Sampler: Euler a" in info and "CFG scale: 5" in info


def test_help_lists_kohya_flags():
    proc = subprocess.run([sys.executable, "-m", "modules.train", "lora", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--pretrained_model_name_or_path", "--network_dim", "--min_snr_gamma", "--sample_prompts"):
        assert flag in proc.stdout
    shutil.which("python")
