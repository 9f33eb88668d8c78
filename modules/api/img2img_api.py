"""POST /sdapi/v1/img2img: A1111's img2img/inpaint request (init_images, mask, every option) -> a queued job."""
from __future__ import annotations

from fastapi import HTTPException, Response

from modules.api import models
from modules.api.image_input import decode_image_or_422


def to_service_request(body: models.Img2ImgRequest, fields: dict, *, allow_urls: bool):
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


def queue(webui, body: models.Img2ImgRequest, response: Response, user: str | None, *, allow_urls: bool):
    """Validate and queue the request; (the job, the `parameters` its answer echoes)."""
    from modules.generation import outpainting as img2img_scripts
    from modules.api.api import check_api_limits, check_scripts, fields_with_infotext
    from modules.api.generation_job import queue_generation

    check_scripts(body.model_copy(update={"script_name": None}))  # alwayson scripts: none are installed
    try:
        img2img_scripts.find(body.script_name)
    except ValueError as e:
        raise HTTPException(400, f"{e} (see /sdapi/v1/scripts)") from None
    fields, overrides = fields_with_infotext(body, models.Img2ImgRequest, webui.styles)
    req = to_service_request(body, fields, allow_urls=allow_urls)
    check_api_limits(req, webui.options.snapshot())
    parameters = body.model_dump()
    if not body.include_init_images:  # A1111 echoes the init images and mask only when asked to
        parameters["init_images"] = None
        parameters["mask"] = None
    job = queue_generation(webui, lambda: webui.submit_img2img(req, override_settings=overrides, owner=user,
                                                               task_id=body.force_task_id or None),
                           body, response, overrides)
    return job, parameters
