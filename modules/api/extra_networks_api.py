"""The /sdapi/v1 routes of LoRA and textual inversion: list and rescan (A1111's shapes)."""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter


def text_encoder_widths(info) -> set[int]:
    """The widths of a checkpoint's text encoders, read from its file header or configs (nothing loaded)."""
    if info is None:
        return set()
    path = Path(info.filename)
    widths: set[int] = set()
    if path.is_dir():
        for sub in ("text_encoder", "text_encoder_2"):
            config = path / sub / "config.json"
            if config.is_file():
                try:
                    widths.add(int(json.loads(config.read_text()).get("hidden_size")))
                except (ValueError, TypeError, OSError):
                    pass
        return widths
    if path.suffix == ".safetensors":
        from modules.sd_models import read_safetensors_shapes
        try:
            shapes = read_safetensors_shapes(path)
        except Exception:
            return widths
        widths.update(shape[1] for key, shape in shapes.items()
                      if key.endswith("token_embedding.weight") and len(shape) == 2)
    return widths


def build_extra_networks_router(webui) -> APIRouter:
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
        widths = text_encoder_widths(webui.current_checkpoint())
        loaded, skipped = db.split_for(widths) if widths else (db.all(), {})

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
