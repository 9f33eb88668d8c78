"""`webui.py --download-captioner NAME`: fetch a captioner with huggingface_hub (progress bars on the console), then exit."""
from __future__ import annotations

import sys
from pathlib import Path

from modules.core import paths


def download_and_exit(args) -> None:
    """Exit 0 with the folder written, or 1 with the reason (offline, unknown name, network error)."""
    from modules.captioning.models import CaptionerDownloadError, download_captioner

    data = Path(args.data_dir).resolve() if args.data_dir else paths.REPO_ROOT
    models = Path(args.models_dir).resolve() if args.models_dir else data / "models"
    try:
        target = download_captioner(args.download_captioner, models, log_fn=print)
    except CaptionerDownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.download_captioner} is in {target}")
    sys.exit(0)
