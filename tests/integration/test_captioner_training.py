"""The captioner method of the trainer (`python -m modules.train captioner`) on the tiny BLIP-2 and BLIP v1: only the
Q-Former side (BLIP-2) or the text decoder (BLIP) trains and the frozen parts stay bit for bit; the loss falls and
CIDEr on a train-equals-val set rises; evaluations before, after each epoch and at the end are progress lines, a
table and example captions in the run folder; resume is exact; the output (a whole folder, or only the trained
tensors combined with the base at load time) is listed as a captioner and captions exactly as plain transformers
on the same combined weights; bad input exits 2 before any work. Also `python -m modules.caption evaluate`."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.integration.test_captioning import plain_blip_generate, plain_generate
from tests.integration.test_training import safetensors_file, train_cli

CAPTIONS = ["a red cat sitting on a blue chair", "a green tree in the mountains", "a yellow flower with water drops",
            "a city at night"]


def make_captioned(root: Path, folder: str = "2_things", captions=CAPTIONS, seed: int = 0) -> Path:
    """Small images, a different colour and square each, with a caption file beside each."""
    rng = np.random.default_rng(seed)
    d = root / folder if folder else root
    d.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        img = np.zeros((40, 40, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        img[8 + 2 * i: 28, 8: 30 - 2 * i] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(d / f"img{i}.png")
        if caption is not None:
            (d / f"img{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> Path:
    """A models folder of its own holding copies of the tiny captioners (the runs write into its BLIP2/ and BLIP/)."""
    root = tmp_path_factory.mktemp("captioner-models")
    for sub in ("BLIP2", "BLIP"):
        shutil.copytree(tiny_models / sub, root / sub)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_captioned(tmp_path_factory.mktemp("captioned"))


def args_for(models: Path, data: Path, name: str, run_dir: Path, *extra: str, base: str = "tiny-blip2",
             steps: int = 8) -> list[str]:
    return ["captioner", "--base", base, "--models_dir", str(models), "--train_data_dir", str(data),
            "--output_name", name, "--max_train_steps", str(steps), "--device", "cpu", "--run_dir", str(run_dir),
            *extra]


def registry_of(models: Path):
    from modules.captioning import CaptionerRegistry
    return CaptionerRegistry([models / "BLIP2", models / "BLIP"])


def service_context(models: Path):
    from modules.captioning.service import CaptionContext
    from modules.model_store.model_manager import ModelManager
    return CaptionContext(registry=registry_of(models), manager=ModelManager("cpu", 2**30, 2**30),
                          dtype=torch.float32)


def in_process(models: Path, data: Path, name: str, tmp: Path, **options):
    from modules.training import config, plan
    from modules.training.captioner import CaptionerTrainer
    cfg = config.from_dict({"method": "captioner", "base": "tiny-blip2", "models_dir": str(models),
                            "train_data_dir": str(data), "output_name": name, "max_train_steps": 8,
                            "learning_rate": 5e-2, "device": "cpu", "run_dir": str(tmp / f"{name}-run"), **options})
    trainer = CaptionerTrainer(plan.make_plan(cfg), progress_stream=open(os.devnull, "w"))
    trainer._setup()
    return trainer


# --------------------------------------------------------------------------------- a BLIP-2 run (CLI)

@pytest.fixture(scope="module")
def blip2_run(models, data, tmp_path_factory):
    """BLIP-2 with LoRA on the language model, 1 of 4 images held out, saved as trained tensors only, a state
    every 4 steps; 3 training images x 2 repeats = 6 steps per epoch."""
    root = tmp_path_factory.mktemp("blip2-run")
    args = args_for(models, data, "cap-b2", root / "run", "--val_split", "0.25", "--lora_language_model",
                    "--network_dim", "4", "--network_alpha", "8", "--learning_rate", "0.05", "--output_format",
                    "trained", "--save_every_n_steps", "4", "--save_state")
    proc, events = train_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "args": args, "events": events, "run_dir": root / "run",
            "out": models / "BLIP2" / "cap-b2"}


def test_evaluations_are_progress_lines_a_table_and_example_captions(blip2_run):
    events = blip2_run["events"]
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["val_images"] == 1 and plan["dataset"]["images"] == 3 and plan["steps_per_epoch"] == 6
    assert plan["output_format"] == "trained" and plan["trainable_params"] < plan["total_params"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [(e["tag"], e["step"]) for e in evals] == [("before", 0), ("epoch 1", 6), ("final", 8)]
    assert set(evals[0]["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 9))
    rows = (blip2_run["run_dir"] / "eval.csv").read_text().splitlines()
    assert rows[0] == "tag,step,epoch,BLEU-1,BLEU-2,BLEU-3,BLEU-4,ROUGE-L,CIDEr"
    assert [r.split(",")[:2] for r in rows[1:]] == [["before", "0"], ["epoch 1", "6"], ["final", "8"]]
    examples = json.loads((blip2_run["run_dir"] / "eval_examples.json").read_text())
    assert len(examples) == 1 and examples[0]["reference"] in CAPTIONS
    assert examples[0]["before"] == evals[0]["examples"][0]["now"]  # "before" is the untrained captioner's
    assert examples[0]["now"] == evals[-1]["examples"][0]["now"]


def test_only_the_trained_tensors_are_saved_with_the_base_named_and_hashed(blip2_run, models):
    from modules.model_store.hashing import sha256_of_file
    out = blip2_run["out"]
    assert not (out / "config.json").exists() and (out / "trained.safetensors").is_file()
    tensors, meta = safetensors_file(out / "trained.safetensors")
    lora = [k for k in tensors if ".lora_" in k]
    assert lora and all(k.startswith("language_model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in lora)
    assert all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in tensors if k not in lora)
    assert "query_tokens" in tensors and not any(k.startswith("vision_model.") for k in tensors)
    manifest = json.loads((out / "captioner.json").read_text())
    base = models / "BLIP2" / "tiny-blip2" / "model.safetensors"
    assert manifest["base"] == "tiny-blip2" and manifest["base_sha256"] == sha256_of_file(base)
    assert meta["base_sha256"] == manifest["base_sha256"] and manifest["base_bytes"] == base.stat().st_size
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "out_proj"],
                                "module": "language_model"}
    assert manifest["step"] == 8 and set(manifest["metrics"]) >= {"CIDEr", "BLEU-4"}
    # the intermediate result beside it, the last two states kept
    assert (models / "BLIP2" / "cap-b2-step000004" / "trained.safetensors").is_file()
    assert sorted(p.name for p in (blip2_run["run_dir"] / "states").glob("step-*")) == ["step-000004",
                                                                                        "step-000008"]


def plain_combined(models: Path, folder: Path):
    """The base loaded with transformers, the trained tensors put in by hand (LoRA merged as W + alpha/r B A)."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Blip2ForConditionalGeneration
    model = Blip2ForConditionalGeneration.from_pretrained(models / "BLIP2" / "tiny-blip2").eval()
    manifest = json.loads((folder / "captioner.json").read_text())
    scale = manifest["lora"]["alpha"] / manifest["lora"]["rank"]
    tensors = load_file(str(folder / "trained.safetensors"))
    state = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            if ".lora_A." in key:
                module = key.removesuffix(".lora_A.weight")
                state[module + ".weight"] += scale * tensors[module + ".lora_B.weight"] @ value
            elif ".lora_B." not in key:
                state[key].copy_(value)
    return model, AutoProcessor.from_pretrained(models / "BLIP2" / "tiny-blip2")


def test_the_new_captioner_is_listed_and_captions_like_plain_transformers(blip2_run, models, data):
    from modules.captioning import CaptionRequest, CaptionSettings
    from modules.captioning.service import open_rgb, run_caption
    registry = registry_of(models)
    info = registry.find("cap-b2")
    assert info is not None and info.kind == "blip2" and info.trained_from == "tiny-blip2"
    assert info.base_path == (models / "BLIP2" / "tiny-blip2").resolve()
    assert info.can_caption and info.can_answer  # in the Caption, batch and VQA lists
    assert "cap-b2" in [i.name for i in registry.list()]
    plain = plain_combined(models, blip2_run["out"])
    ctx = service_context(models)
    image = open_rgb(data / "2_things" / "img1.png")
    settings = CaptionSettings(num_beams=3, min_length=2, max_length=12)
    ours = run_caption(ctx, CaptionRequest(image=image, model="cap-b2", settings=settings))
    expected = plain_generate(plain, image, "", **settings.generate_kwargs())
    assert ours == expected and ours
    base = run_caption(ctx, CaptionRequest(image=image, model="tiny-blip2", settings=settings))
    assert base != ours  # the training changed what it says


def test_resume_from_a_state_ends_with_the_same_weights(blip2_run, models):
    """The step-4 state resumed in another run folder: steps 5..8, evaluations after epoch 1 and at the end
    (the "before" one comes from the state), and the same trained tensors as the run never stopped."""
    args = list(blip2_run["args"])
    args[args.index("--output_name") + 1] = "cap-b2-resumed"
    args[args.index("--run_dir") + 1] = str(blip2_run["root"] / "resumed-run")
    proc, events = train_cli(args + ["--resume", str(blip2_run["run_dir"] / "states" / "step-000004")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["step"] for e in events if e["event"] == "step"] == [5, 6, 7, 8]
    assert [e["tag"] for e in events if e["event"] == "eval"] == ["epoch 1", "final"]
    rows = (blip2_run["root"] / "resumed-run" / "eval.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["before", "epoch 1", "final"]
    a, _ = safetensors_file(blip2_run["out"] / "trained.safetensors")
    b, _ = safetensors_file(models / "BLIP2" / "cap-b2-resumed" / "trained.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    first = next(e for e in blip2_run["events"] if e["event"] == "eval" and e["tag"] == "final")
    last = next(e for e in events if e["event"] == "eval" and e["tag"] == "final")
    assert last["metrics"] == first["metrics"] and last["examples"] == first["examples"]


# ------------------------------------------------------------------------------- in-process runs

def test_blip2_loss_falls_and_the_frozen_parts_are_bit_identical(models, data, tmp_path):
    """A whole-folder output: the vision encoder and the language model in it are the base's bit for bit, the
    Q-Former, query tokens and projection changed; plain transformers loads it."""
    trainer = in_process(models, data, "cap-b2-full", tmp_path, output_format="full")
    before = trainer.fixed_loss()
    trainer.run()
    assert trainer.fixed_loss() < before
    base, _ = safetensors_file(models / "BLIP2" / "tiny-blip2" / "model.safetensors")
    out, _ = safetensors_file(models / "BLIP2" / "cap-b2-full" / "model.safetensors")
    assert base.keys() == out.keys()
    frozen = [k for k in base if k.startswith(("vision_model.", "language_model."))]
    trained = [k for k in base if k.startswith(("qformer.", "query_tokens", "language_projection."))]
    assert frozen and trained and len(frozen) + len(trained) == len(base)
    for k in frozen:
        assert torch.equal(base[k], out[k]), k
    assert any(not torch.equal(base[k], out[k]) for k in trained)
    assert not torch.equal(base["language_projection.weight"], out["language_projection.weight"])
    from transformers import Blip2ForConditionalGeneration
    Blip2ForConditionalGeneration.from_pretrained(models / "BLIP2" / "cap-b2-full")


def test_blip_loss_falls_cider_rises_and_the_vision_encoder_stays(models, data, tmp_path):
    """BLIP v1 on a train-equals-val set: its text decoder learns the four captions (CIDEr up from ~0), the
    frozen vision encoder is the base's bit for bit, and the whole folder captions as plain transformers does."""
    from modules.captioning import CaptionRequest, CaptionSettings
    from modules.captioning.service import open_rgb, run_caption
    trainer = in_process(models, data, "cap-blip", tmp_path, base="tiny-blip", val_data_dir=str(data / "2_things"),
                         learning_rate=5e-3, max_train_steps=40, eval_every_n_epochs=0)
    before = trainer.fixed_loss()
    trainer.run()
    assert trainer.fixed_loss() < before * 0.8
    assert [e["tag"] for e in trainer.evals] == ["before", "final"]
    first, last = trainer.evals[0], trainer.evals[-1]
    assert last["CIDEr"] > first["CIDEr"] + 0.5, trainer.evals
    assert last["BLEU-1"] > first["BLEU-1"]
    base, _ = safetensors_file(models / "BLIP" / "tiny-blip" / "model.safetensors")
    out, _ = safetensors_file(models / "BLIP" / "cap-blip" / "model.safetensors")
    vision = [k for k in base if k.startswith("vision_model.")]
    assert vision and all(torch.equal(base[k], out[k]) for k in vision)
    assert any(not torch.equal(base[k], out[k]) for k in base if k.startswith("text_decoder."))
    from transformers import AutoProcessor, BlipForConditionalGeneration
    folder = models / "BLIP" / "cap-blip"
    plain = (BlipForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder))
    image = open_rgb(data / "2_things" / "img2.png")
    settings = CaptionSettings(num_beams=3, min_length=1, max_length=12)
    ours = run_caption(service_context(models), CaptionRequest(image=image, model="cap-blip", settings=settings))
    assert ours == plain_blip_generate(plain, image, "", **settings.generate_kwargs())
    info = registry_of(models).find("cap-blip")
    assert info.kind == "blip" and info.trained_from == "tiny-blip" and info.base_path is None


def test_gradient_checkpointing_leaves_the_gradients_as_they_are(models, data, tmp_path):
    """Non-reentrant checkpointing recomputes with the same (seeded) dropout: the same loss and gradients."""
    grads = []
    for checkpointing in (False, True):
        trainer = in_process(models, data, f"gc-{checkpointing}", tmp_path, gradient_checkpointing=checkpointing,
                             output_dir=str(tmp_path / "out"))
        model = trainer.wrapped["captioner"]
        model.train()
        loss, _ = trainer._loss(0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    worst = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
    assert worst <= 1e-6, worst


def test_two_processes_train_and_one_writes(models, data, tmp_path):
    """DDP through accelerate (gloo, two CPU processes): a global batch of 2, evaluations and the result
    written once, by process 0."""
    import sys
    args = args_for(models, data, "cap-ddp", tmp_path / "run", "--output_dir", str(tmp_path / "out"),
                    "--val_split", "0.25", "--learning_rate", "0.05", steps=3)
    proc, events = train_cli(args, launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2", "-m"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = next(e for e in events if e["event"] == "start")
    assert start["processes"] == 2 and start["samples_per_step"] == 2
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    # 3 images x 2 repeats in batches of 2: epoch 1 ends with the last step, whose evaluation is the final one
    assert [(e["tag"], e["step"]) for e in events if e["event"] == "eval"] == [("before", 0), ("epoch 1", 3)]
    assert [e["path"] for e in events if e["event"] == "saved"] == [str(tmp_path / "out" / "cap-ddp")]
    assert (tmp_path / "out" / "cap-ddp" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change, message", [
    ({"--train_data_dir": "UNCAPTIONED"}, "no caption files (.txt)"),
    ({"--train_data_dir": "ONE", "--val_split": "0.5"}, "leaving none to train on"),
    ({"--base": "tiny-blip2-itm"}, "not a captioner"),
    ({"--base": "tiny-sd15.safetensors"}, "is not a captioner"),
    ({"--base": "nope"}, "is not a captioner: name a BLIP or BLIP-2 captioner"),
    ({"--memory_budget_mb": "0.1"}, "too large for the memory budget"),
    ({"--base": "tiny-blip", "--lora_language_model": None}, "BLIP-2 option"),
    ({"--train_vision_encoder": None}, "BLIP v1 option"),
    ({"--sample_prompts": "p.txt"}, "not options of a captioner run"),
    ({"--val_split": "1.5"}, "val_split must be in [0, 1)"),
    ({"--val_data_dir": "UNCAPTIONED"}, "val_data_dir"),
    ({"--output_format": "zip"}, "output_format must be one of"),
])
def test_bad_input_exits_2_with_the_reason_before_any_work(models, tmp_path, change, message):
    from modules import train
    make_captioned(tmp_path / "data")
    make_captioned(tmp_path / "uncaptioned", captions=[None, None])
    make_captioned(tmp_path / "one", folder="", captions=["a single one"])
    args = args_for(models, tmp_path / "data", "bad", tmp_path / "run", "--output_dir", str(tmp_path / "out"))
    for flag, value in change.items():
        value = {"UNCAPTIONED": str(tmp_path / "uncaptioned"), "ONE": str(tmp_path / "one")}.get(value, value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train.main(args)
    assert code == 2, stderr.getvalue()
    assert message in stderr.getvalue(), stderr.getvalue()
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()  # nothing was done


def test_captioner_options_on_another_method_are_refused():
    from modules.training import config
    with pytest.raises(config.TrainConfigError, match="val_split: captioner options"):
        config.from_dict({"method": "lora", "pretrained_model_name_or_path": "x", "train_data_dir": "d",
                          "output_name": "n", "max_train_steps": 1, "val_split": 0.1})


# ------------------------------------------------------------------------ python -m modules.caption evaluate

def test_the_evaluate_cli_scores_a_folder_and_a_vqa_file(models, data, tmp_path):
    from modules import caption
    from modules.captioning import CaptionSettings, EvaluateRequest, metrics
    from modules.captioning.service import run_evaluate
    out = tmp_path / "scores.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = caption.main(["evaluate", str(data), "--model", "tiny-blip", "--models-dir", str(models),
                             "--num-beams", "2", "--min-length", "1", "--max-length", "8", "--device", "cpu",
                             "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["count"] == 4 and "CIDEr" in stdout.getvalue()
    references = [[c] for c in CAPTIONS]
    assert result["CIDEr"] == pytest.approx(metrics.caption_scores(result["predictions"], references)["CIDEr"])
    same = run_evaluate(service_context(models), EvaluateRequest(
        folder=data, model="tiny-blip", settings=CaptionSettings(num_beams=2, min_length=1, max_length=8)))
    assert same["predictions"] == result["predictions"]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"image": str(data / "2_things" / "img0.png"), "question": "what is it?",
                               "answers": ["cat"] * 10}]))
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = caption.main(["evaluate", "--vqa-json", str(qa), "--model", "tiny-blip2", "--models-dir",
                             str(models), "--device", "cpu", "--output", str(out)])
    assert code == 0 and "vqa_accuracy" in json.loads(out.read_text())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert caption.main(["evaluate", str(tmp_path / "missing"), "--models-dir", str(models)]) == 2
    assert "does not exist" in err.getvalue()
