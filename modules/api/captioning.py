"""The captioning routes of /sdapi/v1: interrogate (A1111's shape), vqa, captioners, search, and the retrieval
embeddings of images and texts. Thin: body -> request -> job."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response
from starlette.concurrency import run_in_threadpool

from modules.api.auth import current_user
from modules.api.errors import RETRY_AFTER, job_result, raise_http
from modules.api.schemas import (
    CaptionerItem,
    EmbeddingsResponse,
    ImageEmbeddingsRequest,
    InterrogateRequest,
    InterrogateResponse,
    SearchHitItem,
    SearchRequest,
    SearchResponse,
    TextEmbeddingsRequest,
    VqaRequest,
    VqaResponse,
)


def _decode(text: str):
    from modules.core import outputs
    if not text:
        raise HTTPException(422, "image is empty: send a base64-encoded image")
    try:
        return outputs.decode_image_base64(text).convert("RGB")
    except ValueError as e:  # InvalidImageError and binascii errors are ValueErrors
        raise HTTPException(422, f"image is not a readable image: {e}") from None


def _history(items: list[Any]) -> tuple[tuple[str, str], ...]:
    turns = []
    for n, item in enumerate(items):
        if isinstance(item, dict) and "question" in item and "answer" in item:
            turns.append((str(item["question"]), str(item["answer"])))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            turns.append((str(item[0]), str(item[1])))
        else:
            raise HTTPException(422, f"history[{n}] must be [question, answer] or {{question, answer}}")
    return tuple(turns)


async def _run(submit, owner, response: Response):
    """Queue (on a worker thread: a request may decode an image), await without holding a thread, and map the
    service's errors to their statuses by type (`modules/api/errors.py`); a job stopped by a shutting-down queue
    is a 503 like a full one."""
    from modules.core.jobs import JobStopped

    def queue():
        try:
            return submit(owner)
        except Exception as e:
            raise_http(e)

    job = await run_in_threadpool(queue)
    response.headers["X-Task-Id"] = job.id
    try:
        return await job_result(job)
    except JobStopped as e:
        raise HTTPException(503, f"the captioning job was stopped: {e}", headers=RETRY_AFTER) from None
    except Exception as e:
        raise_http(e)


def router(webui) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["captioning"])

    @router.post("/interrogate", response_model=InterrogateResponse)
    async def interrogate(body: InterrogateRequest, response: Response, user: str | None = Depends(current_user)):
        from dataclasses import replace

        from modules import captioning
        image = await run_in_threadpool(_decode, body.image)  # decoding is CPU work: off the event loop
        fields = {k: v for k, v in body.model_dump(exclude={"image", "model"}).items() if v is not None}
        settings = replace(captioning.CaptionSettings(), **fields)
        req = captioning.CaptionRequest(image=image, model=body.model, settings=settings)
        caption = await _run(lambda owner: webui.captioning.submit_caption(req, owner), user, response)
        return InterrogateResponse(caption=caption)

    @router.post("/vqa", response_model=VqaResponse)
    async def vqa(body: VqaRequest, response: Response, user: str | None = Depends(current_user)):
        from modules import captioning
        if not body.question.strip():
            raise HTTPException(422, "question is empty: ask something about the image")
        image = await run_in_threadpool(_decode, body.image)  # decoding is CPU work: off the event loop
        req = captioning.VqaRequest(image=image, question=body.question, model=body.model,
                                    history=_history(body.history))
        return VqaResponse(answer=await _run(lambda owner: webui.captioning.submit_vqa(req, owner), user, response))

    @router.get("/captioners", response_model=list[CaptionerItem], response_model_exclude_none=True)
    def captioners():
        return webui.captioning.captioners()

    @router.post("/search", response_model=SearchResponse)
    async def search(body: SearchRequest, response: Response, user: str | None = Depends(current_user)):
        from pathlib import Path

        from modules import captioning
        req = captioning.SearchRequest(query=body.query, folder=Path(body.folder) if body.folder else None,
                                       model=body.model, top_k=body.top_k, rerank=body.rerank)
        hits = await _run(lambda owner: webui.captioning.submit_search(req, owner), user, response)
        return SearchResponse(results=[SearchHitItem(path=str(h.path), itc=h.itc, itm=h.itm,
                                                     score=h.itm if h.itm is not None else h.itc) for h in hits])

    @router.post("/embeddings/image", response_model=EmbeddingsResponse)
    async def image_embeddings(body: ImageEmbeddingsRequest, response: Response,
                               user: str | None = Depends(current_user)):
        """The ITC embeddings the Image search tab ranks with: per image one vector per query token."""
        from modules import captioning
        if not body.images:
            raise HTTPException(422, "images is empty: send a list of base64-encoded images")
        if len(body.images) > 256:
            raise HTTPException(422, f"at most 256 images per request, got {len(body.images)}")

        def decode_all():
            out = []
            for n, text in enumerate(body.images):
                try:
                    out.append(_decode(text))
                except HTTPException as e:
                    raise HTTPException(422, f"images[{n}]: {e.detail}") from None
            return out
        images = await run_in_threadpool(decode_all)
        req = captioning.EmbeddingsRequest(images=tuple(images), model=body.model)
        result = await _run(lambda owner: webui.captioning.submit_embeddings(req, owner), user, response)
        return _embeddings_response(result)

    @router.post("/embeddings/text", response_model=EmbeddingsResponse)
    async def text_embeddings(body: TextEmbeddingsRequest, response: Response,
                              user: str | None = Depends(current_user)):
        """The ITC embeddings of texts (the search query's): one vector per text."""
        from modules import captioning
        if not body.texts:
            raise HTTPException(422, "texts is empty: send a list of texts")
        req = captioning.EmbeddingsRequest(texts=tuple(body.texts), model=body.model)
        result = await _run(lambda owner: webui.captioning.submit_embeddings(req, owner), user, response)
        return _embeddings_response(result)

    return router


def _embeddings_response(result: dict) -> EmbeddingsResponse:
    rows = result["embeddings"]
    shape = [len(rows)]
    inner = rows[0] if rows else []
    while isinstance(inner, list):
        shape.append(len(inner))
        inner = inner[0] if inner else None
    return EmbeddingsResponse(model=result["model"], kind=result["kind"], shape=shape, embeddings=rows)
