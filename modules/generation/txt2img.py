"""txt2img: a request (every A1111 field) -> images, seeds, infotexts, saved files, through the one processing
loop (`processing.process_images`) with the first pass (an inpainting checkpoint makes its txt2img over an all-
masked grey picture, as A1111 conditions it) and A1111's hires fix (`hires`)."""
from __future__ import annotations

import contextlib
from typing import Any

from modules.core import samplers
from modules.core.jobs import Job
from modules.generation import flow, hires
from modules.generation.leases import (
    MergedLoras,
    add_new,
    leased_passes,
    resolve_networks,
)
from modules.generation.params import Txt2ImgRequest, hires_target_size
from modules.generation.processing import (
    GenerationContext,
    GenerationResult,
    Processing,
    base_infotext_params,
    common_params,
    network_params,
    process_images,
    sampler_params,
    vae_params,
)
from modules.generation.sampling import (
    StepTracker,
    make_noise,
    run_pass,
    scheduler_order,
    text_conditioner,
)
from modules.model_store import sd_pipelines
from modules.prompting import prompts


class Txt2ImgProcessing(Processing):
    """A txt2img request (A1111's StableDiffusionProcessingTxt2Img): the first pass and, with `enable_hr`, the
    hires fix; `all_hr_prompts` / `all_hr_negative_prompts` are the hires pass's prompts, per image."""

    kind = "txt2img"

    def __init__(self, ctx: GenerationContext, req: Txt2ImgRequest, job: Job | None = None,
                 settings: dict | None = None, **kw):
        super().__init__(ctx, req, job, settings, **kw)
        self.enable_hr = req.enable_hr
        self.hr_size = hires_target_size(req) if req.enable_hr else (req.width, req.height)
        self.hr_denoise = req.denoising_strength if req.denoising_strength is not None else 0.7
        self.hr_steps = req.hr_second_pass_steps or req.steps
        # denoising strength 0 (A1111's API smoke test sends it): the upscale alone, no second sampling pass
        self.upscale_only = self.enable_hr and self.hr_denoise == 0
        self.hr_eta = samplers.resolve_eta(req.hr_sampler_name or req.sampler_name, req.eta, self.settings)
        if self.enable_hr and self.hr_eta.warning:
            add_new(self.warnings, [self.hr_eta.warning])
        # As in A1111 the styles apply to the hires prompts too; an empty one is the first pass's (styled) prompt.
        self.styled_hr_prompt, self.styled_hr_negative_prompt = ctx.styles.apply(
            req.hr_prompt or req.prompt, req.hr_negative_prompt or req.negative_prompt, req.styles)
        self.all_hr_prompts = [self.styled_hr_prompt] * len(self.all_seeds)
        self.all_hr_negative_prompts = [self.styled_hr_negative_prompt] * len(self.all_seeds)

    def setup(self, stack: contextlib.ExitStack, bundle) -> None:
        if bundle.arch.is_flow:  # FLUX and SD3: their own pipelines and encoders (see flow.py)
            flow.setup(self, stack, bundle)
            return
        req, ctx, settings = self.request, self.ctx, self.settings
        # LoRA tags come out of the text before encoding; bad ones are reported, and the image is made anyway.
        # The hires pass runs with the LoRAs of the hires prompt (the first pass's prompt when it is empty).
        self.network_source = self.all_prompts[0]  # the prompt whose LoRAs apply
        resolved = resolve_networks(ctx, self.network_source)
        add_new(self.warnings, resolved.warnings)
        hr_resolved = resolve_networks(ctx, self.styled_hr_prompt) if self.enable_hr and req.hr_prompt else resolved
        add_new(self.warnings, hr_resolved.warnings)
        self.applied, self.hr_applied = stack.enter_context(leased_passes(ctx, resolved, hr_resolved, self.warnings))
        self.merged = stack.enter_context(MergedLoras(bundle, self.warnings))
        self.merged.use(self.applied)
        self.conditioner = text_conditioner(ctx, bundle, settings, self.clip_skip)
        self.old_scheduling = bool(settings.get("use_old_scheduling", False))
        scheduler = samplers.make_scheduler(self.sampler_name, self.scheduler, bundle.scheduler_config)
        # prompt-editing steps count model calls, as A1111's do: a second-order sampler's schedule is twice as long
        self.conditioning_steps = self.steps * scheduler_order(scheduler)
        self.first_prompt = resolved.prompt
        self.conditioning_for(self.all_prompts[0], self.all_negative_prompts[0])  # encoded now, before the hires LoRAs merge
        self.hr_conditioning = None
        if self.enable_hr and not self.upscale_only:
            # encoded with the hires pass's LoRAs merged (a fresh encoder: the first one caches per text)
            hr_conditioner = text_conditioner(ctx, bundle, settings, self.clip_skip) \
                if self.merged.use(self.hr_applied) else self.conditioner
            hr_order = scheduler_order(samplers.make_scheduler(req.hr_sampler_name, req.hr_scheduler,
                                                               bundle.scheduler_config))
            self.hr_conditioning = prompts.build_conditioning(
                hr_conditioner, hr_resolved.prompt, self.styled_hr_negative_prompt, self.steps * hr_order,
                self.hr_steps * hr_order, self.old_scheduling)
        first_names = {a.info.name for a in self.applied}
        both_passes = self.applied + [a for a in self.hr_applied if a.info.name not in first_names]
        self.network_params = network_params(both_passes, prompts.embeddings_in(
            [resolved.prompt, self.all_negative_prompts[0], hr_resolved.prompt, self.styled_hr_negative_prompt],
            self.conditioner.used_embeddings))
        self.vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
        self.latent_channels = bundle.components["unet"].config.out_channels
        self.pass_kind = "inpaint" if bundle.arch.inpainting else "txt2img"
        self.pipe = sd_pipelines.make_pipeline(bundle, self.pass_kind, scheduler, offload=ctx.offload,
                                               offload_device=ctx.offload_device)
        self.steps_per_batch = self.steps + (self.hr_steps if self.enable_hr and not self.upscale_only else 0)

    def sample(self, batch_number: int, seeds: list[int], subseeds: list[int]):
        if self.bundle.arch.is_flow:
            return flow.sample(self, batch_number, seeds, subseeds)
        self.merged.use(self.applied)  # the first pass's LoRAs again after the previous batch's hires pass
        bundle = self.bundle
        shape = (self.latent_channels, self.height // self.vae_scale, self.width // self.vae_scale)
        noise, generators = make_noise(seeds, subseeds, self.subseed_strength, shape, self.ensd)
        self.pipe.scheduler = samplers.make_scheduler(self.sampler_name, self.scheduler, bundle.scheduler_config,
                                                      eta=self.eta.eta)
        self.tracker = StepTracker(self.job, self.steps_per_batch, bundle.arch.family, self.preview_every)
        extra = {}
        if self.pass_kind == "inpaint":
            # txt2img on an inpainting model: the whole image is "masked" over a neutral grey picture.
            from PIL import Image
            grey = Image.new("RGB", (self.width, self.height), (127, 127, 127))
            white = Image.new("L", (self.width, self.height), 255)
            extra = dict(image=[grey] * len(seeds), mask=[white] * len(seeds), strength=1.0)
        latents = run_pass(self.pipe, self.pass_kind,
                           conditioning=self.batch_conditioning(batch_number),
                           sdxl=bundle.arch.family == "sdxl", steps=self.steps, cfg=self.cfg_scale,
                           width=self.width, height=self.height, generators=generators, eta=self.eta.eta,
                           tracker=self.tracker, latents=noise, **extra)
        if not self.enable_hr:
            return latents
        hr_w, hr_h = self.hr_size
        if self.upscale_only:
            return hires.upscale(bundle, self.request, latents, self.pipe, hr_w, hr_h)  # latents, or PIL images
        self.merged.use(self.hr_applied)
        return hires.hires_pass(self.ctx, bundle, self.request, latents, self.pipe, seeds, self.hr_conditioning,
                                hr_w, hr_h, self.hr_steps, self.hr_denoise, self.ensd, self.tracker, self.hr_eta.eta)

    def image_params(self, index: int) -> dict[str, Any]:
        params = base_infotext_params(self, index, self.hr_denoise if self.enable_hr else None)
        params.update(hires.hires_params(self.request, self.enable_hr, self.hr_denoise, self.hr_size))
        params.update(self.network_params)
        params.update(sampler_params(self.sampler_name, self.eta, self.ensd))
        params.update(vae_params(self.bundle))
        params.update(common_params(self))
        if self.bundle.arch.is_flow:
            params.update(flow.image_params(self))
        return params

    def info_params(self) -> dict[str, Any]:
        params = hires.hires_params(self.request, self.enable_hr, self.hr_denoise, self.hr_size)
        params.update(getattr(self, "network_params", {}))
        return params

    def info_denoising_strength(self):
        return self.hr_denoise if self.enable_hr else self.denoising_strength


def run_txt2img(ctx: GenerationContext, req: Txt2ImgRequest, job: Job | None = None,
                settings: dict | None = None, *, keep_samples: bool = False,
                scripts: list | None = None) -> GenerationResult:
    """Generate every image of a (validated) request on the current thread (the job worker). With
    `keep_samples` the result also holds each image as decoded floats (`samples`, no grid among them);
    `scripts` are always-on scripts whose hooks run (see `processing.HOOKS`)."""
    return process_images(Txt2ImgProcessing(ctx, req, job, settings, keep_samples=keep_samples, scripts=scripts))

