"""Progress, interrupt and skip of the caller's own jobs (/sdapi/v1), and the queue as the UI sees it
(/internal). Jobs belong to their caller: another login's task is answered as unknown (404)."""
from __future__ import annotations

import time
from typing import Optional

from fastapi import APIRouter, Body, Depends, HTTPException

from modules.api import schemas as models
from modules.api.auth import current_user


def _job_belongs(job, user: str | None) -> bool:
    return job is not None and job.owner == user


def textinfo_of(queue, job) -> str | None:
    """The job's text; for a job waiting behind a training run (whoever's), why it waits."""
    if job.status == "queued":
        running = queue.current()
        if running is not None and running.kind == "training" and running.textinfo:
            return f"waiting: {running.textinfo}"
    return job.textinfo


def router(webui) -> APIRouter:
    from modules.core import outputs

    router = APIRouter(prefix="/sdapi/v1")

    def _progress_of(job, skip_current_image: bool) -> models.ProgressResponse:
        state = models.ProgressState(
            skipped=job.skipped, interrupted=job.interrupted, job=job.kind, job_count=job.job_count or 0,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
            job_no=job.job_no or 0,
            sampling_step=job.sampling_step or 0, sampling_steps=job.sampling_steps or 0)
        image = None
        if not skip_current_image and job.current_image is not None:
            image = outputs.encode_image_base64(job.current_image)
        return models.ProgressResponse(progress=job.progress, eta_relative=job.eta_relative or 0.0, state=state,
                                       current_image=image, textinfo=textinfo_of(webui.queue, job),
                                       current_task=job.id)

    def _own_job(id_task: str, user: str | None):
        job = webui.queue.get(id_task)
        if not _job_belongs(job, user):  # another user's task looks exactly like a missing one
            raise HTTPException(404, f"no task {id_task!r}")
        return job

    @router.get("/progress", response_model=models.ProgressResponse)
    def progress(skip_current_image: bool = False, id_task: Optional[str] = None,
                 user: str | None = Depends(current_user)):
        if id_task:
            return _progress_of(_own_job(id_task, user), skip_current_image)
        job = webui.queue.current_for(user)
        if job is None or job.done:
            return models.ProgressResponse(progress=0.0, eta_relative=0.0, state=models.ProgressState())
        return _progress_of(job, skip_current_image)

    def _stop_target(id_task: str | None, body: models.TaskIdRequest | None, user: str | None):
        id_task = id_task or (body.id_task if body else None)
        if id_task:
            return _own_job(id_task, user)
        job = webui.queue.current_for(user)
        return job if job is not None and not job.done else None

    @router.post("/interrupt")
    def interrupt(id_task: Optional[str] = None, body: Optional[models.TaskIdRequest] = Body(None),
                  user: str | None = Depends(current_user)):
        job = _stop_target(id_task, body, user)
        if job is not None and not job.done:
            if job.status == "queued":
                webui.queue.cancel(job.id)
            else:
                job.interrupt()
        return {}

    @router.post("/skip")
    def skip(id_task: Optional[str] = None, body: Optional[models.TaskIdRequest] = Body(None),
             user: str | None = Depends(current_user)):
        job = _stop_target(id_task, body, user)
        if job is not None and not job.done:
            job.skip()
        return {}

    return router


def internal_router(webui) -> APIRouter:
    """/internal: the queue as the UI sees it (A1111's /internal/progress, plus a pending-task listing)."""
    from modules.core import outputs

    router = APIRouter(prefix="/internal")

    def _task(job, user, position: int) -> models.PendingTask:
        mine = job.owner == user
        return models.PendingTask(id=job.id if mine else None, kind=job.kind, position=position,
                                  eta=webui.queue.estimated_wait(job.id) if mine else None, mine=mine)

    @router.get("/pending-tasks", response_model=models.PendingTasksResponse)
    def pending_tasks(user: str | None = Depends(current_user)):
        running = webui.queue.current()
        return models.PendingTasksResponse(
            running=_task(running, user, -1) if running is not None else None,
            tasks=[_task(job, user, i) for i, job in enumerate(webui.queue.pending())])

    @router.post("/progress", response_model=models.InternalProgressResponse)
    def internal_progress(body: models.InternalProgressRequest, user: str | None = Depends(current_user)):
        job = webui.queue.get(body.id_task) if body.id_task else webui.queue.current_for(user)
        if job is None or job.owner != user:
            return models.InternalProgressResponse(active=False, queued=False, completed=False,
                                                   textinfo="unknown task" if body.id_task else None)
        queued = job.status == "queued"
        preview, preview_id = None, body.id_live_preview
        if body.live_preview and job.current_image is not None and job.preview_id != body.id_live_preview:
            preview = "data:image/png;base64," + outputs.encode_image_base64(job.current_image)
            preview_id = job.preview_id
        eta = webui.queue.estimated_wait(job.id) if queued else job.eta_relative
        return models.InternalProgressResponse(
            active=job.status == "running", queued=queued, completed=job.done, progress=job.progress, eta=eta,
            live_preview=preview, id_live_preview=preview_id, textinfo=textinfo_of(webui.queue, job) or None,
            queue_position=job.position if queued else None)

    return router
