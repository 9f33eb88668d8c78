"""The settings over the API: GET/POST /sdapi/v1/options (A1111's keys; server configuration is read-only) and
/cmd-flags (secrets masked)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

# Flags whose values are secrets: /cmd-flags shows that they are set, never what they are.
SECRET_FLAGS = frozenset({"api_auth", "gradio_auth"})


def masked_flags(args) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        out[key] = "********" if key in SECRET_FLAGS and value else value
    return out


def router(webui) -> APIRouter:
    from modules.core.options import OptionError
    from modules.model_store.checkpoint_files import (
        CheckpointError,
        CheckpointNotFoundError,
    )

    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/options")
    def get_options():
        opts = webui.options.snapshot()
        info = webui.current_checkpoint()
        if info is not None:
            opts["sd_model_checkpoint"] = info.title
            opts["sd_checkpoint_hash"] = info.sha256
        return opts

    @router.post("/options")
    def set_options(body: dict[str, Any]):
        try:
            updates = webui.normalize_settings(body, from_api=True)
            webui.options.update(updates, from_api=True)
        except CheckpointNotFoundError as e:
            raise HTTPException(400, str(e)) from None
        except OptionError as e:
            raise HTTPException(422, str(e)) from None
        if "sd_model_checkpoint" in updates:
            try:
                webui.load_checkpoint_now(updates["sd_model_checkpoint"])  # A1111 loads it before answering
            except CheckpointError as e:
                raise HTTPException(400, f"the checkpoint cannot be used: {e}") from None
        return None

    @router.get("/cmd-flags")
    def cmd_flags():
        return masked_flags(webui.args)

    return router
