"""The txt2img service: a request (every A1111 field) -> images, seeds, infotexts, saved files."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modules.core import infotext as infotext_mod
from modules import networks
from modules.core import outputs
from modules.prompting import prompt_parser
from modules.prompting import prompts
from modules.core import samplers
from modules.model_store import sd_pipelines
from modules.model_store import checkpoint_files
from modules.generation.params import (HIRES_UPSCALERS, LATENT_UPSCALE_MODES, PIXEL_UPSCALERS,
                                       GenerationError, Txt2ImgRequest, hires_target_size, validate)
from modules.core.jobs import Job, JobInterrupted, JobSkipped
from modules.core.version import VERSION

log = logging.getLogger("webui.generation")

# The request side lives in generation_params (torch-free); it is re-exported here for callers of the service.
__all__ = ["GenerationContext", "GenerationResult", "GenerationError", "Txt2ImgRequest", "validate",
           "run_txt2img", "hires_target_size", "HIRES_UPSCALERS", "make_noise", "slerp"]


@dataclass
class GenerationContext:
    """What the txt2img service needs from the running server (no globals)."""
    registry: Any  # checkpoints.CheckpointRegistry
    manager: Any  # model_manager.ModelManager
    styles: Any  # styles.StyleDatabase
    outputs_root: Path
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype | None = None
    offload: str | None = None  # None | "model" | "sequential"
    attention: str = "sdpa"  # "sdpa" | "xformers"
    offload_device: str = "cuda"  # where offloaded parts run
    networks: Any = None  # networks.ExtraNetworks: LoRA files and embeddings (None: none of either)
    vaes: Any = None  # sd_vae.VaeRegistry: the VAE files the `sd_vae` setting picks from (None: only built-in ones)


@dataclass
class GenerationResult:
    images: list  # PIL images (grid first when one was made and return_grid is on)
    infotexts: list[str]
    info: dict
    paths: list[Path]
    grid_count: int = 0
    samples: list | None = None  # float images (H x W x 3 in [0, 1]) when the run was asked to keep them


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (variation seeds)."""
    af, bf = a.flatten().double(), b.flatten().double()
    dot = (af / af.norm()).dot(bf / bf.norm()).clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1 - t) * omega) / so) * a.double() + (torch.sin(t * omega) / so) * b.double()).to(a.dtype)


def make_noise(seeds: list[int], subseeds: list[int], subseed_strength: float, shape: tuple[int, ...],
               eta_noise_seed_delta: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise, one CPU generator per image (seeded seed+i), as A1111 and diffusers' list-generator path do.

    The returned generators have drawn the initial noise already, so passing them on to the pipeline gives
    ancestral/SDE samplers exactly the noise the plain diffusers call would get.
    """
    generators, noises = [], []
    for seed, subseed in zip(seeds, subseeds):
        g = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, *shape), generator=g, dtype=torch.float32)
        if subseed_strength > 0:
            sub = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(subseed), dtype=torch.float32)
            noise = slerp(subseed_strength, noise, sub)
        if eta_noise_seed_delta:
            g = torch.Generator("cpu").manual_seed(seed + eta_noise_seed_delta)
        generators.append(g)
        noises.append(noise)
    return torch.cat(noises), generators


def resolve_seeds(req: Txt2ImgRequest) -> tuple[list[int], list[int], int, int]:
    seed = req.seed if req.seed != -1 else random.randrange(2**32)
    subseed = req.subseed if req.subseed != -1 else random.randrange(2**32)
    n = req.batch_size * req.n_iter
    # A1111: with a variation strength the main seed stays fixed and the variation seed counts up.
    seeds = [seed + (i if req.subseed_strength == 0 else 0) for i in range(n)]
    subseeds = [subseed + i for i in range(n)]
    return seeds, subseeds, seed, subseed


class _StepTracker:
    """Turns diffusers' step callbacks into job progress, previews and the latest latents (for partial results)."""

    def __init__(self, job: Job | None, total: int, family: str, preview_every: int, offset: int = 0):
        self.job, self.total, self.family, self.offset = job, total, family, offset
        self.preview_every = preview_every
        self.latents: torch.Tensor | None = None
        self.switch: prompts.ConditioningSwitch | None = None  # prompt editing/AND: told when a step ends

    def __call__(self, pipe, i, t, kwargs):
        latents = kwargs["latents"]
        self.latents = latents
        if self.switch is not None:
            self.switch.on_step_end(i)
        if self.job is not None:
            # a second-order scheduler calls back once per model call (2 per step, 1 for the last): count steps
            step = -(-(i + 1) // scheduler_order(pipe.scheduler))
            self.job.step(self.offset + step, self.total,
                          preview=lambda: sd_pipelines.cheap_preview(latents, self.family))
        return kwargs


def scheduler_order(scheduler) -> int:
    """Model calls per step of a diffusers scheduler (2 for Heun and DPM2, else 1)."""
    return max(1, int(getattr(scheduler, "order", 1) or 1))


def decode_latents(pipe, latents: torch.Tensor, samples: list | None = None) -> list:
    """VAE-decode exactly as the diffusers pipelines do, in the VAE's own dtype (so --no-half-vae works), to PIL
    images. With a `samples` list, the decoded float images (H x W x 3 in [0, 1], what `output_type="np"`
    gives) are appended to it too: fidelity checks compare those, before rounding to 8 bits."""
    vae = pipe.vae
    with torch.no_grad():
        scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        image = vae.decode(scaled, return_dict=False)[0]
    arrays = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
    if samples is not None:
        samples.extend(arrays)
    return pipe.image_processor.numpy_to_pil(arrays)


def sample_latents(pipe, *, conditioning: prompts.ScheduledConditioning, sdxl: bool, steps, cfg, generators, eta,
                   tracker, **kw):
    """One denoising run of `pipe` to latents, with this request's conditioning (switched per step when it
    uses prompt editing or AND), progress through `tracker`, and the pipeline's own inputs in `kw`."""
    batch = len(generators)
    kw.update(num_inference_steps=steps, guidance_scale=cfg, generator=generators, output_type="latent",
              callback_on_step_end=tracker, callback_on_step_end_tensor_inputs=["latents"],
              **prompts.pipeline_embeds(conditioning, batch, sdxl))
    if eta is not None:
        kw["eta"] = eta
    switch = None if conditioning.is_static else prompts.ConditioningSwitch(pipe.unet, conditioning, batch)
    tracker.switch = switch
    try:
        with torch.inference_mode(), (switch or contextlib.nullcontext()):
            return pipe(**kw).images
    finally:
        tracker.switch = None


def _run_pass(pipe, kind: str, *, conditioning: prompts.ScheduledConditioning, sdxl: bool, steps, cfg, width,
              height, generators, eta, tracker, latents=None, image=None, mask=None, strength=None,
              masked_image_latents=None):
    if kind == "txt2img":
        kw = dict(height=height, width=width, latents=latents)
    elif kind == "inpaint":
        kw = dict(height=height, width=width, latents=latents, image=image, mask_image=mask, strength=strength,
                  masked_image_latents=masked_image_latents)
    else:
        kw = dict(image=image, strength=strength)
    return sample_latents(pipe, conditioning=conditioning, sdxl=sdxl, steps=steps, cfg=cfg, generators=generators,
                          eta=eta, tracker=tracker, **kw)


def text_conditioner(ctx: GenerationContext, bundle, settings: dict, clip_skip: int) -> prompts.TextConditioner:
    """The prompt encoder for this checkpoint with this request's settings (emphasis, embeddings, backtrack)."""
    return prompts.TextConditioner(
        bundle.components, bundle.arch.family, clip_skip,
        emphasis=settings.get("emphasis", prompts.EMPHASIS_ORIGINAL),
        embeddings=ctx.networks.embeddings.all() if ctx.networks is not None else None,
        comma_backtrack=int(settings.get("comma_padding_backtrack", prompts.COMMA_BACKTRACK)),
        sdxl_clip_l_skip=bool(settings.get("sdxl_clip_l_skip", False)))


def run_txt2img(ctx: GenerationContext, req: Txt2ImgRequest, job: Job | None = None,
                settings: dict | None = None, *, keep_samples: bool = False) -> GenerationResult:
    """Generate every image of a (validated) request on the current thread (the job worker). With
    `keep_samples` the result also holds each image as decoded floats (`samples`, no grid among them)."""
    settings = settings or {}
    prompt, negative = ctx.styles.apply(req.prompt, req.negative_prompt, req.styles)
    seeds, subseeds, seed, subseed = resolve_seeds(req)
    clip_skip = int(settings.get("CLIP_stop_at_last_layers", 1))
    ensd = int(settings.get("eta_noise_seed_delta", 0))
    preview_every = int(settings.get("show_progress_every_n_steps", 0)) if settings.get("live_previews_enable", True) else 0
    if job is not None:
        job.preview_every = preview_every
    hires = req.enable_hr
    eta_choice = samplers.resolve_eta(req.sampler_name, req.eta, settings)
    hr_eta_choice = samplers.resolve_eta(req.hr_sampler_name or req.sampler_name, req.eta, settings)
    hr_w, hr_h = hires_target_size(req) if hires else (req.width, req.height)
    hr_denoise = req.denoising_strength if req.denoising_strength is not None else 0.7
    hr_steps = req.hr_second_pass_steps or req.steps
    # denoising strength 0 (A1111's API smoke test sends it): the upscale alone, no second sampling pass
    upscale_only = hires and hr_denoise == 0
    # A1111: the hires pass runs exactly hr_steps steps
    steps_per_iter = req.steps + (hr_steps if hires and not upscale_only else 0)

    # LoRA tags come out of the text before encoding; bad ones are reported, and the image is made anyway.
    # The hires pass runs with the LoRAs of the hires prompt (the first pass's prompt when it is empty).
    warnings: list[str] = [w for w in dict.fromkeys((eta_choice.warning, hr_eta_choice.warning if hires else None))
                           if w]
    resolved = _resolve_networks(ctx, prompt)
    warnings.extend(resolved.warnings)
    # As in A1111 the styles apply to the hires prompts too; an empty one is the first pass's (styled) prompt.
    hr_prompt, hr_negative = ctx.styles.apply(req.hr_prompt or req.prompt,
                                              req.hr_negative_prompt or req.negative_prompt, req.styles)
    hr_resolved = _resolve_networks(ctx, hr_prompt) if hires and req.hr_prompt else resolved
    _add_new(warnings, hr_resolved.warnings)

    images, infotexts, all_paths = [], [], []
    samples = [] if keep_samples else None
    today = datetime.date.today()
    with leased_checkpoint(ctx, settings, warnings) as bundle, \
            _leased_passes(ctx, resolved, hr_resolved, warnings) as (applied, hr_applied), \
            _MergedLoras(bundle, warnings) as merged:
        info, family = bundle.info, bundle.arch.family
        merged.use(applied)
        conditioner = text_conditioner(ctx, bundle, settings, clip_skip)
        old_scheduling = bool(settings.get("use_old_scheduling", False))
        sampler_info = samplers.make_scheduler(req.sampler_name, req.scheduler, bundle.scheduler_config)
        # prompt-editing steps count model calls, as A1111's do: a second-order sampler's schedule is twice as long
        conditioning = prompts.build_conditioning(conditioner, resolved.prompt, negative,
                                                  req.steps * scheduler_order(sampler_info),
                                                  use_old_scheduling=old_scheduling)
        hr_conditioning = None
        if hires and not upscale_only:
            # encoded with the hires pass's LoRAs merged (a fresh encoder: the first one caches per text)
            hr_conditioner = text_conditioner(ctx, bundle, settings, clip_skip) if merged.use(hr_applied) else \
                conditioner
            hr_order = scheduler_order(samplers.make_scheduler(req.hr_sampler_name, req.hr_scheduler,
                                                               bundle.scheduler_config))
            hr_conditioning = prompts.build_conditioning(
                hr_conditioner, hr_resolved.prompt, hr_negative, req.steps * hr_order, hr_steps * hr_order,
                old_scheduling)
        first_names = {a.info.name for a in applied}
        both_passes = applied + [a for a in hr_applied if a.info.name not in first_names]
        network_params = _network_params(both_passes, prompts.embeddings_in(
            [resolved.prompt, negative, hr_resolved.prompt, hr_negative],
            conditioner.used_embeddings))
        inpainting_model = bundle.arch.inpainting
        vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
        latent_channels = bundle.components["unet"].config.out_channels
        pipe = sd_pipelines.make_pipeline(bundle, "inpaint" if inpainting_model else "txt2img", sampler_info,
                                          offload=ctx.offload, offload_device=ctx.offload_device)
        for it in range(req.n_iter):
            if job is not None:
                job.begin_iteration(it, req.n_iter)
            merged.use(applied)  # the first pass's LoRAs again after the previous iteration's hires pass
            lo, hi = it * req.batch_size, (it + 1) * req.batch_size
            it_seeds, it_subseeds = seeds[lo:hi], subseeds[lo:hi]
            shape = (latent_channels, req.height // vae_scale, req.width // vae_scale)
            noise, generators = make_noise(it_seeds, it_subseeds, req.subseed_strength, shape, ensd)
            pipe.scheduler = samplers.make_scheduler(req.sampler_name, req.scheduler, bundle.scheduler_config,
                                                     eta=eta_choice.eta)
            tracker = _StepTracker(job, steps_per_iter, family, preview_every)
            extra = {}
            if inpainting_model:
                # txt2img on an inpainting model: the whole image is "masked" over a neutral grey picture.
                from PIL import Image
                grey = Image.new("RGB", (req.width, req.height), (127, 127, 127))
                white = Image.new("L", (req.width, req.height), 255)
                extra = dict(image=[grey] * len(it_seeds), mask=[white] * len(it_seeds), strength=1.0)
            stopped = pixels = None
            try:
                latents = _run_pass(pipe, "inpaint" if inpainting_model else "txt2img",
                                    conditioning=conditioning, sdxl=family == "sdxl",
                                    steps=req.steps, cfg=req.cfg_scale, width=req.width, height=req.height,
                                    generators=generators, eta=eta_choice.eta, tracker=tracker,
                                    latents=noise, **extra)
                if upscale_only:
                    upscaled = _hires_upscale(bundle, req, latents, pipe, hr_w, hr_h)
                    if isinstance(upscaled, torch.Tensor):
                        latents = upscaled
                    else:
                        pixels = upscaled
                elif hires:
                    merged.use(hr_applied)
                    latents = _hires_pass(ctx, bundle, req, latents, pipe, it_seeds, hr_conditioning,
                                          hr_w, hr_h, hr_steps, hr_denoise, ensd, tracker, hr_eta_choice.eta)
            except (JobInterrupted, JobSkipped) as e:
                # A1111 keeps what was drawn so far: decode the latest latents as this iteration's images.
                stopped = e
                latents = tracker.latents
                if latents is None:
                    if isinstance(e, JobInterrupted):
                        break
                    continue
            if pixels is not None:  # a pixel upscaler's output with no second pass: these are the images
                batch_images = pixels
                if samples is not None:
                    samples.extend(np.asarray(im, np.float32) / 255 for im in pixels)
            else:
                batch_images = decode_latents(pipe, latents, samples)
            for j, image in enumerate(batch_images):
                params = _infotext_params(req, bundle.info, it_seeds[j], it_subseeds[j], clip_skip, hires, hr_denoise,
                                          (hr_w, hr_h))
                params.update(network_params)
                params.update(sampler_params(req.sampler_name, eta_choice, ensd))
                params.update(vae_params(bundle))
                text = infotext_mod.create_infotext(prompt, negative, params)
                images.append(image)
                infotexts.append(text)
                save_sample(ctx, settings, req, "txt2img-images", today, image, it_seeds[j], prompt, text, all_paths)
            if isinstance(stopped, JobInterrupted):
                break

    grid_count = add_grid(ctx, settings, req, "txt2img-grids", today, images, infotexts, seeds[0], prompt, all_paths)

    extra = _extra_params(req, hires, hr_denoise, (hr_w, hr_h))
    extra.update(network_params)
    info_dict = result_info(req, info, job, prompt=prompt, negative=negative, seeds=(seed, seeds, subseed, subseeds),
                            infotexts=infotexts, grid_count=grid_count, clip_skip=clip_skip,
                            inpainting_model=inpainting_model, warnings=warnings, extra=extra,
                            denoising_strength=hr_denoise if hires else req.denoising_strength,
                            vae=vae_params(bundle))
    return GenerationResult(images=images, infotexts=infotexts, info=info_dict, paths=all_paths,
                            grid_count=grid_count, samples=samples)


@contextlib.contextmanager
def leased_checkpoint(ctx: GenerationContext, settings: dict, warnings: list[str]):
    """The request's checkpoint (with the VAE its `sd_vae` setting picks), leased for the with-block.

    A checkpoint the request names must load, or the request fails with the reason. With none named (the user
    never chose one), the first checkpoint of the list that loads is used: a file that cannot load is skipped,
    named in `warnings`, and left out of later defaults until it changes on disk.
    """
    name = settings.get("sd_model_checkpoint") or ""
    if name:
        candidates = [ctx.registry.resolve(name)]
    else:
        candidates = ctx.registry.usable()
    with contextlib.ExitStack() as stack:
        for info in candidates:
            try:
                bundle = stack.enter_context(sd_pipelines.use_checkpoint(
                    ctx.manager, info, dtype=ctx.dtype, vae_dtype=ctx.vae_dtype, attention=ctx.attention))
            except checkpoint_files.CheckpointError as e:
                if name:
                    raise
                ctx.registry.mark_unusable(info, str(e))
                warnings.append(f"skipped checkpoint {info.name}, which cannot be loaded: {e}")
                log.warning("default checkpoint %s skipped: %s", info.name, e)
                continue
            break
        else:
            skipped = ctx.registry.unusable()
            raise GenerationError("no checkpoint found: put a .safetensors file in models/Stable-diffusion (or start "
                                  "with --demo)" if not skipped else "no checkpoint can be loaded: " + "; ".join(
                                      f"{n}: {why}" for n, why in skipped.items()))
        vae = ctx.vaes.choose(settings.get("sd_vae"), info.filename) if ctx.vaes is not None else None
        yield stack.enter_context(sd_pipelines.use_vae(ctx.manager, bundle, vae, dtype=ctx.vae_dtype or ctx.dtype,
                                                       attention=ctx.attention))


def vae_params(bundle) -> dict[str, str]:
    """`VAE hash` and `VAE` of the infotext when a VAE file replaced the checkpoint's own."""
    vae = bundle.vae_info
    return {"VAE hash": vae.shorthash, "VAE": vae.name} if vae is not None else {}


def result_info(req, info, job, *, prompt, negative, seeds, infotexts, grid_count, clip_skip, inpainting_model,
                warnings, extra, denoising_strength, vae: dict) -> dict:
    """The `info` of an A1111 txt2img/img2img answer; `seeds` is (seed, all seeds, subseed, all subseeds)."""
    seed, all_seeds, subseed, all_subseeds = seeds
    started = job.started if job and job.started else datetime.datetime.now().timestamp()
    return {
        "prompt": prompt, "all_prompts": [prompt] * len(all_seeds),
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(all_seeds),
        "seed": seed, "all_seeds": all_seeds, "subseed": subseed, "all_subseeds": all_subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
        "sampler_name": req.sampler_name, "scheduler": req.scheduler, "cfg_scale": req.cfg_scale,
        "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": info.model_name, "sd_model_hash": info.shorthash,
        "sd_vae_name": vae.get("VAE"), "sd_vae_hash": vae.get("VAE hash"),
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": denoising_strength, "extra_generation_params": extra,
        "index_of_first_image": grid_count, "infotexts": infotexts, "styles": list(req.styles),
        "job_timestamp": datetime.datetime.fromtimestamp(started).strftime("%Y%m%d%H%M%S"),
        "clip_skip": clip_skip, "is_using_inpainting_conditioning": bool(inpainting_model),
        "version": VERSION, "warnings": warnings,
    }


def _hires_upscale(bundle, req, latents, first_pipe, hr_w, hr_h):
    """The first pass upscaled to the hires size: latents (a latent upscaler) or PIL images (a pixel one)."""
    vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
    if req.hr_upscaler in LATENT_UPSCALE_MODES:
        mode, antialias = LATENT_UPSCALE_MODES[req.hr_upscaler]
        kw = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        return torch.nn.functional.interpolate(latents.float(), size=(hr_h // vae_scale, hr_w // vae_scale),
                                               mode=mode, **kw).to(latents.dtype)
    from PIL import Image
    resample = PIXEL_UPSCALERS[req.hr_upscaler]
    decoded = decode_latents(first_pipe, latents)
    return [im.resize((hr_w, hr_h), getattr(Image.Resampling, resample or "LANCZOS")) for im in decoded]


def _hires_pass(ctx, bundle, req, latents, first_pipe, seeds, conditioning, hr_w, hr_h, hr_steps,
                hr_denoise, ensd, tracker, eta):
    """A1111's hires fix: upscale the first pass (in latent space or in pixels), then img2img over it."""
    image = _hires_upscale(bundle, req, latents, first_pipe, hr_w, hr_h)
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
    return _run_pass(pipe, kind, conditioning=conditioning, sdxl=bundle.arch.family == "sdxl", steps=total,
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


def _resolve_networks(ctx, prompt: str) -> networks.ResolvedNetworks:
    """The prompt's extra network tags, resolved (only stripped when the server has no extra networks)."""
    if ctx.networks is not None:
        return ctx.networks.resolve(prompt)
    return networks.ResolvedNetworks(prompt=prompt_parser.parse_extra_networks(prompt)[0])


def _add_new(warnings: list[str], new: list[str]) -> None:
    warnings.extend(w for w in dict.fromkeys(new) if w not in warnings)


@contextlib.contextmanager
def _leased_networks(ctx, resolved, warnings):
    """Lease the resolved LoRAs from the manager for the with-block; yields them (as `AppliedLora`s).
    A warning both prompts of a request give is reported once."""
    if ctx.networks is None or not resolved.loras:
        yield []
        return
    said: list[str] = []
    with ctx.networks.leased(ctx.manager, resolved, said) as applied:
        _add_new(warnings, said)
        yield applied


@contextlib.contextmanager
def _leased_passes(ctx, resolved, hr_resolved, warnings):
    """The LoRAs of the first pass and of the hires pass, each leased once; yields (first, hires)."""
    with _leased_networks(ctx, resolved, warnings) as applied:
        if hr_resolved is resolved:
            yield applied, applied
            return
        with _leased_networks(ctx, hr_resolved, warnings) as hr_applied:
            yield applied, hr_applied


class _MergedLoras:
    """The LoRAs merged into the leased checkpoint's weights: `use(loras)` switches to another set (removing the
    current one exactly) only when its (name, te, unet) set differs, so a request whose passes share their LoRAs
    merges once. Whatever is merged is removed when the with-block ends."""

    def __init__(self, bundle, warnings: list[str]):
        self.bundle, self.warnings = bundle, warnings
        self._key: frozenset | None = None
        self._stack: contextlib.ExitStack | None = None

    def use(self, loras: list) -> bool:
        """Merge `loras` in place of the current set; False (and nothing done) when that set is merged already."""
        key = frozenset((a.info.name, a.te_multiplier, a.unet_multiplier) for a in loras)
        if self._stack is not None and key == self._key:
            return False
        self.close()
        stack = contextlib.ExitStack()
        said: list[str] = []
        stack.enter_context(networks.applied_loras(self.bundle, loras, said))
        _add_new(self.warnings, said)
        self._stack, self._key = stack, key
        return True

    def close(self) -> None:
        stack, self._stack, self._key = self._stack, None, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> "_MergedLoras":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _networks_applied(ctx, bundle, resolved, warnings):
    """Lease the request's LoRAs from the manager and merge them into the leased checkpoint until the
    request ends; yields the applied LoRAs (for the infotext)."""
    with _leased_networks(ctx, resolved, warnings) as applied, _MergedLoras(bundle, warnings) as merged:
        merged.use(applied)
        yield applied


def _network_params(applied, embeddings) -> dict:
    params: dict[str, Any] = {}
    if applied:
        params["Lora hashes"] = ", ".join(f"{a.info.name}: {a.info.shorthash}" for a in applied)
    if embeddings:
        params["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in embeddings)
    return params


def _extra_params(req, hires, hr_denoise, hr_size) -> dict:
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


def sampler_params(sampler: str, eta_choice: samplers.EtaChoice, ensd: int) -> dict[str, Any]:
    """The sampler's settings that change its images, as A1111 writes them: Eta DDIM / Eta (when not the
    default) and ENSD (when set and the sampler draws noise while it runs)."""
    params: dict[str, Any] = dict(eta_choice.infotext)
    if ensd and samplers.is_stochastic(sampler):
        params["ENSD"] = ensd
    return params


def base_infotext_params(req, info, seed, subseed, clip_skip, denoising_strength) -> dict[str, Any]:
    """The infotext keys txt2img and img2img share, in A1111's order (None values are left out when written)."""
    return {
        "Steps": req.steps,
        "Sampler": req.sampler_name,
        # "Automatic" is written as the schedule it stands for (as A1111 does), so the text reproduces the image.
        "Schedule type": _written_schedule(req.sampler_name, req.scheduler),
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": info.shorthash,
        "Model": info.model_name,
        "Variation seed": subseed if req.subseed_strength > 0 else None,
        "Variation seed strength": req.subseed_strength if req.subseed_strength > 0 else None,
        "Denoising strength": denoising_strength,
        "Clip skip": clip_skip if clip_skip > 1 else None,
    }


def _infotext_params(req, info, seed, subseed, clip_skip, hires, hr_denoise, hr_size) -> dict:
    params = base_infotext_params(req, info, seed, subseed, clip_skip, hr_denoise if hires else None)
    params.update(_extra_params(req, hires, hr_denoise, hr_size))
    if req.styles:
        params["Styles array"] = json.dumps(list(req.styles))
    params["Version"] = VERSION
    return params


def _written_schedule(sampler: str, schedule: str) -> str | None:
    if schedule == samplers.AUTOMATIC:
        schedule = samplers.automatic_schedule(sampler)
    return None if schedule == "Uniform" else schedule


def save_sample(ctx: GenerationContext, settings: dict, req, folder_name: str, today, image, seed: int, prompt: str,
                infotext: str, paths: list) -> None:
    """Save one image as A1111 does (when the request and the settings say so), adding its path to `paths`."""
    if req.save_images and settings.get("samples_save", True) and not req.do_not_save_samples:
        folder = outputs.samples_folder(ctx.outputs_root, folder_name, today, settings.get("outdir_samples", ""))
        paths.append(outputs.save_image(
            image, folder, seed=seed, prompt=prompt,
            infotext=infotext if settings.get("enable_pnginfo", True) else None,
            extension=settings.get("samples_format", "png"), jpeg_quality=settings.get("jpeg_quality", 80)))


def add_grid(ctx: GenerationContext, settings: dict, req, folder_name: str, today, images: list, infotexts: list,
             seed: int, prompt: str, paths: list) -> int:
    """A1111's grid of a multi-image result: none at all with `do_not_save_grid` (which API requests without
    `save_images` set, as A1111's API does), else saved when the settings say so and put first in `images`
    (with the first image's infotext) when `return_grid` is on. Returns how many grids lead the images."""
    if len(images) < 2 or req.do_not_save_grid:
        return 0
    save = req.save_images and settings.get("grid_save", True)
    if not (save or settings.get("return_grid", True)):
        return 0
    grid = outputs.make_grid(images)
    if save:
        paths.append(outputs.save_image(
            grid, outputs.dated_folder(ctx.outputs_root, folder_name, today), seed=seed, prompt=prompt,
            infotext=infotexts[0] if settings.get("enable_pnginfo", True) else None,
            extension=settings.get("samples_format", "png"), jpeg_quality=settings.get("jpeg_quality", 80)))
    if not settings.get("return_grid", True):
        return 0
    images.insert(0, grid)
    infotexts.insert(0, infotexts[0])
    return 1
