"""Working on images without a diffusion model: /png-info (an image's generation parameters) and the extras
upscaling routes (/extra-single-image, /extra-batch-images, A1111's shapes and sizes). Extras run as jobs on the
one queue (kind "extras"; a model upscaler uses the compute device), awaited without holding a thread; the
answer's images carry the source's `parameters` and a `postprocessing` chunk, as A1111's do."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Response
from starlette.concurrency import run_in_threadpool

from modules.api import schemas as models
from modules.api.auth import current_user
from modules.api.errors import RETRY_AFTER, job_result, raise_http
from modules.api.image_input import decode_image_or_422


def router(webui) -> APIRouter:
    from modules.core import infotext, outputs, upscaling

    router = APIRouter(prefix="/sdapi/v1")

    def allow_urls() -> bool:
        return bool(webui.options.get("api_enable_requests"))

    @router.post("/png-info", response_model=models.PNGInfoResponse)
    def png_info(body: models.PNGInfoRequest):
        image = decode_image_or_422(body.image, "image", allow_urls=allow_urls())
        text = infotext.read_image_infotext(image) or ""
        items = infotext.png_info_items(image)
        items.pop("parameters", None)
        return models.PNGInfoResponse(info=text, items=items,
                                      parameters=infotext.parse_infotext(text) if text else {})

    def _extras_params(body: models.ExtrasBaseRequest) -> upscaling.ExtrasParams:
        """The service's parameters, checked (unknown upscaler 400, other problems 422) before any image is read."""
        if body.gfpgan_visibility > 0 or body.codeformer_visibility > 0:
            raise HTTPException(400, "no face restorers are installed: send gfpgan_visibility and "
                                     "codeformer_visibility 0 (see /sdapi/v1/face-restorers)")
        params = upscaling.ExtrasParams(
            resize_mode=body.resize_mode, upscaling_resize=body.upscaling_resize,
            upscaling_resize_w=body.upscaling_resize_w, upscaling_resize_h=body.upscaling_resize_h,
            upscaling_crop=body.upscaling_crop, upscaler_1=body.upscaler_1, upscaler_2=body.upscaler_2,
            extras_upscaler_2_visibility=body.extras_upscaler_2_visibility)
        try:
            upscaling.validate(params, webui.upscalers)
        except upscaling.ExtrasError as e:
            raise_http(e)
        return params

    async def _run(body, decode, user, response: Response):
        """Check the parameters and decode (on a worker thread: folders are listed, images decoded), queue, and
        await the job; the sources and the ExtrasResult."""
        def queue():
            params = _extras_params(body)
            images = decode()
            try:
                return images, webui.submit_extras([(im, None) for im in images], params, owner=user)
            except Exception as e:
                raise_http(e)

        from modules.core.jobs import JobStopped
        images, job = await run_in_threadpool(queue)
        response.headers["X-Task-Id"] = job.id
        try:
            return images, await job_result(job)
        except JobStopped as e:
            raise HTTPException(503, f"the extras job was stopped: {e}", headers=RETRY_AFTER) from None
        except Exception as e:
            raise_http(e)

    def _encoded(result, sources) -> list[str]:
        encoded = []
        for image, text, source in zip(result.images, result.infotexts, sources):
            parameters, chunks = upscaling.result_chunks(text, source, "postprocessing")
            encoded.append(outputs.encode_image_base64(image, infotext=parameters, chunks=chunks))
        return encoded

    @router.post("/extra-single-image", response_model=models.ExtrasSingleImageResponse)
    async def extra_single_image(body: models.ExtrasSingleImageRequest, response: Response,
                                 user: str | None = Depends(current_user)):
        sources, result = await _run(body, lambda: [decode_image_or_422(body.image, "image", allow_urls=allow_urls())],
                                     user, response)
        encoded = await run_in_threadpool(_encoded, result, sources)  # PNG encoding is CPU work
        return models.ExtrasSingleImageResponse(html_info=result.html_info, image=encoded[0])

    @router.post("/extra-batch-images", response_model=models.ExtrasBatchImagesResponse)
    async def extra_batch_images(body: models.ExtrasBatchImagesRequest, response: Response,
                                 user: str | None = Depends(current_user)):
        if not body.imageList:  # A1111 answers no images
            await run_in_threadpool(_extras_params, body)
            return models.ExtrasBatchImagesResponse(html_info="", images=[])

        def decode():
            return [decode_image_or_422(item.data, f"imageList[{i}].data", allow_urls=allow_urls())
                    for i, item in enumerate(body.imageList)]

        sources, result = await _run(body, decode, user, response)
        encoded = await run_in_threadpool(_encoded, result, sources)
        return models.ExtrasBatchImagesResponse(html_info=result.html_info, images=encoded)

    return router
