"""Working on images without a model: /png-info (an image's generation parameters) and the extras upscaling
routes (/extra-single-image, /extra-batch-images, with A1111's sizes)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException

from modules.api import schemas as models
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

    return router
