"""What every benchmark shares: the repository on sys.path, offline hub settings, and one git-ignored
folder (`benchmarks/.out/`) for the models and data a benchmark makes, so a run leaves `git status` clean."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / ".out"  # git-ignored
MODELS = OUT / "models"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def scratch(name: str) -> Path:
    """A folder under benchmarks/.out/ for one benchmark's outputs (made if missing)."""
    path = OUT / name
    path.mkdir(parents=True, exist_ok=True)
    return path
