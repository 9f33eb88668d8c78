"""The /sdapi/v1 routes of LoRA and textual inversion: list and rescan (A1111's shapes)."""
from __future__ import annotations

from fastapi import APIRouter


def router(webui) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["extra networks"])

    def lora_list() -> list[dict]:
        return [{"name": info.name, "alias": info.alias, "path": str(info.path), "metadata": info.metadata()}
                for info in webui.extra_networks.loras.list()]

    @router.get("/loras")
    def get_loras() -> list[dict]:
        return lora_list()

    @router.post("/refresh-loras")
    def refresh_loras() -> list[dict]:
        webui.extra_networks.loras.refresh()
        return lora_list()

    def embeddings_answer() -> dict:
        db = webui.extra_networks.embeddings
        loaded, skipped = webui.extra_networks.embeddings_for(webui.current_checkpoint())

        def describe(e):
            return {"step": e.step, "sd_checkpoint": e.checkpoint, "sd_checkpoint_name": e.checkpoint_name,
                    "shape": e.shape, "vectors": e.count}

        return {"loaded": {n: describe(e) for n, e in loaded.items()},
                "skipped": {n: describe(e) for n, e in skipped.items()},
                "errors": db.errors()}

    @router.get("/embeddings")
    def get_embeddings() -> dict:
        return embeddings_answer()

    @router.post("/refresh-embeddings")
    def refresh_embeddings() -> dict:
        webui.extra_networks.embeddings.refresh()
        return embeddings_answer()

    return router
