"""POST /sdapi/v1/txt2img and /img2img: A1111's request bodies -> validated service requests -> queued jobs ->
answers in A1111's shape. The server's own API limits, the `infotext` field and A1111's save/grid rules for the
API are applied here; failures map to statuses by type (`errors`), and the wait holds no thread."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException, Response
from starlette.concurrency import run_in_threadpool

from modules.api import schemas as models
from modules.api.auth import current_user
from modules.api.errors import job_result, raise_http
from modules.api.image_input import decode_image_or_422

log = logging.getLogger("webui.api")


def bind_scripts(webui, body, is_img2img: bool):
    """The request's scripts (`script_name` + positional `script_args` in A1111's order, `alwayson_scripts`
    {title: {"args": [...]}}), completed with the scripts' defaults; unknown names are a 400, bad arguments a
    422, each naming the script."""
    for title, value in (body.alwayson_scripts or {}).items():
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list):
            raise HTTPException(422, f"alwayson_scripts[{title!r}] must be an object like {{\"args\": [...]}}")
    try:
        return webui.scripts.bind(is_img2img, body.script_name, list(body.script_args or []),
                                  body.alwayson_scripts or {})
    except Exception as e:
        raise_http(e)


UNSUPPORTED = {  # request field -> what a client asked for that this studio does not have
    "restore_faces": "face restoration", "tiling": "tiling", "refiner_checkpoint": "the refiner",
    "hr_checkpoint_name": "a separate hires checkpoint"}


def check_unsupported(body) -> None:
    """A request that needs a feature this studio does not have is a 400 naming it, not a silent difference."""
    for field_name, feature in UNSUPPORTED.items():
        value = getattr(body, field_name, None)
        if value and value not in ("Use same checkpoint", "None"):
            raise HTTPException(400, f"{field_name}: {feature} is not available in this studio; leave it unset")


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

def img2img_request(body: models.Img2ImgRequest, fields: dict, *, allow_urls: bool):
    """The API body (and its fields, infotext applied) -> modules.img2img_params.Img2ImgRequest (images
    decoded; bad ones are a 422 naming the field)."""
    from modules.core import samplers
    from modules.generation.img2img_params import Img2ImgRequest

    if not body.init_images:
        raise HTTPException(422, "init_images: at least one init image is needed (base64 PNG/JPEG or a data URI)")
    images = [decode_image_or_422(text, f"init_images[{i}]", allow_urls=allow_urls)
              for i, text in enumerate(body.init_images)]
    mask = decode_image_or_422(body.mask, "mask", allow_urls=allow_urls) if body.mask else None
    names = set(Img2ImgRequest.__dataclass_fields__)
    kwargs = {k: v for k, v in fields.items() if k in names and v is not None}
    kwargs.update(init_images=images, mask=mask, save_images=bool(body.save_images),
                  do_not_save_grid=bool(body.do_not_save_grid) or not body.save_images,
                  do_not_save_samples=bool(body.do_not_save_samples) or not body.save_images,
                  styles=list(fields.get("styles") or []),
                  sampler_name=fields.get("sampler_name") or fields.get("sampler_index") or samplers.DEFAULT_API_SAMPLER,
                  scheduler=fields.get("scheduler") or "Automatic", script_args=list(body.script_args or []))
    if fields.get("mask_blur") is not None:
        kwargs["mask_blur_x"] = kwargs["mask_blur_y"] = fields["mask_blur"]
    for key in ("enable_hr", "hr_scale", "hr_upscaler"):  # txt2img-only fields an infotext may carry
        kwargs.pop(key, None)
    kwargs["inpainting_mask_invert"] = int(kwargs.get("inpainting_mask_invert", 0))
    return Img2ImgRequest(**kwargs)


def queue_img2img(webui, body: models.Img2ImgRequest, response: Response, user: str | None, *, allow_urls: bool):
    """Validate and queue the request; (the job, the `parameters` its answer echoes)."""
    selection = bind_scripts(webui, body, True)
    check_unsupported(body)
    fields, overrides = fields_with_infotext(body, models.Img2ImgRequest, webui.styles)
    req = img2img_request(body, fields, allow_urls=allow_urls)
    if selection.title:  # the script's canonical title and its completed arguments (the info names them)
        req = dataclasses.replace(req, script_name=selection.title, script_args=selection.script[1])
    check_api_limits(req, webui.options.snapshot())
    parameters = body.model_dump()
    if not body.include_init_images:  # A1111 echoes the init images and mask only when asked to
        parameters["init_images"] = None
        parameters["mask"] = None
    job = queue_generation(webui, lambda: webui.submit_img2img(req, override_settings=overrides, owner=user,
                                                               task_id=body.force_task_id or None,
                                                               scripts=selection),
                           body, response, overrides)
    return job, parameters

def router(webui) -> APIRouter:
    from modules import generation
    from modules.core import samplers

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
        def queue():
            selection = bind_scripts(webui, body, False)
            check_unsupported(body)
            fields, overrides = fields_with_infotext(body, models.Txt2ImgRequest, webui.styles)
            req = to_service_request(fields, body)
            check_api_limits(req, webui.options.snapshot())
            return queue_generation(
                webui, lambda: webui.submit_txt2img(req, override_settings=overrides, owner=user,
                                                    task_id=body.force_task_id or None, scripts=selection),
                body, response, overrides)

        job = await run_in_threadpool(queue)  # validation reads files (styles, checkpoints): off the event loop
        return await generation_answer(job, body, body.model_dump())

    @router.post("/img2img", response_model=models.ImageResponse)
    async def img2img(body: models.Img2ImgRequest, response: Response, user: str | None = Depends(current_user)):
        job, parameters = await run_in_threadpool(queue_img2img, webui, body, response, user,
                                                  allow_urls=allow_urls())  # decoding images is CPU work
        return await generation_answer(job, body, parameters)

    return router
