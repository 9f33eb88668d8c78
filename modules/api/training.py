"""The training routes of /sdapi/v1: start a run (`POST /train/{lora,dreambooth,embedding,captioner}` with the CLI's
option names as JSON keys; a captioner run's base may be given as `base`), list and read runs (a captioner run's
snapshot has its evaluations, `evals`, and example captions, `examples`), stop one (it keeps a resumable state),
resume one, and preview a dataset.
A run belongs to the user who started it: others get a 404 for it, as if it did not exist."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException
from starlette.concurrency import run_in_threadpool

from modules.api.auth import current_user


def _http(e: Exception) -> HTTPException:
    from modules.training import runs
    from modules.training.config import TrainConfigError
    from modules.training.dataset import DatasetError

    if isinstance(e, (TrainConfigError, DatasetError)):
        return HTTPException(400, str(e))
    if isinstance(e, runs.RunBusyError):
        return HTTPException(409, str(e))
    if isinstance(e, runs.RunNotFoundError):
        return HTTPException(404, str(e))
    raise e


def router(webui) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["training"])

    def call(fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise _http(e) from None

    @router.post("/train/{method}")
    async def start(method: str, body: dict[str, Any] = Body(default_factory=dict),
                    user: str | None = Depends(current_user)):
        """Start a run: `method` is lora, dreambooth, embedding or captioner; the body holds options by the CLI's
        names."""
        run = await run_in_threadpool(call, webui.training.start, method, body, user)
        return run.snapshot()

    @router.post("/train-preview/{method}")
    async def preview(method: str, body: dict[str, Any] = Body(default_factory=dict)):
        """What a run with these options would train on: images, captions, repeats, buckets, total steps."""
        def run():
            _, plan = webui.training.check(method, body)
            return {**plan.summary(), "items": plan.data.preview()}
        return await run_in_threadpool(call, run)

    @router.get("/train")
    async def list_runs(user: str | None = Depends(current_user)):
        return [r.snapshot(detail=False) for r in webui.training.list(user)]

    @router.get("/train/{run_id}")
    async def get_run(run_id: int, user: str | None = Depends(current_user)):
        return call(webui.training.get, run_id, user).snapshot()

    @router.post("/train/{run_id}/stop")
    async def stop(run_id: int, user: str | None = Depends(current_user)):
        return call(webui.training.stop, run_id, user).snapshot(detail=False)

    @router.post("/train/{run_id}/resume")
    async def resume(run_id: int, body: dict[str, Any] = Body(default_factory=dict),
                     user: str | None = Depends(current_user)):
        """A new run continuing run `run_id` from its last state (its config, with the body's changes)."""
        run = await run_in_threadpool(call, webui.training.resume, run_id, body, user)
        return run.snapshot()

    return router
