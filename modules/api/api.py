"""The /sdapi/v1 routes: thin translation between A1111's JSON contract and the services."""
from __future__ import annotations

import binascii
import json
import logging
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.api import models
from modules.options import OptionError

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


def decode_image_or_400(text: str, field: str = "image"):
    from modules import outputs
    if not text:
        raise HTTPException(422, f"{field} is empty: send a base64-encoded image")
    try:
        return outputs.decode_image_base64(text)
    except (ValueError, binascii.Error) as e:
        raise HTTPException(422, f"{field} is not a readable image: {e}") from None


def make_auth_dependency(credentials: dict[str, str]):
    """HTTP Basic auth over every route of the router when --api-auth is given."""
    basic = HTTPBasic(auto_error=False)

    def check(creds: HTTPBasicCredentials | None = Depends(basic)) -> str | None:
        if not credentials:
            return None
        if creds is not None:
            expected = credentials.get(creds.username)
            if expected is not None and secrets.compare_digest(creds.password.encode(), expected.encode()):
                return creds.username
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


def build_router(webui, api_credentials: dict[str, str]) -> APIRouter:
    from modules import generation_params as generation
    from modules import infotext, outputs, samplers
    from modules.jobs import DuplicateTaskError, QueueFullError
    from modules.sd_models import CheckpointError
    from modules.webui_app import CheckpointNotFoundError

    auth = make_auth_dependency(api_credentials)
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(auth)])

    def to_service_request(body: models.Txt2ImgRequest) -> generation.Txt2ImgRequest:
        fields = body.model_dump()
        if body.infotext:
            parsed = infotext.infotext_to_txt2img_fields(infotext.parse_infotext(body.infotext))
            sent = body.model_fields_set
            for k, v in parsed.items():
                if k in fields and k not in sent:
                    fields[k] = v
        sampler = fields.get("sampler_name") or fields.get("sampler_index") or samplers.DEFAULT_API_SAMPLER
        names = {f.name for f in generation.Txt2ImgRequest.__dataclass_fields__.values()}
        kwargs = {k: v for k, v in fields.items() if k in names and v is not None}
        kwargs["sampler_name"] = sampler
        kwargs["scheduler"] = fields.get("scheduler") or "Automatic"
        kwargs["hr_upscaler"] = fields.get("hr_upscaler") or "Latent"
        kwargs["save_images"] = bool(body.save_images)
        kwargs["styles"] = list(fields.get("styles") or [])
        return generation.Txt2ImgRequest(**kwargs)

    @router.post("/txt2img", response_model=models.ImageResponse)
    def txt2img(body: models.Txt2ImgRequest, response: Response, user: str | None = Depends(auth)):
        req = to_service_request(body)
        try:
            job = webui.submit_txt2img(req, override_settings=body.override_settings, owner=user,
                                       task_id=body.force_task_id)
        except CheckpointNotFoundError as e:
            raise HTTPException(400, str(e)) from None
        except generation.GenerationError as e:
            status = 400 if ("sampler" in str(e).lower() and "unknown" in str(e).lower()) else 422
            raise HTTPException(status, str(e)) from None
        except OptionError as e:
            raise HTTPException(400, f"override_settings: {e}") from None
        except DuplicateTaskError as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:  # unknown styles and other input problems
            raise HTTPException(400, str(e)) from None
        except QueueFullError as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "10"}) from None
        response.headers["X-Task-Id"] = job.id
        try:
            result = job.wait()
        except generation.GenerationError as e:
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
        return models.ImageResponse(images=images, parameters=body.model_dump(), info=json.dumps(info))

    @router.get("/progress", response_model=models.ProgressResponse)
    def progress(skip_current_image: bool = False, id_task: str | None = None, user: str | None = Depends(auth)):
        job = webui.queue.get(id_task) if id_task else webui.queue.current()
        if id_task and job is None:
            raise HTTPException(404, f"no task {id_task!r}")
        if job is None or job.status in ("done", "failed", "interrupted") and not id_task:
            return models.ProgressResponse(progress=0.0, eta_relative=0.0, state=models.ProgressState())
        state = models.ProgressState(
            skipped=job.skipped, interrupted=job.interrupted, job=job.kind, job_count=job.job_count or 0,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
            job_no=job.job_no or 0,
            sampling_step=job.sampling_step or 0, sampling_steps=job.sampling_steps or 0)
        image = None
        if not skip_current_image and job.current_image is not None:
            image = outputs.encode_image_base64(job.current_image)
        return models.ProgressResponse(progress=job.progress, eta_relative=job.eta_relative or 0.0, state=state,
                                       current_image=image, textinfo=job.textinfo, current_task=job.id)

    def _target_job(id_task: str | None):
        if id_task:
            job = webui.queue.get(id_task)
            if job is None:
                raise HTTPException(404, f"no task {id_task!r}")
            return job
        return webui.queue.current()

    @router.post("/interrupt")
    def interrupt(id_task: str | None = None):
        job = _target_job(id_task)
        if job is not None:
            job.interrupt()
        return {}

    @router.post("/skip")
    def skip(id_task: str | None = None):
        job = _target_job(id_task)
        if job is not None:
            job.skip()
        return {}

    @router.get("/options")
    def get_options():
        opts = webui.options.snapshot()
        info = webui.current_checkpoint()
        if info is not None:
            opts["sd_model_checkpoint"] = info.title
            opts["sd_checkpoint_hash"] = info.sha256
        return opts

    @router.post("/options")
    def set_options(body: dict[str, Any]):
        try:
            updates = webui.normalize_settings(body, from_api=True)
            webui.options.update(updates, from_api=True)
        except CheckpointNotFoundError as e:
            raise HTTPException(400, str(e)) from None
        except OptionError as e:
            raise HTTPException(422, str(e)) from None
        if "sd_model_checkpoint" in updates:
            webui.load_checkpoint_now(updates["sd_model_checkpoint"])  # A1111 loads it before answering
        return None

    @router.get("/sd-models", response_model=list[models.SDModelItem])
    def sd_models():
        return [models.SDModelItem(title=c.title, model_name=c.model_name, hash=c.shorthash, sha256=c.sha256,
                                   filename=c.filename, config=None) for c in webui.registry.list()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        webui.refresh_checkpoints()
        return None

    @router.get("/samplers", response_model=list[models.SamplerItem])
    def list_samplers():
        return samplers.samplers_api_list()

    @router.get("/schedulers", response_model=list[models.SchedulerItem])
    def list_schedulers():
        return samplers.schedulers_api_list()

    @router.post("/png-info", response_model=models.PNGInfoResponse)
    def png_info(body: models.PNGInfoRequest):
        image = decode_image_or_400(body.image)
        text = infotext.read_image_infotext(image) or ""
        items = infotext.png_info_items(image)
        items.pop("parameters", None)
        return models.PNGInfoResponse(info=text, items=items,
                                      parameters=infotext.parse_infotext(text) if text else {})

    @router.get("/memory", response_model=models.MemoryResponse)
    def memory():
        from modules import devices
        stats = devices.memory_stats(webui.device)
        return models.MemoryResponse(ram=stats.get("ram", {}), cuda=stats.get("cuda", {}),
                                     models=webui.manager.report())

    @router.post("/unload-checkpoint")
    def unload_checkpoint():
        webui.unload_checkpoints()
        return None

    @router.post("/reload-checkpoint")
    def reload_checkpoint():
        webui.load_checkpoint_now()
        return None

    return router
