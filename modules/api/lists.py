"""The lists A1111 clients read at start-up: samplers, schedulers, upscalers (PIL ones and the model files),
latent upscale modes, styles, scripts, and the features that do not exist here yet (answered in A1111's shapes,
empty)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modules.api import schemas as models


def router(webui) -> APIRouter:
    from modules import generation
    from modules.core import samplers

    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/samplers", response_model=list[models.SamplerItem])
    def list_samplers():
        return samplers.samplers_api_list()

    @router.get("/schedulers", response_model=list[models.SchedulerItem])
    def list_schedulers():
        return samplers.schedulers_api_list()

    @router.get("/upscalers", response_model=list[models.UpscalerItem])
    def list_upscalers():
        return webui.upscalers.api_list()

    @router.get("/realesrgan-models", response_model=list[dict[str, Any]])
    def realesrgan_models():
        return webui.upscalers.realesrgan_list()

    @router.get("/latent-upscale-modes", response_model=list[models.LatentUpscalerModeItem])
    def latent_upscale_modes():
        return [{"name": name} for name in generation.LATENT_UPSCALE_MODES]

    @router.get("/prompt-styles", response_model=list[models.PromptStyleItem])
    def prompt_styles():
        return webui.styles.api_list()

    @router.get("/scripts", response_model=models.ScriptsList)
    def scripts():
        return models.ScriptsList(**webui.scripts.scripts_list())

    @router.get("/script-info", response_model=list[dict[str, Any]])
    def script_info():
        return webui.scripts.script_info()

    @router.get("/extensions", response_model=list[dict[str, Any]])
    def extensions():
        out = []
        for ext in webui.scripts.extensions:
            v = ext.version()
            out.append({"name": ext.name, "remote": v["remote"], "branch": v["branch"], "commit_hash": v["commit"],
                        "commit_date": v["date"], "version": v["commit"], "enabled": ext.enabled})
        return out

    # Features that do not exist here answer A1111's shapes, empty (clients list them at start-up).
    @router.get("/face-restorers", response_model=list[dict[str, Any]])
    def face_restorers():
        return []

    @router.get("/hypernetworks", response_model=list[dict[str, Any]])
    def hypernetworks():
        return []

    return router
