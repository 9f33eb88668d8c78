"""Where things live: the install dir (read-only code and shipped configs) and the user's data dir."""
from __future__ import annotations

from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = MODULES_DIR.parent
SD_CONFIGS_DIR = MODULES_DIR / "model_store" / "sd_configs"
