"""docs/troubleshooting.md stays in step with the code: every message of the studio it quotes is still printed
by the file that prints it, every category is there, and the README links to the guide."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "troubleshooting.md"

# (source file, a fixed part of a message as it stands in that file): quoted in the guide too.
MESSAGES = [
    ("modules/model_store/checkpoint_files.py", "was refused: it is a pickle that holds more than tensors"),
    ("modules/model_store/checkpoint_files.py", "Convert it to .safetensors with a tool you trust"),
    ("modules/model_store/checkpoint_files.py", "Cannot read "),
    ("modules/model_store/checkpoint_files.py", "is not supported (eps or v)."),
    ("modules/model_store/upscalers.py", "the file was refused: a pickle holding more than tensors"),
    ("modules/core/cmd_args.py", "accepted for A1111 compatibility; .ckpt files are still loaded with weights_only=True"),
    ("modules/model_store/model_manager.py", "even after freeing every model"),
    ("modules/model_store/model_manager.py", "Free memory used by other programs, lower the memory"),
    ("modules/model_store/model_manager.py", "freeing every model not in use and retrying once"),
    ("modules/app.py", "--medvram/--lowvram only apply to CUDA devices; ignored on"),
    ("modules/app.py", "No checkpoint found. Put a .safetensors file in"),
    ("modules/generation/leases.py", "no checkpoint found: put a .safetensors file in models/Stable-diffusion (or start"),
    ("modules/generation/leases.py", "no checkpoint can be loaded: "),
    ("modules/generation/leases.py", "which cannot be loaded: "),
    ("modules/generation/params.py", "must be a multiple of 8, got"),
    ("modules/ui/common.py", "Generation failed because of an error in the server (its log has the details)."),
    ("modules/core/devices.py", "--xformers ignored: xformers cannot be imported"),
    ("modules/networks/extra_networks.py", "ignored: no LoRA named"),
    ("modules/networks/extra_networks.py", "this studio does not read (e.g."),
    ("modules/networks/extra_networks.py", "is not a number"),
    ("modules/networks/merge.py", "of its layers do not match this checkpoint and were skipped"),
    ("modules/model_store/text_encoders.py", "T5's tokenizer is not shipped with the studio"),
    ("modules/generation/leases.py", "FLUX's VAE (ae.safetensors)"),
    ("modules/model_store/sd_pipelines.py", "text encoder: put one (for example "),
    ("modules/captioning/models.py", "put a transformers folder in"),
    ("modules/captioning/models.py", "offline mode (HF_HUB_OFFLINE is set). Unset it, or "),
    ("modules/captioning/models.py", "8-bit loading needs bitsandbytes (pip install bitsandbytes)"),
    ("modules/training/engine.py", "loss became NaN or inf at step"),
    ("modules/training/engine.py", "mixed precision (fp16) overflowing: try bf16 or mixed_precision no"),
    ("modules/training/engine.py", "out of memory while training: lower train_batch_size, turn on gradient_checkpointing and"),
    ("modules/training/engine.py", "(train_batch_size x processes), this run has"),
    ("modules/training/runs.py", "the training process was killed (out of memory?); the last saved state is kept"),
    ("modules/training/runs.py", "stop it or wait until it ends "),
    ("modules/training/runs.py", "is using the GPU, "),
    ("modules/training/models.py", "not found (checkpoints: "),
    ("modules/training/dataset.py", "is larger than the dataset "),
    ("modules/train.py", "a run is already training in"),
    ("modules/api/auth.py", "Not authenticated: log in (HTTP Basic with a --api-auth or --gradio-auth user, "),
    ("modules/api/middleware.py", "request body too large: the limit is"),
    ("modules/api/middleware.py", "MB (setting api_max_request_mb)"),
    ("modules/api/generation.py", "on this server (setting api_max_steps), got"),
    ("modules/api/errors.py", "the checkpoint cannot be used: "),
    ("modules/core/jobs.py", "jobs are already waiting; try again when some have finished"),
    ("webui.py", "without --gradio-auth or --api-auth: anyone on your "),
    ("modules/ui/extensions.py", "Installing and updating extensions is disabled: this server can be reached"),
    ("modules/scripting/host.py", "unknown script "),
    ("modules/scripting/script_base.py", " arguments, got "),
    ("run_tests.sh", "Chromium is missing: run 'sudo apt-get install -y chromium' (the browser tests need it)."),
]

CATEGORIES = ["Install", "Starting and connecting", "Generation", "Memory", "Models and files", "LoRA and embeddings",
              "Captioning", "Training", "API and clients", "Scripts and extensions",
              "FAQ: hardware, models and platforms"]

# What the guide must cover (the issue's list), by a phrase each entry uses.
TOPICS = ["CUDA out of memory", "Training runs out of memory", "--no-half-vae", "NaN", "vram_budget_mb", "ram_budget_mb",
          "Switching checkpoints is slow", "A `.ckpt` is refused", "offline", "A LoRA has no effect",
          "SDXL pictures are garbled", "Chromium", "address already in use", "Other machines cannot connect", "401",
          "413", "422", "503", "loss became NaN or inf", "A resumed run counts the wrong steps",
          "torchrun --standalone --nproc_per_node 2", "accelerate launch --num_processes 2 --cpu",
          "curl -s http://127.0.0.1:7860/sdapi/v1/memory", "--api-log",
          'python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"',
          "How much VRAM do I need?", "Linux", "Windows and WSL", "macOS", "Cloud GPUs"]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_enough_messages_are_checked():
    assert len(MESSAGES) >= 12
    assert len(set(MESSAGES)) == len(MESSAGES)


@pytest.mark.parametrize("source,message", MESSAGES, ids=[f"{s}:{m[:30]}" for s, m in MESSAGES])
def test_each_quoted_message_is_still_in_its_source_and_in_the_guide(guide, source, message):
    code = (REPO / source).read_text(encoding="utf-8")
    assert message in code, f"{source} no longer prints {message!r}: update docs/troubleshooting.md and this list"
    assert flat(message) in flat(guide), f"docs/troubleshooting.md does not quote {message!r} ({source})"


def test_every_category_has_its_heading(guide):
    headings = re.findall(r"^## (.+?)\s*$", guide, re.M)
    assert headings == CATEGORIES


def test_the_category_links_point_at_headings(guide):
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+?)\s*$", guide, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", guide)
    assert len(links) >= len(CATEGORIES)
    assert not [link for link in links if link not in slugs]


def test_every_entry_says_what_to_do(guide):
    for section in re.split(r"^## ", guide, flags=re.M)[1:-1]:  # the categories before the FAQ
        for entry in re.split(r"^### ", section, flags=re.M)[1:]:
            assert "**Fix**" in entry or "**Otherwise**" in entry, entry.splitlines()[0]


@pytest.mark.parametrize("topic", TOPICS)
def test_the_issue_topics_are_covered(guide, topic):
    assert flat(topic) in flat(guide)


def test_the_readme_links_the_guide_from_its_troubleshooting_section():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    assert "(docs/troubleshooting.md)" in section.split("\n- ", 1)[0], "the link comes first in the section"
    assert (REPO / "docs" / "troubleshooting.md").is_file()
