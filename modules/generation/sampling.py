"""The sampling steps every generation shares: seeds and initial noise (A1111's per-image generators,
variation seeds), one denoising run of a diffusers pipeline with this request's conditioning and progress, and
the VAE decode."""
from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING

import torch

from modules.core.jobs import Job
from modules.generation.params import Txt2ImgRequest
from modules.model_store import sd_pipelines
from modules.prompting import prompts

if TYPE_CHECKING:
    from modules.generation.processing import GenerationContext


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


class StepTracker:
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
        shift = getattr(vae.config, "shift_factor", None)
        if shift:  # SD3's and FLUX's VAEs centre their latents too
            scaled = scaled + shift
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


def run_pass(pipe, kind: str, *, conditioning: prompts.ScheduledConditioning, sdxl: bool, steps, cfg, width,
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


def masked_content(latents: torch.Tensor, masks: list, fill: int, noise: torch.Tensor | None) -> torch.Tensor:
    """A1111's masked content in latent space: the masked part of `latents` (L masks, white = repaint, resized to
    the latents and rounded) replaced by `noise` ("latent noise", fill 2) or by zeros ("latent nothing", 3)."""
    import numpy as np
    from PIL import Image

    h, w = latents.shape[-2:]
    mask = torch.stack([torch.from_numpy(np.asarray(m.convert("L").resize((w, h), Image.Resampling.BILINEAR),
                                                    dtype=np.float32) / 255.0) for m in masks])
    mask = mask[:, None].to(latents.device, latents.dtype).round()
    replacement = noise.to(latents.device, latents.dtype) if fill == 2 else torch.zeros_like(latents)
    return latents * (1 - mask) + replacement * mask
