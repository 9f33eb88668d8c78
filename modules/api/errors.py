"""What the API answers when a service fails: one map from exception types to HTTP statuses and messages, and
the asynchronous wait for a queued job, shared by every route that runs one.

Waiting is asynchronous on purpose: a route that waited with `job.wait()` would hold one of the server's
worker threads for as long as its job waits in the queue (up to `queue_max_pending` of them), and with
enough clients waiting `/progress` and `/interrupt` would find no thread left to answer on.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any

from fastapi import HTTPException

RETRY_AFTER = {"Retry-After": "10"}


def http_error(exc: BaseException) -> HTTPException | None:
    """The HTTP answer for a service's failure, by the exception's type; None for a server fault (a 500)."""
    from modules import generation as generation_params
    from modules.core import jobs
    from modules.model_store import sd_vae
    from modules.prompting import styles
    from modules.model_store import checkpoint_files
    from modules.core.options import OptionError

    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, checkpoint_files.CheckpointNotFoundError):
        return HTTPException(400, str(exc))
    if isinstance(exc, checkpoint_files.CheckpointError):
        return HTTPException(400, f"the checkpoint cannot be used: {exc}")
    if isinstance(exc, (generation_params.UnknownNameError, styles.UnknownStyleError, sd_vae.UnknownVaeError)):
        return HTTPException(400, str(exc))
    if isinstance(exc, generation_params.GenerationError):
        return HTTPException(422, str(exc))
    if isinstance(exc, OptionError):
        return HTTPException(400, f"override_settings: {exc}")
    if isinstance(exc, jobs.DuplicateTaskError):
        return HTTPException(409, str(exc))
    if isinstance(exc, (jobs.QueueFullError, jobs.QueueShutDownError)):
        return HTTPException(503, str(exc), headers=RETRY_AFTER)
    captioning = sys.modules.get("modules.captioning.models")  # imported by the captioning routes when used
    if captioning is not None:
        if isinstance(exc, captioning.CaptionerNotFoundError):
            return HTTPException(404, str(exc))
        if isinstance(exc, captioning.CaptionerError):
            return HTTPException(422, str(exc))
    manager = sys.modules.get("modules.model_store.model_manager")  # imports torch: loaded once a model was, not before
    if manager is not None and isinstance(exc, manager.ModelOutOfMemoryError):
        return HTTPException(503, str(exc))
    return None


def raise_http(exc: BaseException):
    """Re-raise a service's failure as its HTTP answer (a server fault stays itself: a logged 500)."""
    mapped = http_error(exc)
    if mapped is None:
        raise exc
    raise mapped from None


async def job_result(job) -> Any:
    """Await a queued job without holding a thread; its result, or its error (JobStopped included) raised."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake(_job) -> None:
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    job.add_done_callback(wake)
    await finished
    return job.wait(0)
