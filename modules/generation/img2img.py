"""The img2img service: init images (+ mask) and a request -> images, as A1111's img2img and inpainting do.

Plain img2img is diffusers' img2img pipeline; a mask (or an inpainting checkpoint) uses diffusers' inpaint
pipeline, which blends the masked latents each step for ordinary checkpoints and feeds mask + masked-image
latents to 9-channel inpainting UNets. Both pipelines are views over the checkpoint the manager holds.
Around them: resize modes, mask invert/blur, masked content (fill / original / latent noise / latent
nothing), "only masked" (crop the mask's box plus padding, work at full resolution, paste back) and the
final composite, so that pixels outside the (blurred) mask are the original's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules import networks
from modules.generation import images as pix
from modules.generation import outpainting as img2img_scripts
from modules.core import infotext as infotext_mod
from modules.core import outputs
from modules.prompting import prompt_parser
from modules.prompting import prompts
from modules.core import samplers
from modules.model_store import sd_pipelines
from modules.generation.txt2img import (GenerationContext, GenerationResult, _network_params, _networks_applied,
                                _StepTracker, base_infotext_params, decode_latents, leased_checkpoint, sample_latents, sampler_params,
                                vae_params,
                                text_conditioner, make_noise, resolve_seeds, result_info,
                                add_grid, save_sample, scheduler_order)
from modules.generation.img2img_params import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, Img2ImgRequest, validate_img2img
from modules.generation.params import GenerationError
from modules.core.jobs import Job, JobInterrupted, JobSkipped
from modules.core.version import VERSION

log = logging.getLogger("webui.img2img")

__all__ = ["Img2ImgRequest", "validate_img2img", "run_img2img", "Prepared", "prepare_images"]


@dataclass
class Prepared:
    """One init image made ready for sampling, and what is needed to put the result back."""
    work: Image.Image  # the picture the sampler starts from (processing size)
    raw: Image.Image  # the flattened init image (latent upscale encodes this one)
    mask: Image.Image | None  # processing-size L mask (white = repaint), blurred
    original: Image.Image | None  # what the result is composited over (None: no mask, no composite)
    alpha: Image.Image | None  # compositing alpha, the size of `original`
    paste_box: tuple[int, int, int, int] | None  # "only masked": where the crop goes back


def prepare_images(req: Img2ImgRequest) -> list[Prepared]:
    """A1111's image side of img2img for every init image (pixels only, no model)."""
    w, h = req.width, req.height
    out = []
    for init in req.init_images:
        raw = pix.flatten(init)
        mode = 0 if req.resize_mode == 3 and req.mask is not None else req.resize_mode
        if req.mask is None:
            out.append(Prepared(pix.resize_image(mode, raw, w, h), raw, None, None, None, None))
            continue
        m = pix.mask_from_image(req.mask, raw.size, invert=bool(req.inpainting_mask_invert), round_mask=req.mask_round)
        m = pix.blur_mask(m, req.mask_blur_x, req.mask_blur_y)
        region = pix.crop_region(m, req.inpaint_full_res_padding) if req.inpaint_full_res else None
        if region is not None:
            region = pix.expand_crop_region(region, w, h, *raw.size)
            work = pix.resize_image(2, raw.crop(region), w, h)
            proc_mask = pix.resize_image(2, m.crop(region), w, h)
            original, alpha = raw, m
        else:
            work = pix.resize_image(mode, raw, w, h)
            proc_mask = pix.resize_image(mode, m, w, h)
            original, alpha = work, pix.overlay_mask(proc_mask)
        if req.inpainting_fill != 1:
            work = pix.fill(work, proc_mask)
        out.append(Prepared(work, raw, proc_mask, original, alpha, region))
    return out


def _encode(pipe, images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """VAE latents (scaled) of PIL images at width x height: the distribution's mean, as a tensor."""
    vae = pipe.vae
    x = pipe.image_processor.preprocess(images, height=height, width=width).to(vae.device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode()
    return latents * vae.config.scaling_factor


@contextlib.contextmanager
def _noise_substituted(scheduler, noise: torch.Tensor | None):
    """Make the pipeline use our initial noise (variation seeds, noise multiplier, latent noise) wherever it
    noises latents; a no-op for None."""
    if noise is None:
        yield
        return
    original = scheduler.add_noise

    def add_noise(samples, drawn, timesteps):
        if drawn.shape == noise.shape:
            drawn = noise.to(drawn.device, drawn.dtype)
        return original(samples, drawn, timesteps)

    scheduler.add_noise = add_noise
    try:
        yield
    finally:
        del scheduler.add_noise


def run_img2img(ctx: GenerationContext, req: Img2ImgRequest, job: Job | None = None,
                settings: dict | None = None, *, keep_samples: bool = False) -> GenerationResult:
    """Run every image of a validated img2img request on the current thread (the job worker). With
    `keep_samples` the result holds the decoded float images too (before any inpainting composite)."""
    settings = settings or {}
    req = img2img_scripts.apply(req)
    prompt, negative = ctx.styles.apply(req.prompt, req.negative_prompt, req.styles)
    seeds, subseeds, seed, subseed = resolve_seeds(req)
    clip_skip = int(settings.get("CLIP_stop_at_last_layers", 1))
    ensd = int(settings.get("eta_noise_seed_delta", 0))
    multiplier = req.initial_noise_multiplier if req.initial_noise_multiplier is not None else \
        float(settings.get("initial_noise_multiplier", 1.0))
    preview_every = int(settings.get("show_progress_every_n_steps", 0)) if settings.get("live_previews_enable", True) else 0
    if job is not None:
        job.preview_every = preview_every
    run_steps = min(int(req.steps * req.denoising_strength), req.steps)
    eta_choice = samplers.resolve_eta(req.sampler_name, req.eta, settings)
    prepared = prepare_images(req)

    warnings: list[str] = [eta_choice.warning] if eta_choice.warning else []
    resolved = ctx.networks.resolve(prompt) if ctx.networks is not None else \
        networks.ResolvedNetworks(prompt=prompt_parser.parse_extra_networks(prompt)[0])
    warnings.extend(resolved.warnings)
    images, infotexts, all_paths = [], [], []
    samples = [] if keep_samples else None
    today = datetime.date.today()
    with leased_checkpoint(ctx, settings, warnings) as bundle, \
            _networks_applied(ctx, bundle, resolved, warnings) as applied:
        info, family = bundle.info, bundle.arch.family
        conditioner = text_conditioner(ctx, bundle, settings, clip_skip)
        order = scheduler_order(samplers.make_scheduler(req.sampler_name, req.scheduler, bundle.scheduler_config))
        conditioning = prompts.build_conditioning(conditioner, resolved.prompt, negative, max(run_steps, 1) * order,
                                                  use_old_scheduling=bool(settings.get("use_old_scheduling", False)))
        network_params = _network_params(applied, prompts.embeddings_in([resolved.prompt, negative],
                                                                         conditioner.used_embeddings))
        inpainting_model = bundle.arch.inpainting
        has_mask = req.mask is not None
        kind = "inpaint" if (has_mask or inpainting_model) else "img2img"
        vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
        latent_channels = bundle.components["vae"].config.latent_channels
        shape = (latent_channels, req.height // vae_scale, req.width // vae_scale)
        pipe = sd_pipelines.make_pipeline(bundle, kind, samplers.make_scheduler(
            req.sampler_name, req.scheduler, bundle.scheduler_config), offload=ctx.offload,
            offload_device=ctx.offload_device)
        for it in range(req.n_iter):
            if job is not None:
                job.begin_iteration(it, req.n_iter)
            lo, hi = it * req.batch_size, (it + 1) * req.batch_size
            it_seeds, it_subseeds = seeds[lo:hi], subseeds[lo:hi]
            batch = [prepared[(lo + j) % len(prepared)] for j in range(len(it_seeds))]
            stopped = None
            if run_steps < 1:  # nothing to denoise: the (prepared) init images are the result
                latents = None
                batch_images = [p.work for p in batch]
            else:
                pipe.scheduler = samplers.make_scheduler(req.sampler_name, req.scheduler, bundle.scheduler_config,
                                                         eta=eta_choice.eta)
                tracker = _StepTracker(job, run_steps, family, preview_every)
                noise, _ = make_noise(it_seeds, it_subseeds, req.subseed_strength, shape, 0)
                # fresh generators: the pipeline draws exactly what a plain diffusers call with these seeds does
                generators = [torch.Generator("cpu").manual_seed(s + ensd) for s in it_seeds]
                kw, own_noise = _pass_inputs(pipe, req, batch, kind, noise, inpainting_model)
                if own_noise or req.subseed_strength > 0 or multiplier != 1 or ensd:
                    substitute = noise * multiplier
                    if kind == "inpaint" and req.denoising_strength >= 1:
                        kw["latents"] = substitute  # at full strength the inpaint pipeline starts from these
                else:
                    substitute = None
                try:
                    with _noise_substituted(pipe.scheduler, substitute):
                        latents = sample_latents(pipe, conditioning=conditioning, sdxl=family == "sdxl",
                                                 steps=req.steps, cfg=req.cfg_scale, generators=generators,
                                                 eta=eta_choice.eta, tracker=tracker, strength=req.denoising_strength, **kw)
                except (JobInterrupted, JobSkipped) as e:
                    stopped = e
                    latents = tracker.latents
                    if latents is None:
                        if isinstance(e, JobInterrupted):
                            break
                        continue
                batch_images = decode_latents(pipe, latents, samples)
            for j, image in enumerate(batch_images):
                p = batch[j]
                if p.original is not None:
                    image = pix.composite(image, p.original, p.alpha, p.paste_box)
                params = _infotext_params(req, bundle.info, it_seeds[j], it_subseeds[j], clip_skip, has_mask)
                params.update(network_params)
                params.update(sampler_params(req.sampler_name, eta_choice, ensd))
                params.update(vae_params(bundle))
                text = infotext_mod.create_infotext(prompt, negative, params)
                images.append(image)
                infotexts.append(text)
                save_sample(ctx, settings, req, "img2img-images", today, image, it_seeds[j], prompt, text, all_paths)
            if isinstance(stopped, JobInterrupted):
                break

    grid_count = add_grid(ctx, settings, req, "img2img-grids", today, images, infotexts, seeds[0], prompt, all_paths)

    extra = dict(_mask_params(req) if req.mask is not None else {}, **network_params)
    info_dict = result_info(req, info, job, prompt=prompt, negative=negative, seeds=(seed, seeds, subseed, subseeds),
                            infotexts=infotexts, grid_count=grid_count, clip_skip=clip_skip,
                            inpainting_model=inpainting_model, warnings=warnings, extra=extra,
                            denoising_strength=req.denoising_strength, vae=vae_params(bundle))
    info_dict["script_name"] = req.script_name or None
    return GenerationResult(images=images, infotexts=infotexts, info=info_dict, paths=all_paths,
                            grid_count=grid_count, samples=samples)


def _pass_inputs(pipe, req: Img2ImgRequest, batch: list[Prepared], kind: str, noise: torch.Tensor,
                 inpainting_model: bool) -> tuple[dict[str, Any], bool]:
    """The pipeline's image arguments for one batch; True when the init latents were made here (latent
    upscale, latent noise/nothing), in which case our own noise must be used too."""
    w, h = req.width, req.height
    works = [p.work for p in batch]
    if kind == "img2img":
        if req.resize_mode != 3:
            return dict(image=works), False
        # latent upscale: encode at the init image's own size (a multiple of 8), then resize the latents
        latents = []
        for p in batch:
            rw, rh = max(8, p.raw.width // 8 * 8), max(8, p.raw.height // 8 * 8)
            lat = _encode(pipe, [p.raw], rw, rh)
            latents.append(torch.nn.functional.interpolate(lat.float(), size=noise.shape[-2:], mode="bilinear",
                                                           antialias=True).to(lat.dtype))
        return dict(image=torch.cat(latents)), True
    masks = [p.mask if p.mask is not None else Image.new("L", (w, h), 255) for p in batch]
    kw: dict[str, Any] = dict(image=works, mask_image=masks, height=h, width=w)
    if req.mask is None or req.inpainting_fill not in (2, 3):
        return kw, False
    # latent noise / latent nothing: the masked part of the init latents is noise / zeros
    init = _encode(pipe, works, w, h)
    lat_mask = torch.stack([torch.from_numpy(np.asarray(
        m.resize((init.shape[-1], init.shape[-2]), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0)
        for m in masks])[:, None].to(init.device, init.dtype).round()
    replacement = noise.to(init.device, init.dtype) if req.inpainting_fill == 2 else torch.zeros_like(init)
    kw["image"] = init * (1 - lat_mask) + replacement * lat_mask
    # the inpaint pipeline cannot mask latents it was handed: give it the masked-image latents (a 4-channel
    # UNet never reads them, so the init latents stand in there)
    kw["masked_image_latents"] = _encode_masked(pipe, works, masks, w, h) if inpainting_model else kw["image"]
    return kw, True


def _encode_masked(pipe, works, masks, w, h) -> torch.Tensor:
    """What diffusers feeds an inpainting UNet: the latents of the image with the masked part zeroed (in [-1, 1])."""
    vae = pipe.vae
    x = pipe.image_processor.preprocess(works, height=h, width=w)
    m = pipe.mask_processor.preprocess(masks, height=h, width=w)
    x = (x * (m < 0.5)).to(vae.device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode()
    return latents * vae.config.scaling_factor


def _mask_params(req: Img2ImgRequest) -> dict[str, Any]:
    blur = req.mask_blur_x if req.mask_blur_x == req.mask_blur_y else None
    params: dict[str, Any] = {"Mask blur": blur}
    if blur is None:
        params.update({"Mask blur x": req.mask_blur_x, "Mask blur y": req.mask_blur_y})
    params.update({
        "Mask mode": MASK_MODES[1] if req.inpainting_mask_invert else None,
        "Masked content": MASKED_CONTENT[req.inpainting_fill],
        "Inpaint area": INPAINT_AREAS[1] if req.inpaint_full_res else INPAINT_AREAS[0],
        "Masked area padding": req.inpaint_full_res_padding,
    })
    return {k: v for k, v in params.items() if v is not None}


def _infotext_params(req: Img2ImgRequest, info, seed, subseed, clip_skip, has_mask) -> dict:
    params = base_infotext_params(req, info, seed, subseed, clip_skip, req.denoising_strength)
    if req.resize_mode:
        params["Resize mode"] = ("Just resize", "Crop and resize", "Resize and fill",
                                 "Just resize (latent upscale)")[req.resize_mode]
    if has_mask:
        params.update(_mask_params(req))
    if req.initial_noise_multiplier not in (None, 1, 1.0):
        params["Noise multiplier"] = req.initial_noise_multiplier
    if req.script_name:
        params.update(img2img_scripts.infotext_params(req))
    if req.styles:
        params["Styles array"] = json.dumps(list(req.styles))
    params["Version"] = VERSION
    return params


# ----------------------------------------------------------------------------------------------------- batch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class BatchFolders:
    """img2img's Batch mode: the images of `input_dir` (with the same-named mask of `mask_dir`, if given), saved
    to `output_dir` under their own names, or to the usual outputs folder when it is None."""
    input_dir: Path
    output_dir: Path | None = None
    mask_dir: Path | None = None

    @classmethod
    def from_text(cls, input_dir: str, output_dir: str = "", mask_dir: str = "") -> "BatchFolders":
        """From what a user typed; GenerationError (with what to do) for a folder that is not there."""
        def folder(text, what, required):
            text = (text or "").strip()
            if not text:
                if required:
                    raise GenerationError(f"No {what}: type a folder on the server.")
                return None
            path = Path(text).expanduser()
            if what != "output directory" and not path.is_dir():
                raise GenerationError(f"The {what} {path} does not exist or is not a folder.")
            return path
        return cls(folder(input_dir, "input directory", True), folder(output_dir, "output directory", False),
                   folder(mask_dir, "mask directory", False))

    def images(self) -> list[Path]:
        files = sorted(p for p in self.input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise GenerationError(f"The input directory {self.input_dir} holds no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)}).")
        return files

    def mask_for(self, image: Path) -> Path | None:
        if self.mask_dir is None:
            return None
        for candidate in sorted(self.mask_dir.iterdir()):
            if candidate.stem == image.stem and candidate.suffix.lower() in IMAGE_EXTENSIONS:
                return candidate
        raise GenerationError(f"no mask named {image.stem}.* in {self.mask_dir}")


def run_img2img_batch(ctx: GenerationContext, req: Img2ImgRequest, folders: BatchFolders, job: Job | None = None,
                      settings: dict | None = None) -> GenerationResult:
    """Every image of the input folder through `req` in turn (one job). A file that cannot be read or run is
    skipped and named in the answer's warnings; the outputs keep their input's name in the output folder (a
    file already there is never replaced: NAME-1.png ...), or go where any img2img image goes."""
    settings = settings or {}
    files = folders.images()
    images, infotexts, paths, problems = [], [], [], []
    info: dict = {}
    for n, path in enumerate(files, 1):
        if job is not None:
            job.textinfo = f"Image {n}/{len(files)}: {path.name}"
        try:
            init = pix.flatten(_open_image(path))
            mask_path = folders.mask_for(path)
            mask = _open_image(mask_path) if mask_path is not None else None
            one = validate_img2img(dataclasses.replace(req, init_images=[init], mask=mask,
                                                       save_images=req.save_images and folders.output_dir is None))
            result = run_img2img(ctx, one, job, settings)
        except JobInterrupted:
            break
        except (GenerationError, OSError) as e:
            problems.append(f"{path.name}: {e}")
            continue
        for k, (image, text) in enumerate(zip(result.images[result.grid_count:], result.infotexts[result.grid_count:])):
            if folders.output_dir is not None:
                paths.append(outputs.save_image_named(
                    image, folders.output_dir, path.stem + (f"-{k}" if k else ""),
                    infotext=text if settings.get("enable_pnginfo", True) else None,
                    extension=settings.get("samples_format", "png"), jpeg_quality=settings.get("jpeg_quality", 80)))
            images.append(image)
            infotexts.append(text)
        paths.extend(result.paths)
        info = result.info
        if job is not None and job.interrupted:
            break
    if not images and problems:
        raise GenerationError("; ".join(problems))
    info = dict(info, warnings=list(info.get("warnings", [])) + problems, infotexts=infotexts,
                index_of_first_image=0)
    return GenerationResult(images=images, infotexts=infotexts, info=info, paths=paths, grid_count=0)


def _open_image(path: Path) -> Image.Image:
    from PIL import UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise GenerationError(f"cannot read {path.name} as an image") from e
