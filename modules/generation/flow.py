"""txt2img on the rectified-flow transformer families, FLUX.1 and SD3: the same processing loop as SD (seeds,
per-image generators, variation seeds, batches, progress, previews, infotext, saving), with their own diffusers
pipelines, text encoders (CLIP for the pooled vector and, for SD3, part of the sequence; T5 for the long
sequence), flow-matching samplers (Euler, DPM++ 2M, UniPC; Heun on SD3) and FLUX's distilled guidance.

img2img runs their img2img pipelines (the init image encoded, noised to the denoising strength by the
pipeline's own generators, as a plain diffusers call with the same seeds); a mask runs their inpaint pipelines,
which put the init image's (noised) latents back outside the mask after every step; around them the studio's
own mask handling (blur, invert, masked content, "only masked" crop and paste-back, the final composite) is the
one SD inpainting uses ("latent noise"/"latent nothing": `masked_content_latents`).

Emphasis, `(word:1.3)`, weights the encoders' token embeddings as A1111 does for SD (flow_emphasis: T5's on
FLUX; CLIP-L/G's and T5's on SD3). What the SD prompt language does not do here (the text goes to the encoders as
written): prompt editing, alternation, AND and BREAK, embeddings. LoRAs in diffusers'/PEFT's layout and kohya's FLUX and SD3 layouts
apply as on SD. Hires fix runs the img2img pipeline over the upscaled first pass (latent, pixel or model upscalers).
img2img's variation seeds and noise multiplier are reported as not applied.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import TYPE_CHECKING, Any

import torch

from modules.core import samplers
from modules.generation.leases import (
    MergedLoras,
    add_new,
    leased_passes,
    resolve_networks,
)
from modules.generation.params import GenerationError
from modules.generation.processing import network_params
from modules.generation.sampling import (
    StepTracker,
    decode_latents,
    make_noise,
    masked_content,
)
from modules.model_store import sd_pipelines
from modules.prompting import flow_emphasis, prompt_parser, prompts

if TYPE_CHECKING:
    from modules.generation.processing import Processing

FAMILY_NAMES = {"flux": "FLUX", "sd3": "SD3"}
# A1111/Forge sampler names -> the diffusers scheduler class, per family. The pipelines set the sigmas themselves
# (FLUX passes its own list, which FlowMatchHeun cannot take), so not every class suits both. DPM++ 2M and UniPC
# are diffusers' multistep solvers in their flow-matching mode (flow sigmas, flow prediction, the model's shift).
_MULTISTEP = {"DPM++ 2M": "DPMSolverMultistepScheduler", "UniPC": "UniPCMultistepScheduler"}
FLOW_SAMPLERS = {
    "flux": {"Euler": "FlowMatchEulerDiscreteScheduler", **_MULTISTEP},
    "sd3": {"Euler": "FlowMatchEulerDiscreteScheduler", "Heun": "FlowMatchHeunDiscreteScheduler", **_MULTISTEP},
}
DEFAULT_FLOW_SAMPLER = "Euler"
# what the flow encoders do not do (emphasis they do): prompt editing [a:b:n], alternation [a|b], AND, BREAK
_PROMPT_SYNTAX = re.compile(r"\[[^\[\]]*[:|][^\[\]]*\]|\bAND\b|\bBREAK\b")


def family_name(bundle) -> str:
    return FAMILY_NAMES[bundle.arch.family]


def flow_sampler(p: Processing, bundle, name: str | None = None, what: str = "sampler") -> str:
    """The request's sampler (or `name`, the hires one) if this family has it, else Euler with a warning (a
    FLUX model picked in the checkpoint list should still make an image with an SD sampler chosen)."""
    name = p.sampler_name if name is None else name
    available = FLOW_SAMPLERS[bundle.arch.family]
    if name in available:
        return name
    add_new(p.warnings, [f"{what} {name!r} is not available for {family_name(bundle)} checkpoints "
                         f"(they have {', '.join(available)}): used {DEFAULT_FLOW_SAMPLER}"])
    return DEFAULT_FLOW_SAMPLER


def check_size(bundle, width: int, height: int, what: str = "width and height") -> None:
    """GenerationError unless the sides are multiples of the family's `size_multiple`."""
    scale = size_multiple(bundle)
    if width % scale or height % scale:
        raise GenerationError(f"{family_name(bundle)} needs {what} in multiples of {scale}, got {width}x{height}")


def make_flow_scheduler(sampler: str, family: str, scheduler_config: dict, shift: float):
    """A new flow-matching scheduler of `sampler` from the model's scheduler config; `shift` > 0 replaces the
    model's timestep shift (and turns off FLUX.1-dev's resolution-dependent shifting)."""
    import diffusers

    cls = getattr(diffusers, FLOW_SAMPLERS[family][sampler])
    overrides: dict[str, Any] = {}
    if sampler in _MULTISTEP:
        cls = _own_flow_schedule(cls)
        overrides = {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                     "flow_shift": float(scheduler_config.get("shift", 1.0)), "solver_order": 2}
    if shift > 0:
        overrides.update(shift=float(shift), flow_shift=float(shift), use_dynamic_shifting=False)
    accepted = samplers.init_parameters(cls)
    return cls.from_config({k: v for k, v in {**scheduler_config, **overrides}.items() if k in accepted})


@functools.cache
def _own_flow_schedule(cls):
    """`cls` (a multistep solver) as the flow pipelines need it everywhere: it makes its own flow schedule whatever
    sigmas a pipeline hands it (FLUX's img2img and inpaint pipelines always pass their default linspace(1, 1/n),
    which DPM++ cannot take; FluxPipeline drops them for a solver in flow mode, and this does the same everywhere,
    so every pass gets the txt2img schedule), and it has the flow schedulers' `scale_noise`."""
    class OwnFlowSchedule(cls):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            if num_inference_steps is None and sigmas is not None:  # diffusers' retrieve_timesteps passes one or
                num_inference_steps = len(sigmas)  # the other: the count of the sigmas is the count of steps
            return super().set_timesteps(num_inference_steps, device, **({"mu": mu} if mu is not None else {}))

        def scale_noise(self, sample, timestep, noise):
            """The flow-matching schedulers' noising, which the img2img and inpaint pipelines call: in flow mode
            the solver's add_noise is that interpolation, (1 - sigma) x sample + sigma x noise, at the same step."""
            return self.add_noise(sample, noise, timestep)

    OwnFlowSchedule.__name__ = OwnFlowSchedule.__qualname__ = cls.__name__
    return OwnFlowSchedule


def size_multiple(bundle) -> int:
    """Image sides must be multiples of this: the VAE's downscale times the transformer's patch (FLUX packs
    2x2 latents into one token)."""
    vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
    patch = 2 if bundle.arch.family == "flux" else int(bundle.denoiser.config.patch_size)
    return vae_scale * patch


def max_sequence_length(bundle) -> int:
    """T5 tokens the pipeline encodes: FLUX.1-dev 512, FLUX.1-schnell (no guidance input) 256, SD3 256."""
    if bundle.arch.family == "flux":
        return 512 if bundle.denoiser.config.guidance_embeds else 256
    return 256


class FlowStepTracker(StepTracker):
    """StepTracker for the flow pipelines: FLUX hands its callback packed latents (tokens x channels); they are
    unpacked for the partial result of a stopped batch and for the preview, which is a VAE decode (the cheap
    linear preview is fitted to SD's 4-channel latents)."""

    def __init__(self, job, total: int, preview_every: int, pipe, height: int, width: int):
        super().__init__(job, total, "flow", preview_every)
        self.pipe, self.height, self.width = pipe, height, width

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim == 3:  # FLUX's (batch, tokens, channels x 4)
            return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return latents

    def __call__(self, pipe, i, t, kwargs):
        latents = self.unpack(kwargs["latents"])
        self.latents = latents
        if self.job is not None:
            self.job.step(self.offset + i + 1, self.total,
                          preview=lambda: decode_latents(self.pipe, latents[:1])[0])
        return kwargs


def setup(p: Processing, stack: contextlib.ExitStack, bundle) -> None:
    """What every batch of a flow-model txt2img request needs: the refusals, warnings, scheduler and pipeline
    (and with hires fix, the second pass's sampler, prompt and img2img pipeline)."""
    hires = p.enable_hr and not p.upscale_only
    _setup(p, stack, bundle, "txt2img", hires_prompt=p.styled_hr_prompt if hires and p.request.hr_prompt else None)
    p.steps_per_batch = p.steps
    if not hires:
        return
    req = p.request
    p.hr_flow_sampler = p.flow_sampler
    if req.hr_sampler_name and req.hr_sampler_name != p.sampler_name:
        p.hr_flow_sampler = flow_sampler(p, bundle, req.hr_sampler_name, "hires sampler")
    check_size(bundle, *p.hr_size, "the hires size")
    p.hr_texts = (p.hr_prompt_text, p.styled_hr_negative_prompt)
    p.hr_pipe = sd_pipelines.make_pipeline(bundle, "img2img", p.pipe.scheduler, offload=p.ctx.offload,
                                           offload_device=p.ctx.offload_device)
    p.steps_per_batch = p.steps + p.hr_steps


def setup_img2img(p: Processing, stack: contextlib.ExitStack, bundle) -> None:
    """img2img on a flow model; with a mask, inpainting (the family's inpaint pipeline)."""
    name = family_name(bundle)
    req = p.request
    if req.resize_mode == 3 and req.mask is None:
        raise GenerationError(f"resize mode 'Latent upscale' is not available for {name} checkpoints yet")
    if p.subseed_strength > 0 or p.multiplier != 1:
        add_new(p.warnings, [f"{name} img2img: variation seeds and the noise multiplier are not applied (the "
                             "pipeline noises the init image with the seed's own noise)"])
    _setup(p, stack, bundle, "inpaint" if req.mask is not None else "img2img")
    p.steps_per_batch = p.run_steps


def _setup(p: Processing, stack: contextlib.ExitStack, bundle, kind: str, hires_prompt: str | None = None) -> None:
    """The pass's checks, LoRAs (with `hires_prompt`, the hires pass's own too: merged in turn, as on SD),
    sampler, scheduler and pipeline."""
    name = family_name(bundle)
    check_size(bundle, p.width, p.height)
    if p.scheduler not in ("Automatic", "", None):
        add_new(p.warnings, [f"schedule type {p.scheduler!r} is not used by {name} checkpoints: their own flow "
                             "schedule (shifted by the Shift setting) is"])
    p.network_source = p.all_prompts[0]
    resolved = resolve_networks(p.ctx, p.network_source)
    add_new(p.warnings, resolved.warnings)
    # LoRAs in diffusers'/PEFT's layout (`transformer.*`, `text_encoder.*`) merge as on SD; kohya's FLUX and SD3
    # layouts (the original joined q/k/v) are split onto diffusers' modules (networks.merge.kohya_flow_modules)
    hr_resolved = resolve_networks(p.ctx, hires_prompt) if hires_prompt else resolved
    add_new(p.warnings, hr_resolved.warnings)
    p.applied, p.hr_applied = stack.enter_context(leased_passes(p.ctx, resolved, hr_resolved, p.warnings))
    p.merged = stack.enter_context(MergedLoras(bundle, p.warnings))
    p.merged.use(p.applied)
    first_names = {a.info.name for a in p.applied}
    p.network_params = network_params(p.applied + [a for a in p.hr_applied if a.info.name not in first_names], [])
    p.first_prompt, p.hr_prompt_text = resolved.prompt, hr_resolved.prompt
    if any(_PROMPT_SYNTAX.search(t) for t in (resolved.prompt, p.all_negative_prompts[0])):
        add_new(p.warnings, [f"{name}: prompt editing, alternation, AND and BREAK are not applied; the text goes "
                             "to the encoders as written (emphasis is)"])
    p.flow_sampler = flow_sampler(p, bundle)
    p.sampler_name = p.flow_sampler
    p.flow_shift = float(p.settings.get("flow_shift", 0.0) or 0.0)
    scheduler = make_flow_scheduler(p.flow_sampler, bundle.arch.family, bundle.scheduler_config, p.flow_shift)
    p.pipe = sd_pipelines.make_pipeline(bundle, kind, scheduler, offload=p.ctx.offload,
                                        offload_device=p.ctx.offload_device)
    p.max_sequence_length = max_sequence_length(bundle)
    p.pass_kind = kind
    _warn_long_prompt(p, resolved.prompt)


def _warn_long_prompt(p: Processing, prompt: str) -> None:
    tokenizer = p.pipe.tokenizer_2 if p.bundle.arch.family == "flux" else p.pipe.tokenizer_3
    count = len(tokenizer(prompt).input_ids)
    if count > p.max_sequence_length:
        add_new(p.warnings, [f"the prompt is {count} T5 tokens; {family_name(p.bundle)} reads the first "
                             f"{p.max_sequence_length}"])


def _text(p: Processing, prompt: str) -> str:
    return p.first_prompt if prompt == p.network_source else prompt_parser.parse_extra_networks(prompt)[0]


def encode(p: Processing, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding of one image's texts (cached per text pair), as keyword arguments."""
    cache = p.__dict__.setdefault("_flow_embeds", {})
    key = prompt + "\0" + negative
    if key in cache:
        return cache[key]
    pipe, device = p.pipe, p.bundle.device
    text, spans = flow_emphasis.weighted_text(_text(p, prompt))
    negative, negative_spans = flow_emphasis.weighted_text(negative)
    true_cfg = p.cfg_scale > 1
    with torch.inference_mode():
        if p.bundle.arch.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                   num_images_per_prompt=1,
                                                   max_sequence_length=p.max_sequence_length)
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if true_cfg:  # Forge: CFG above 1 on FLUX is real classifier-free guidance with the negative prompt
                neg, neg_pooled, _ = pipe.encode_prompt(prompt=negative, prompt_2=None, device=device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=p.max_sequence_length)
                out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        else:
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=text, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=true_cfg, negative_prompt=negative,
                max_sequence_length=p.max_sequence_length)
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if true_cfg:
                out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    out["prompt_embeds"] = _emphasized(p, out["prompt_embeds"], text, spans)
    if "negative_prompt_embeds" in out:
        out["negative_prompt_embeds"] = _emphasized(p, out["negative_prompt_embeds"], negative, negative_spans)
    cache[key] = out
    return out


def _emphasized(p: Processing, z: torch.Tensor, text: str, spans) -> torch.Tensor:
    """The sequence embeddings of `text` with its emphasis weights applied (see flow_emphasis): T5's rows on
    FLUX; on SD3 the 77 CLIP rows and then T5's."""
    if not flow_emphasis.has_weights(spans):
        return z
    pipe = p.pipe
    normalize = p.settings.get("emphasis", prompts.EMPHASIS_ORIGINAL) != prompts.EMPHASIS_NONE

    def weighted(rows, tokenizer):
        weights = flow_emphasis.token_weights(tokenizer, text, spans, rows.shape[1])
        return flow_emphasis.emphasize(rows, weights, normalize)

    if p.bundle.arch.family == "flux":
        return weighted(z, pipe.tokenizer_2)
    clip = pipe.tokenizer_max_length
    return torch.cat([weighted(z[:, :clip], pipe.tokenizer), weighted(z[:, clip:], pipe.tokenizer_3)], dim=1)


def sample(p: Processing, batch_number: int, seeds: list[int], subseeds: list[int]) -> torch.Tensor:
    """One batch's latents (SD-shaped: batch x channels x h x w), made by the family's pipeline from our noise."""
    pipe, bundle = p.pipe, p.bundle
    transformer, vae_scale = pipe.transformer, pipe.vae_scale_factor
    if bundle.arch.family == "flux":
        channels = transformer.config.in_channels // 4
        h, w = 2 * (p.height // (vae_scale * 2)), 2 * (p.width // (vae_scale * 2))
    else:
        channels = transformer.config.in_channels
        h, w = p.height // vae_scale, p.width // vae_scale
    noise, generators = make_noise(seeds, subseeds, p.subseed_strength, (channels, h, w), p.ensd)
    noise = noise.to(bundle.device, transformer.dtype)  # the compute dtype (fp8 files store less)
    latents = pipe._pack_latents(noise, len(seeds), channels, h, w) if bundle.arch.family == "flux" else noise
    p.merged.use(p.applied)  # the first pass's LoRAs again after the previous batch's hires pass
    latents = _run(p, batch_number, generators, latents=latents)
    if not p.enable_hr:
        return latents
    from modules.generation import hires
    hr_w, hr_h = p.hr_size
    image = hires.upscale(bundle, p.request, latents, pipe, hr_w, hr_h)  # latents (a latent upscaler) or images
    if p.upscale_only:
        return image
    return _hires(p, batch_number, seeds, image, hr_w, hr_h)


def _hires(p: Processing, batch_number: int, seeds: list[int], image, hr_w: int, hr_h: int) -> torch.Tensor:
    """A1111's hires fix on a flow model: the family's img2img pipeline over the upscaled first pass (latents
    are handed over as they are, images are encoded), exactly "Hires steps" steps of the schedule
    `hires.hires_schedule` gives, with fresh per-image generators, the hires prompt and sampler."""
    from modules.generation import hires
    total, strength = hires.hires_schedule(p.hr_steps, p.hr_denoise)
    generators = [torch.Generator("cpu").manual_seed(s + p.ensd) for s in seeds]
    if p.merged.use(p.hr_applied):  # the hires prompt's own LoRAs: its texts are encoded with them
        p.__dict__.pop("_flow_embeds", None)
    return _run(p, batch_number, generators, image=image, strength=strength, pipe=p.hr_pipe, size=(hr_w, hr_h),
                steps=total, sampler=p.hr_flow_sampler, texts=p.hr_texts, offset=p.steps)


def sample_img2img(p: Processing, batch_number: int, seeds: list[int], images: list,
                   masks: list | None = None) -> torch.Tensor:
    """One img2img batch's latents from its (prepared) init images, by the family's img2img pipeline (which
    noises them with the seeds' own generators, as a plain diffusers call does); with `masks` (processing-size L
    images, white = repaint) by its inpaint pipeline."""
    generators = [torch.Generator("cpu").manual_seed(s + p.ensd) for s in seeds]
    inputs: dict[str, Any] = {"image": images, "strength": p.denoising_strength}
    if masks is not None:
        inputs["mask_image"] = masks
        if p.request.inpainting_fill in (2, 3):
            latents = masked_content_latents(p, images, masks, seeds)
            inputs.update(image=latents, masked_image_latents=latents)
    return _run(p, batch_number, generators, **inputs)


def masked_content_latents(p: Processing, images: list, masks: list, seeds: list[int]) -> torch.Tensor:
    """A1111's masked content "latent noise" / "latent nothing" on a flow model: the init images' latents (in the
    pipeline's own normalisation, (x - shift) x scale) with the masked part replaced by the seed's noise or by
    zeros, handed to the inpaint pipeline as its image (it noises them to the denoising strength as usual)."""
    vae = p.pipe.vae
    x = p.pipe.image_processor.preprocess(images, height=p.height, width=p.width).to(vae.device, vae.dtype)
    with torch.inference_mode():
        latents = vae.encode(x).latent_dist.mode()
    latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    noise, _ = make_noise(seeds, seeds, 0.0, tuple(latents.shape[1:]), p.ensd)
    return masked_content(latents, masks, p.request.inpainting_fill, noise)


def _run(p: Processing, batch_number: int, generators: list, *, pipe=None, size: tuple[int, int] | None = None,
         steps: int | None = None, sampler: str | None = None, texts: tuple[str, str] | None = None, offset: int = 0,
         **inputs) -> torch.Tensor:
    """One denoising run of the request's pipeline (or of `pipe` at `size` with `steps`, `sampler` and `texts`:
    the hires pass): the batch's prompt embeddings, the family's guidance, a fresh scheduler and progress tracker
    (counting on from `offset`), latents out (unpacked)."""
    pipe, bundle = pipe or p.pipe, p.bundle
    width, height = size or (p.width, p.height)
    lo = batch_number * p.batch_size
    embeds = encode(p, *(texts or (p.all_prompts[lo], p.all_negative_prompts[lo])))
    kw: dict[str, Any] = {k: v.repeat(len(generators), *[1] * (v.ndim - 1)) for k, v in embeds.items()}
    if bundle.arch.family == "flux":
        kw.update(guidance_scale=p.distilled_cfg_scale, true_cfg_scale=max(p.cfg_scale, 1.0))
    else:
        kw.update(guidance_scale=p.cfg_scale)
    p.tracker = FlowStepTracker(p.job, p.steps_per_batch, p.preview_every, pipe, height, width)
    p.tracker.offset = offset
    pipe.scheduler = make_flow_scheduler(sampler or p.flow_sampler, bundle.arch.family, bundle.scheduler_config,
                                         p.flow_shift)
    with torch.inference_mode():
        out = pipe(height=height, width=width, num_inference_steps=steps or p.steps, generator=generators,
                   output_type="latent", max_sequence_length=p.max_sequence_length, callback_on_step_end=p.tracker,
                   callback_on_step_end_tensor_inputs=["latents"], **inputs, **kw).images
    return p.tracker.unpack(out)


def image_params(p: Processing) -> dict[str, Any]:
    """The family's own infotext entries (Forge's names)."""
    params: dict[str, Any] = {}
    if p.bundle.arch.family == "flux" and p.bundle.denoiser.config.guidance_embeds:
        params["Distilled CFG Scale"] = p.distilled_cfg_scale
    if p.flow_shift > 0:
        params["Shift"] = p.flow_shift
    return params
