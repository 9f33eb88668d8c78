"""The /sdapi/v1 and /internal routes: thin translation between A1111's JSON contract and the services.

Auth is not done here: the middleware of `modules/api/auth.py` covers every route of the app; routes that act
on the caller's own jobs take `user = Depends(current_user)`. Jobs belong to their caller: progress, interrupt
and skip only ever see the caller's jobs (everyone is one anonymous caller when no credentials are set).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.api import models
from modules.api.auth import current_user
from modules.api.image_input import decode_image_or_422
from modules.core.options import OptionError

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


# Flags whose values are secrets: /cmd-flags shows that they are set, never what they are.
SECRET_FLAGS = frozenset({"api_auth", "gradio_auth"})
SCRIPT_INFO_NOTE = "no scripts are installed yet"


class ServerControl:
    """Stop/restart of the running uvicorn server, handed to the API by webui.main (None in tests' apps)."""

    def __init__(self):
        self.server = None  # uvicorn.Server, set by webui.main once it exists
        self.restart_requested = False

    def stop(self, restart: bool = False) -> None:
        if self.server is None:
            raise RuntimeError("the server was not started by webui.py")
        self.restart_requested = restart
        self.server.should_exit = True


def masked_flags(args) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        out[key] = "********" if key in SECRET_FLAGS and value else value
    return out


def _job_belongs(job, user: str | None) -> bool:
    return job is not None and job.owner == user


def check_scripts(body) -> None:
    """Scripts arrive with their own issue: no script is installed, so any named script is unknown (400)."""
    if body.script_name not in (None, "", "None"):
        raise HTTPException(400, f"unknown script {body.script_name!r}: no scripts are installed (see /sdapi/v1/scripts)")
    for title, value in (body.alwayson_scripts or {}).items():
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
            raise HTTPException(422, f"alwayson_scripts[{title!r}] must be an object like {{\"args\": [...]}}")
        raise HTTPException(400, f"unknown alwayson script {title!r}: no scripts are installed (see /sdapi/v1/scripts)")


def check_api_limits(req, opts: dict[str, Any]) -> None:
    """The server's own limits for API requests (settings api_max_*; 0 = only the built-in limits)."""
    from modules import generation
    from modules.generation import outpainting as img2img_scripts
    problems = []
    max_steps, max_size, max_images = opts["api_max_steps"], opts["api_max_size"], opts["api_max_images"]
    if max_steps and req.steps > max_steps:
        problems.append(f"steps must be at most {max_steps} on this server (setting api_max_steps), got {req.steps}")
    if max_steps and req.enable_hr and req.hr_second_pass_steps > max_steps:
        problems.append(f"hr_second_pass_steps must be at most {max_steps} on this server")
    if max_size and max(req.width, req.height) > max_size:
        problems.append(f"width and height must be at most {max_size} on this server (setting api_max_size)")
    grown = img2img_scripts.output_size(req) if getattr(req, "script_name", None) else None
    if max_size and grown and max(grown) > max_size:
        problems.append(f"{req.script_name}: the expanded image would be {grown[0]}x{grown[1]}, over this server's "
                        f"{max_size} pixels a side (setting api_max_size)")
    if req.enable_hr and (req.width <= 0 or req.height <= 0):
        problems.append("width and height must be positive")
    elif max_size and req.enable_hr and max(generation.hires_target_size(req)) > max_size:
        problems.append(f"the hires fix size must be at most {max_size} on this server (setting api_max_size)")
    if max_images and req.batch_size * req.n_iter > max_images:
        problems.append(f"at most {max_images} images per request on this server (setting api_max_images)")
    if problems:
        raise HTTPException(422, "; ".join(problems))


def fields_with_infotext(body, model_cls, styles) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request fields, override settings) of a txt2img/img2img body. Its `infotext` fills the fields the
    body does not send, and the settings it carries (Clip skip, ENSD, eta) apply under the body's own
    `override_settings`, as A1111 applies an infotext: the image then is the one the infotext describes. The
    styles it names are taken back out of its prompts (`styles`, the style database), so they apply once."""
    from modules.core import infotext
    fields = body.model_dump()
    overrides = dict(body.override_settings or {})
    if body.infotext:
        parsed = infotext.infotext_to_txt2img_fields(infotext.parse_infotext(body.infotext))
        overrides = {**parsed.pop("override_settings", {}), **overrides}
        if parsed.get("styles"):
            parsed["prompt"], parsed["negative_prompt"], parsed["styles"] = styles.extract(
                parsed.get("prompt", ""), parsed.get("negative_prompt", ""), parsed["styles"])
        sent = body.model_fields_set
        for k, v in parsed.items():
            if k in fields and k not in sent:
                fields[k] = v
        # the infotext's values pass through the request model again, so a stray text is a 422, not a crash
        try:
            fields = model_cls(**fields).model_dump()
        except ValueError as e:
            raise HTTPException(422, f"infotext: {e}") from None
    return fields, overrides


def build_router(webui, server_control: ServerControl | None = None) -> APIRouter:
    from modules import generation
    from modules.core import infotext
    from modules.core import outputs
    from modules.core import samplers
    from modules.core import upscaling
    from modules.model_store.checkpoint_files import CheckpointError
    from modules.model_store.checkpoint_files import CheckpointNotFoundError

    router = APIRouter(prefix="/sdapi/v1")

    def allow_urls() -> bool:
        return bool(webui.options.get("api_enable_requests"))

    def to_service_request(fields: dict[str, Any], body: models.Txt2ImgRequest) -> generation.Txt2ImgRequest:
        sampler = fields.get("sampler_name") or fields.get("sampler_index") or samplers.DEFAULT_API_SAMPLER
        names = {f.name for f in generation.Txt2ImgRequest.__dataclass_fields__.values()}
        kwargs = {k: v for k, v in fields.items() if k in names and v is not None}
        kwargs["sampler_name"] = sampler
        kwargs["scheduler"] = fields.get("scheduler") or "Automatic"
        kwargs["hr_upscaler"] = fields.get("hr_upscaler") or "Latent"
        kwargs["save_images"] = bool(body.save_images)
        # A1111's API: without save_images nothing is saved and no grid is made (so n images answer n images)
        kwargs["do_not_save_grid"] = bool(body.do_not_save_grid) or not body.save_images
        kwargs["do_not_save_samples"] = bool(body.do_not_save_samples) or not body.save_images
        kwargs["styles"] = list(fields.get("styles") or [])
        return generation.Txt2ImgRequest(**kwargs)

    @router.post("/txt2img", response_model=models.ImageResponse)
    async def txt2img(body: models.Txt2ImgRequest, response: Response, user: str | None = Depends(current_user)):
        from modules.api.generation_job import generation_answer, queue_generation

        def queue():
            check_scripts(body)
            fields, overrides = fields_with_infotext(body, models.Txt2ImgRequest, webui.styles)
            req = to_service_request(fields, body)
            check_api_limits(req, webui.options.snapshot())
            return queue_generation(
                webui, lambda: webui.submit_txt2img(req, override_settings=overrides, owner=user,
                                                    task_id=body.force_task_id or None), body, response, overrides)

        job = await run_in_threadpool(queue)  # validation reads files (styles, checkpoints): off the event loop
        return await generation_answer(job, body, body.model_dump())

    @router.post("/img2img", response_model=models.ImageResponse)
    async def img2img(body: models.Img2ImgRequest, response: Response, user: str | None = Depends(current_user)):
        from modules.api import img2img_api  # img2img, inpainting and the outpainting scripts
        from modules.api.generation_job import generation_answer
        job, parameters = await run_in_threadpool(img2img_api.queue, webui, body, response, user,
                                                  allow_urls=allow_urls())  # decoding images is CPU work
        return await generation_answer(job, body, parameters)

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
                                       current_image=image, textinfo=job.textinfo, current_task=job.id)

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
            try:
                webui.load_checkpoint_now(updates["sd_model_checkpoint"])  # A1111 loads it before answering
            except CheckpointError as e:
                raise HTTPException(400, f"the checkpoint cannot be used: {e}") from None
        return None

    @router.get("/cmd-flags")
    def cmd_flags():
        return masked_flags(webui.args)

    @router.get("/sd-models", response_model=list[models.SDModelItem])
    def sd_models():
        return [models.SDModelItem(title=c.title, model_name=c.model_name, hash=c.shorthash, sha256=c.sha256,
                                   filename=c.filename, config=None) for c in webui.registry.list()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        webui.refresh_checkpoints()
        return None

    @router.get("/sd-vae", response_model=list[models.SDVaeItem])
    def sd_vae():
        return [models.SDVaeItem(model_name=v.name, filename=str(v.path)) for v in webui.vaes.list()]

    @router.post("/refresh-vae")
    def refresh_vae():
        webui.vaes.refresh()
        return None

    @router.get("/samplers", response_model=list[models.SamplerItem])
    def list_samplers():
        return samplers.samplers_api_list()

    @router.get("/schedulers", response_model=list[models.SchedulerItem])
    def list_schedulers():
        return samplers.schedulers_api_list()

    @router.get("/upscalers", response_model=list[models.UpscalerItem])
    def list_upscalers():
        return upscaling.upscaler_list()

    @router.get("/latent-upscale-modes", response_model=list[models.LatentUpscalerModeItem])
    def latent_upscale_modes():
        return [{"name": name} for name in generation.LATENT_UPSCALE_MODES]

    @router.get("/prompt-styles", response_model=list[models.PromptStyleItem])
    def prompt_styles():
        return webui.styles.api_list()

    # Features that do not exist here yet answer A1111's shapes, empty (clients list them at start-up).
    @router.get("/scripts", response_model=models.ScriptsList)
    def scripts():
        from modules.generation import outpainting as img2img_scripts
        return models.ScriptsList(img2img=[t.lower() for t in img2img_scripts.TITLES])

    @router.get("/script-info", response_model=list[dict[str, Any]])
    def script_info():
        return []

    @router.get("/extensions", response_model=list[dict[str, Any]])
    def extensions():
        return []

    @router.get("/face-restorers", response_model=list[dict[str, Any]])
    def face_restorers():
        return []

    @router.get("/realesrgan-models", response_model=list[dict[str, Any]])
    def realesrgan_models():
        return []

    @router.get("/hypernetworks", response_model=list[dict[str, Any]])
    def hypernetworks():
        return []

    @router.post("/png-info", response_model=models.PNGInfoResponse)
    def png_info(body: models.PNGInfoRequest):
        image = decode_image_or_422(body.image, "image", allow_urls=allow_urls())
        text = infotext.read_image_infotext(image) or ""
        items = infotext.png_info_items(image)
        items.pop("parameters", None)
        return models.PNGInfoResponse(info=text, items=items,
                                      parameters=infotext.parse_infotext(text) if text else {})

    def _extras_params(body: models.ExtrasBaseRequest) -> upscaling.ExtrasParams:
        if body.gfpgan_visibility > 0 or body.codeformer_visibility > 0:
            raise HTTPException(400, "no face restorers are installed: send gfpgan_visibility and "
                                     "codeformer_visibility 0 (see /sdapi/v1/face-restorers)")
        params = upscaling.ExtrasParams(
            resize_mode=body.resize_mode, upscaling_resize=body.upscaling_resize,
            upscaling_resize_w=body.upscaling_resize_w, upscaling_resize_h=body.upscaling_resize_h,
            upscaling_crop=body.upscaling_crop, upscaler_1=body.upscaler_1, upscaler_2=body.upscaler_2,
            extras_upscaler_2_visibility=body.extras_upscaler_2_visibility)
        try:
            upscaling.validate(params)
        except upscaling.UnknownUpscalerError as e:
            raise HTTPException(400, str(e)) from None
        except upscaling.ExtrasError as e:
            raise HTTPException(422, str(e)) from None
        return params

    def _extras_run(image, params):
        try:
            return upscaling.run(image, params)
        except upscaling.ExtrasError as e:
            raise HTTPException(422, str(e)) from None

    @router.post("/extra-single-image", response_model=models.ExtrasSingleImageResponse)
    def extra_single_image(body: models.ExtrasSingleImageRequest):
        params = _extras_params(body)
        image = decode_image_or_422(body.image, "image", allow_urls=allow_urls())
        return models.ExtrasSingleImageResponse(html_info="", image=outputs.encode_image_base64(_extras_run(image, params)))

    @router.post("/extra-batch-images", response_model=models.ExtrasBatchImagesResponse)
    def extra_batch_images(body: models.ExtrasBatchImagesRequest):
        params = _extras_params(body)
        images = [decode_image_or_422(item.data, f"imageList[{i}].data", allow_urls=allow_urls())
                  for i, item in enumerate(body.imageList)]
        return models.ExtrasBatchImagesResponse(
            html_info="", images=[outputs.encode_image_base64(_extras_run(im, params)) for im in images])

    @router.get("/memory", response_model=models.MemoryResponse)
    def memory():
        from modules.core import devices
        stats = devices.memory_stats(webui.device)
        return models.MemoryResponse(ram=stats.get("ram", {}), cuda=stats.get("cuda", {}),
                                     models=webui.manager.report())

    @router.post("/unload-checkpoint")
    def unload_checkpoint():
        webui.unload_checkpoints()
        return None

    @router.post("/reload-checkpoint")
    def reload_checkpoint():
        try:
            webui.load_checkpoint_now()
        except CheckpointError as e:
            raise HTTPException(400, f"the checkpoint cannot be used: {e}") from None
        return None

    def _server_action(restart: bool) -> JSONResponse:
        if not webui.args.api_server_stop:
            raise HTTPException(403, "stopping the server over the API is off: start it with --api-server-stop")
        if server_control is None or server_control.server is None:
            raise HTTPException(503, "this server was not started by webui.py and cannot stop itself")
        # answer first, then stop: the client gets its reply before the socket closes
        return JSONResponse({"message": "restarting" if restart else "stopping"},
                            background=BackgroundTask(server_control.stop, restart))

    @router.post("/server-stop")
    def server_stop():
        return _server_action(restart=False)

    @router.post("/server-kill")
    def server_kill():
        return _server_action(restart=False)

    @router.post("/server-restart")
    def server_restart():
        return _server_action(restart=True)

    return router


def build_internal_router(webui) -> APIRouter:
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
            live_preview=preview, id_live_preview=preview_id, textinfo=job.textinfo or None,
            queue_position=job.position if queued else None)

    return router
