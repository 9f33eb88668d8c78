"""A1111's hires fix: the first pass upscaled (in latent space, in pixels, or through a model upscaler such as
ESRGAN), then an img2img pass over it that runs exactly "Hires steps" steps; with denoising strength 0 the
upscale alone."""
from __future__ import annotations

from typing import Any

import torch

from modules.core import samplers
from modules.generation.params import (
    LATENT_UPSCALE_MODES,
    PIXEL_UPSCALERS,
    GenerationError,
)
from modules.generation.sampling import decode_latents, make_noise, run_pass
from modules.model_store import sd_pipelines


def upscale(bundle, req, latents, first_pipe, hr_w, hr_h):
    """The first pass upscaled to the hires size: latents (a latent upscaler) or PIL images (a pixel one)."""
    vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
    if req.hr_upscaler in LATENT_UPSCALE_MODES:
        mode, antialias = LATENT_UPSCALE_MODES[req.hr_upscaler]
        kw = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        return torch.nn.functional.interpolate(latents.float(), size=(hr_h // vae_scale, hr_w // vae_scale),
                                               mode=mode, **kw).to(latents.dtype)
    from PIL import Image
    decoded = decode_latents(first_pipe, latents)
    if req.hr_upscaler not in PIXEL_UPSCALERS:  # a model upscaler (ESRGAN, ...), known since validation
        return [model_upscale(req, im, hr_w, hr_h) for im in decoded]
    resample = PIXEL_UPSCALERS[req.hr_upscaler]
    return [im.resize((hr_w, hr_h), getattr(Image.Resampling, resample or "LANCZOS")) for im in decoded]


def model_upscale(req, image, hr_w, hr_h):
    """One first-pass image at the hires size through the request's model upscaler (leased from the model
    manager for it, tiled on the compute device), as A1111's resize_image does; a file that turns out not to
    load is the request's error."""
    from modules.core.upscaling import ExtrasError
    if req.upscalers is None:
        raise GenerationError(f"hr_upscaler {req.hr_upscaler!r} is a model upscaler, and this request was "
                              "validated without the server's upscalers")
    try:
        return req.upscalers.resize(image, hr_w, hr_h, req.hr_upscaler)
    except ExtrasError as e:
        raise GenerationError(f"hr_upscaler: {e}") from None


def hires_pass(ctx, bundle, req, latents, first_pipe, seeds, conditioning, hr_w, hr_h, hr_steps,
                hr_denoise, ensd, tracker, eta):
    """A1111's hires fix: upscale the first pass (in latent space or in pixels), then img2img over it."""
    image = upscale(bundle, req, latents, first_pipe, hr_w, hr_h)
    scheduler = samplers.make_scheduler(req.hr_sampler_name, req.hr_scheduler, bundle.scheduler_config, eta=eta)
    # An inpainting checkpoint's UNet takes mask + masked-image channels: its hires pass is the inpaint pipeline
    # with everything masked, as its first pass is (A1111 conditions it the same way).
    kind = "inpaint" if bundle.arch.inpainting else "img2img"
    pipe = sd_pipelines.make_pipeline(bundle, kind, scheduler, offload=ctx.offload, offload_device=ctx.offload_device)
    _, generators = make_noise(seeds, seeds, 0.0, (1, 1, 1), ensd)  # fresh per-image generators for pass two
    tracker.offset = req.steps
    extra = {}
    if kind == "inpaint":
        from PIL import Image
        extra["mask"] = [Image.new("L", (hr_w, hr_h), 255)] * len(seeds)
        if isinstance(image, torch.Tensor):
            # latent upscale: the pipeline cannot mask latents in pixel space, so the masked image (all of it
            # masked: a blank picture) is encoded here, as the pipeline does it for pixel inputs
            vae = bundle.components["vae"]
            blank = torch.zeros(len(seeds), 3, hr_h, hr_w, device=vae.device, dtype=vae.dtype)
            with torch.no_grad():
                extra["masked_image_latents"] = vae.encode(blank).latent_dist.mode() * vae.config.scaling_factor
    config = scheduler.config
    # LCM cannot take more steps than it was distilled for, no scheduler more than its training timesteps
    limit = min(int(config.get("num_train_timesteps", 1000) or 1000),
                int(config.get("original_inference_steps", 0) or 0) or 10**9)
    total, strength = hires_schedule(hr_steps, hr_denoise, limit)
    return run_pass(pipe, kind, conditioning=conditioning, sdxl=bundle.arch.family == "sdxl", steps=total,
                     cfg=req.cfg_scale, width=hr_w, height=hr_h, generators=generators,
                     eta=eta, tracker=tracker, image=image, strength=strength, **extra)


def hires_schedule(hr_steps: int, denoise: float, limit: int | None = None) -> tuple[int, float]:
    """(num_inference_steps, strength) for diffusers' img2img so that the hires pass runs exactly `hr_steps`
    steps, as A1111's does: it samples the last hr_steps of a schedule of int(hr_steps / denoise) steps
    (denoise capped at 0.999), so "Hires steps: 10, Denoising strength: 0.4" means 10 steps of a 25-step
    schedule, not 4. The strength is nudged half a step up so diffusers' int(total * strength) lands on
    hr_steps whatever the float rounding. A scheduler's `limit` on the schedule length shortens both."""
    total = max(hr_steps, int(hr_steps / min(denoise, 0.999)))
    if limit and total > limit:
        total, hr_steps = limit, min(hr_steps, limit)
    return total, min(1.0, (hr_steps + 0.5) / total)


def hires_params(req, hires, hr_denoise, hr_size) -> dict:
    extra: dict[str, Any] = {}
    if hires:
        if req.hr_resize_x or req.hr_resize_y:
            extra["Hires resize"] = f"{hr_size[0]}x{hr_size[1]}"
        else:
            extra["Hires upscale"] = req.hr_scale
        if hr_denoise == 0:
            extra["Hires pass"] = "upscale only"  # denoising strength 0: no second sampling pass
        elif req.hr_second_pass_steps:
            extra["Hires steps"] = req.hr_second_pass_steps
        extra["Hires upscaler"] = req.hr_upscaler
        if req.hr_sampler_name and req.hr_sampler_name != req.sampler_name:
            extra["Hires sampler"] = req.hr_sampler_name
        if req.hr_prompt and req.hr_prompt != req.prompt:
            extra["Hires prompt"] = req.hr_prompt
        if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
            extra["Hires negative prompt"] = req.hr_negative_prompt
    return extra
