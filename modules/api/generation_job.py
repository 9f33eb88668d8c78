"""Queue a generation (txt2img or img2img) for an API caller, wait for it, and answer in A1111's shape.

One place maps every failure of a generation request to its HTTP status, so both routes answer alike.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import HTTPException, Response

from modules.api import models

log = logging.getLogger("webui.api")


def run_generation(webui, submit: Callable[[], Any], body, response: Response,
                   parameters: dict[str, Any]) -> models.ImageResponse:
    """`submit()` queues the job (webui.submit_txt2img / submit_img2img); the answer echoes `parameters`."""
    from modules import generation_params, outputs
    from modules.jobs import DuplicateTaskError, JobStopped, QueueFullError, QueueShutDownError
    from modules.options import OptionError
    from modules.sd_models import CheckpointError
    from modules.webui_app import CheckpointNotFoundError

    try:
        job = submit()
    except CheckpointNotFoundError as e:
        raise HTTPException(400, str(e)) from None
    except generation_params.GenerationError as e:
        status = 400 if ("sampler" in str(e).lower() and "unknown" in str(e).lower()) else 422
        raise HTTPException(status, str(e)) from None
    except OptionError as e:
        raise HTTPException(400, f"override_settings: {e}") from None
    except DuplicateTaskError as e:
        raise HTTPException(409, str(e)) from None
    except ValueError as e:  # unknown styles and other input problems
        raise HTTPException(400, str(e)) from None
    except (QueueFullError, QueueShutDownError) as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "10"}) from None
    response.headers["X-Task-Id"] = job.id
    if body.override_settings and not body.override_settings_restore_afterwards:
        # A1111 keeps such overrides as the new settings; they were validated when the job was queued
        try:
            webui.options.update(webui.normalize_settings(body.override_settings, from_api=True), from_api=True)
        except (OptionError, CheckpointNotFoundError) as e:
            log.warning("override_settings of task %s were not kept: %s", job.id, e)
    try:
        result = job.wait()
    except JobStopped as e:  # interrupted before it made an image: the caller's wish, not a failure
        info = {"task_id": job.id, "interrupted": True, "message": str(e)}
        return models.ImageResponse(images=[], parameters=parameters, info=json.dumps(info))
    except generation_params.GenerationError as e:
        raise HTTPException(422, str(e)) from None
    except CheckpointError as e:
        raise HTTPException(400, f"the checkpoint cannot be used: {e}") from None
    except RuntimeError as e:
        from modules.model_manager import ModelOutOfMemoryError  # torch is loaded by now; not at start-up
        if isinstance(e, ModelOutOfMemoryError):
            raise HTTPException(503, str(e)) from None
        raise
    info = dict(result.info, task_id=job.id)
    images = [outputs.encode_image_base64(im, infotext=txt) for im, txt in
              zip(result.images, result.infotexts)] if body.send_images else []
    return models.ImageResponse(images=images, parameters=parameters, info=json.dumps(info))
