"""Checkpoints and VAEs on disk and in memory: /sd-models, /refresh-checkpoints, /sd-vae, /refresh-vae,
/memory (A1111's figures plus every model the manager holds), /unload-checkpoint, /reload-checkpoint."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException

from modules.api import schemas as models


def router(webui) -> APIRouter:
    from modules.model_store.checkpoint_files import CheckpointError

    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/sd-models", response_model=list[models.SDModelItem])
    def sd_models():
        return [models.SDModelItem(title=c.title, model_name=c.model_name, hash=c.shorthash, sha256=c.sha256,
                                   filename=c.filename, config=None) for c in webui.registry.list()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        webui.refresh_checkpoints()
        return None

    @router.get("/sd-vae", response_model=list[models.SDVaeItem])
    def sd_vae():
        return [models.SDVaeItem(model_name=v.name, filename=str(v.path)) for v in webui.vaes.list()]

    @router.post("/refresh-vae")
    def refresh_vae():
        webui.vaes.refresh()
        return None

    @router.get("/memory", response_model=models.MemoryResponse)
    def memory():
        from modules.core import devices
        stats = devices.memory_stats(webui.device)
        return models.MemoryResponse(ram=stats.get("ram", {}), cuda=stats.get("cuda", {}),
                                     models=webui.manager.report())

    @router.post("/unload-checkpoint")
    def unload_checkpoint():
        webui.unload_checkpoints()
        return None

    @router.post("/reload-checkpoint")
    def reload_checkpoint():
        try:
            webui.load_checkpoint_now()
        except CheckpointError as e:
            raise HTTPException(400, f"the checkpoint cannot be used: {e}") from None
        return None

    return router
