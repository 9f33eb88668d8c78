#!/usr/bin/env bash
# Create the environment in .venv/ if missing (or when requirements.txt changed), then start the UI.
# Flags pass through: ./webui.sh --api --listen
set -euo pipefail
cd "$(dirname "$0")"
source tools/venv.sh
ensure_venv requirements.txt
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python webui.py "$@"
