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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from modules.core import outputs, samplers
from modules.core.jobs import Job, JobInterrupted
from modules.generation import flow
from modules.generation import images as pix
from modules.generation.img2img_params import (
    INPAINT_AREAS,
    MASK_MODES,
    MASKED_CONTENT,
    RESIZE_MODES,
    Img2ImgRequest,
    validate_img2img,
)
from modules.generation.leases import add_new, networks_applied, resolve_networks
from modules.generation.params import GenerationError
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
    masked_content,
    sample_latents,
    scheduler_order,
    text_conditioner,
)
from modules.model_store import sd_pipelines
from modules.prompting import prompts


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


class Img2ImgProcessing(Processing):
    """An img2img / inpaint request (A1111's StableDiffusionProcessingImg2Img): `init_images`, `mask` and the
    inpaint options; each batch starts from the prepared init images and is pasted back over the original."""

    kind = "img2img"

    def __init__(self, ctx: GenerationContext, req: Img2ImgRequest, job: Job | None = None,
                 settings: dict | None = None, **kw):
        super().__init__(ctx, req, job, settings, **kw)
        self.multiplier = req.initial_noise_multiplier if req.initial_noise_multiplier is not None else \
            float(self.settings.get("initial_noise_multiplier", 1.0))

    def setup(self, stack: contextlib.ExitStack, bundle) -> None:
        req, ctx = self.request, self.ctx  # the request as the `process` hooks left it (outpainting grows it)
        self.init_images, self.mask = req.init_images, req.mask
        self.run_steps = min(int(self.steps * self.denoising_strength), self.steps)
        self.prepared = prepare_images(req)
        if bundle.arch.is_flow:  # FLUX and SD3: their own img2img pipelines (see flow.py)
            flow.setup_img2img(self, stack, bundle)
            return
        self.network_source = self.all_prompts[0]  # the prompt whose LoRAs apply
        resolved = resolve_networks(ctx, self.network_source)
        add_new(self.warnings, resolved.warnings)
        applied = stack.enter_context(networks_applied(ctx, bundle, resolved, self.warnings))
        self.conditioner = conditioner = text_conditioner(ctx, bundle, self.settings, self.clip_skip)
        order = scheduler_order(samplers.make_scheduler(self.sampler_name, self.scheduler, bundle.scheduler_config))
        self.conditioning_steps = max(self.run_steps, 1) * order
        self.old_scheduling = bool(self.settings.get("use_old_scheduling", False))
        self.first_prompt = resolved.prompt
        self.conditioning_for(self.all_prompts[0], self.all_negative_prompts[0])
        self.network_params = network_params(applied, prompts.embeddings_in(
            [resolved.prompt, self.negative_prompt], conditioner.used_embeddings))
        self.pass_kind = "inpaint" if (req.mask is not None or bundle.arch.inpainting) else "img2img"
        vae_scale = 2 ** (len(bundle.components["vae"].config.block_out_channels) - 1)
        self.shape = (bundle.components["vae"].config.latent_channels, self.height // vae_scale,
                      self.width // vae_scale)
        self.pipe = sd_pipelines.make_pipeline(bundle, self.pass_kind, samplers.make_scheduler(
            self.sampler_name, self.scheduler, bundle.scheduler_config), offload=ctx.offload,
            offload_device=ctx.offload_device)

    def sample(self, batch_number: int, seeds: list[int], subseeds: list[int]):
        lo = batch_number * self.batch_size
        self.batch = [self.prepared[(lo + j) % len(self.prepared)] for j in range(len(seeds))]
        if self.run_steps < 1:  # nothing to denoise: the (prepared) init images are the result
            return [p.work for p in self.batch]
        if self.bundle.arch.is_flow:
            masks = [p.mask for p in self.batch] if self.request.mask is not None else None
            return flow.sample_img2img(self, batch_number, seeds, [p.work for p in self.batch], masks)
        req, pipe, bundle = self.request, self.pipe, self.bundle
        pipe.scheduler = samplers.make_scheduler(self.sampler_name, self.scheduler, bundle.scheduler_config,
                                                 eta=self.eta.eta)
        self.tracker = StepTracker(self.job, self.run_steps, bundle.arch.family, self.preview_every)
        noise, _ = make_noise(seeds, subseeds, self.subseed_strength, self.shape, 0)
        # fresh generators: the pipeline draws exactly what a plain diffusers call with these seeds does
        generators = [torch.Generator("cpu").manual_seed(s + self.ensd) for s in seeds]
        kw, own_noise = _pass_inputs(pipe, req, self.batch, self.pass_kind, noise, bundle.arch.inpainting)
        substitute = None
        if own_noise or self.subseed_strength > 0 or self.multiplier != 1 or self.ensd:
            substitute = noise * self.multiplier
            if self.pass_kind == "inpaint" and self.denoising_strength >= 1:
                kw["latents"] = substitute  # at full strength the inpaint pipeline starts from these
        with _noise_substituted(pipe.scheduler, substitute):
            return sample_latents(pipe, conditioning=self.batch_conditioning(batch_number), sdxl=bundle.arch.family == "sdxl",
                                  steps=self.steps, cfg=self.cfg_scale, generators=generators, eta=self.eta.eta,
                                  tracker=self.tracker, strength=self.denoising_strength, **kw)

    def finish_image(self, batch_index: int, image):
        p = self.batch[batch_index]
        return pix.composite(image, p.original, p.alpha, p.paste_box) if p.original is not None else image

    def image_params(self, index: int) -> dict[str, Any]:
        req = self.request
        params = base_infotext_params(self, index, self.denoising_strength)
        if req.resize_mode:
            params["Resize mode"] = RESIZE_MODES[req.resize_mode]
        if req.mask is not None:
            params.update(_mask_params(req))
        if req.initial_noise_multiplier not in (None, 1, 1.0):
            params["Noise multiplier"] = req.initial_noise_multiplier
        params.update(self.network_params)
        params.update(sampler_params(self.sampler_name, self.eta, self.ensd))
        params.update(vae_params(self.bundle))
        params.update(common_params(self))
        if self.bundle.arch.is_flow:
            params.update(flow.image_params(self))
        return params

    def info_params(self) -> dict[str, Any]:
        mask = _mask_params(self.request) if self.request.mask is not None else {}
        return {**mask, **getattr(self, "network_params", {})}

    def info(self, grid_count: int) -> dict:
        return dict(super().info(grid_count), script_name=self.request.script_name or None)


def run_img2img(ctx: GenerationContext, req: Img2ImgRequest, job: Job | None = None,
                settings: dict | None = None, *, keep_samples: bool = False,
                scripts: list | None = None) -> GenerationResult:
    """Run every image of a validated img2img request on the current thread (the job worker). With
    `keep_samples` the result holds the decoded float images too (before any inpainting composite)."""
    return process_images(Img2ImgProcessing(ctx, req, job, settings, keep_samples=keep_samples, scripts=scripts))


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
    kw["image"] = masked_content(_encode(pipe, works, w, h), masks, req.inpainting_fill, noise)
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
