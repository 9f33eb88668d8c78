"""Where things live: the install dir (read-only code and shipped configs) and the user's data dir."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SD_CONFIGS_DIR = Path(__file__).resolve().parent / "sd_configs"
