"""What the API answers when something fails: A1111's error shape for every failure (and no tracebacks to
clients), one map from the services' exception types to HTTP statuses and messages, and the asynchronous wait
for a queued job, shared by every route that runs one.

Waiting is asynchronous on purpose: a route that waited with `job.wait()` would hold one of the server's
worker threads for as long as its job waits in the queue (up to `queue_max_pending` of them), and with
enough clients waiting `/progress` and `/interrupt` would find no thread left to answer on.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER = {"Retry-After": "10"}
log = logging.getLogger("webui.api")


def error_body(status: int, error: str, detail: Any, body: Any = None, errors: Any = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=jsonable_encoder(
        {"error": error, "detail": detail, "body": body, "errors": errors}))


def install_error_handlers(app: FastAPI) -> None:
    """A1111's error shape `{error, detail, body, errors}` for every failure, and no tracebacks to clients."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        body = exc.body
        if isinstance(body, (bytes, bytearray)):
            body = body[:1000].decode("utf-8", "replace")
        return error_body(422, "RequestValidationError", detail or "invalid request", body, errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A server-side fault: logged with its traceback here, answered with a message (never a traceback).
        log.exception("%s %s failed", request.method, request.url.path)
        return error_body(500, type(exc).__name__, str(exc) or "internal error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        resp = error_body(exc.status_code, "HTTPException", exc.detail)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp


def http_error(exc: BaseException) -> HTTPException | None:
    """The HTTP answer for a service's failure, by the exception's type; None for a server fault (a 500)."""
    from modules import generation as generation_params
    from modules.core import jobs, upscaling
    from modules.core.options import OptionError
    from modules.model_store import checkpoint_files, sd_vae
    from modules.prompting import styles

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
    if isinstance(exc, upscaling.UnknownUpscalerError):
        return HTTPException(400, str(exc))
    if isinstance(exc, upscaling.ExtrasError):
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
