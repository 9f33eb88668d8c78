"""Queue a generation (txt2img or img2img) for an API caller, await it, and answer in A1111's shape.

Both routes answer alike: failures map to statuses by type (`modules/api/errors.py`), and the wait holds no
thread (a waiting client costs the server nothing but its socket).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import Response
from starlette.concurrency import run_in_threadpool

from modules.api import models
from modules.api.errors import job_result, raise_http

log = logging.getLogger("webui.api")


def queue_generation(webui, submit: Callable[[], Any], body, response: Response, overrides: dict[str, Any]):
    """`submit()` queues the job (webui.submit_txt2img / submit_img2img, with the settings `overrides`); returns
    the job, or raises the HTTP answer for a request that cannot be queued."""
    from modules.core.options import OptionError
    from modules.model_store.checkpoint_files import CheckpointNotFoundError

    try:
        job = submit()
    except Exception as e:
        raise_http(e)
    response.headers["X-Task-Id"] = job.id
    if overrides and not body.override_settings_restore_afterwards:
        # A1111 keeps such overrides as the new settings; they were validated when the job was queued
        try:
            webui.options.update(webui.normalize_settings(overrides, from_api=True), from_api=True)
        except (OptionError, CheckpointNotFoundError) as e:
            log.warning("override_settings of task %s were not kept: %s", job.id, e)
    return job


async def generation_answer(job, body, parameters: dict[str, Any]) -> models.ImageResponse:
    """Await the queued job and answer with its images (the answer echoes `parameters`)."""
    from modules.core.jobs import JobStopped

    try:
        result = await job_result(job)
    except JobStopped as e:  # interrupted before it made an image: the caller's wish, not a failure
        info = {"task_id": job.id, "interrupted": True, "message": str(e)}
        return models.ImageResponse(images=[], parameters=parameters, info=json.dumps(info))
    except Exception as e:
        raise_http(e)
    return await run_in_threadpool(_answer, job, result, body, parameters)  # PNG encoding is CPU work


def _answer(job, result, body, parameters: dict[str, Any]) -> models.ImageResponse:
    from modules.core import outputs

    info = dict(result.info, task_id=job.id)
    images = [outputs.encode_image_base64(im, infotext=txt) for im, txt in
              zip(result.images, result.infotexts)] if body.send_images else []
    return models.ImageResponse(images=images, parameters=parameters, info=json.dumps(info))
