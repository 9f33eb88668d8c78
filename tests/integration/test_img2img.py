"""img2img and inpainting: fidelity against plain diffusers img2img, every mask/fill/area option over the API
with the tiny ordinary and inpainting checkpoints, outpainting scripts, and bad input."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from modules import generation
from modules.generation import images as img2img_images
from modules.generation import img2img
from modules.generation.img2img_params import Img2ImgRequest, validate_img2img
from tests.images import assert_float_images_close, assert_pixels_close

SMALL = {"width": 64, "height": 64, "steps": 4, "seed": 7, "sampler_name": "Euler", "prompt": "a red house"}
CHECKPOINTS = ["tiny-sd15.safetensors", "tiny-sd15-inpainting.safetensors"]
BLUR = 2
MARGIN = 3 * BLUR + 2  # pixels this far from the painted box are outside the blurred mask


def picture(w=64, h=64) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[::4, ::4, 2] = 200
    return Image.fromarray(a)


def box_mask(w=64, h=64, box=(20, 20, 44, 44), mode="L") -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m.convert(mode)


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"), np.int16)


def outside(box, shape, margin=MARGIN) -> np.ndarray:
    x1, y1, x2, y2 = box
    keep = np.ones(shape[:2], bool)
    keep[max(y1 - margin, 0):y2 + margin, max(x1 - margin, 0):x2 + margin] = False
    return keep


def inside(box, margin=MARGIN) -> tuple[slice, slice]:
    x1, y1, x2, y2 = box
    return slice(y1 + margin, y2 - margin), slice(x1 + margin, x2 - margin)


def post(api, **fields):
    body = {**SMALL, **fields}
    r = api.post(api.base + "/img2img", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# -- fidelity against the plain diffusers pipeline -------------------------------------------------------------

@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("img2img-out"))


@pytest.mark.parametrize("sampler, make", [
    ("Euler", lambda cfg: EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace")),
    ("Euler a", lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="linspace")),
])
def test_img2img_matches_plain_diffusers(context, tiny_models, sampler, make):
    seed, batch, steps, strength = 99, 2, 8, 0.6
    init = picture()
    req = validate_img2img(Img2ImgRequest(prompt="a red house", negative_prompt="blurry", sampler_name=sampler,
                                          steps=steps, width=64, height=64, seed=seed, batch_size=batch,
                                          init_images=[init], denoising_strength=strength, save_images=False))
    ours = img2img.run_img2img(context, req, None, {"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                    "return_grid": False}, keep_samples=True)
    plain = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers", local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    plain.scheduler = make(dict(plain.scheduler.config))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    expected = plain(["a red house"] * batch, negative_prompt=["blurry"] * batch, image=[init] * batch,
                     strength=strength, num_inference_steps=steps, guidance_scale=7.0, generator=generators,
                     output_type="np").images
    assert len(ours.images) == batch
    assert_float_images_close(ours.samples, expected)
    for a, b in zip(ours.images, plain.image_processor.numpy_to_pil(expected)):
        assert_pixels_close(a, b)
    assert "Denoising strength: 0.6" in ours.infotexts[0]
    # and the image really moved away from the init picture
    assert np.abs(np.asarray(ours.images[0], np.int16) - np.asarray(init, np.int16)).mean() > 5


# -- inpainting over the API -----------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_keeps_outside_and_changes_inside(api, checkpoint, fill):
    box = (20, 20, 44, 44)
    src = picture()
    out = post(api, init_images=[b64(src)], mask=b64(box_mask(box=box)), inpainting_fill=fill, mask_blur=BLUR,
               inpaint_full_res=False, denoising_strength=0.9,
               override_settings={"sd_model_checkpoint": checkpoint})
    got, orig = unb64(out["images"][0]), np.asarray(src, np.int16)
    assert got.shape == orig.shape
    keep = outside(box, got.shape)
    assert np.array_equal(got[keep], orig[keep]), "pixels outside the mask changed"
    assert np.abs(got[inside(box)] - orig[inside(box)]).mean() > 5, "the masked area was not repainted"
    info = json.loads(out["info"])
    text = info["infotexts"][0]
    for words in ["Denoising strength: 0.9", f"Mask blur: {BLUR}", "Inpaint area: Whole picture",
                  "Masked area padding: 0",
                  "Masked content: " + ["fill", "original", "latent noise", "latent nothing"][fill]]:
        assert words in text, text
    assert info["is_using_inpainting_conditioning"] is ("inpainting" in checkpoint)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_inverted_mask_repaints_the_outside(api, checkpoint):
    box = (16, 16, 48, 48)
    src = picture()
    out = post(api, init_images=[b64(src)], mask=b64(box_mask(box=box)), inpainting_mask_invert=1, mask_blur=BLUR,
               inpaint_full_res=False, inpainting_fill=1, denoising_strength=0.9,
               override_settings={"sd_model_checkpoint": checkpoint})
    got, orig = unb64(out["images"][0]), np.asarray(src, np.int16)
    ys, xs = inside(box)
    assert np.array_equal(got[ys, xs], orig[ys, xs]), "the (now unmasked) box changed"
    assert np.abs(got[outside(box, got.shape)] - orig[outside(box, got.shape)]).mean() > 5
    assert "Mask mode: Inpaint not masked" in json.loads(out["info"])["infotexts"][0]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_only_masked_works_on_the_padded_crop_and_pastes_back(api, checkpoint):
    # a 160x96 picture, a small mask: "only masked" works on the mask's box + padding at 64x64, then pastes it back
    box = (100, 40, 116, 56)
    src = picture(160, 96)
    out = post(api, init_images=[b64(src)], mask=b64(box_mask(160, 96, box)), inpaint_full_res=True,
               inpaint_full_res_padding=8, mask_blur=BLUR, inpainting_fill=1, denoising_strength=0.9,
               override_settings={"sd_model_checkpoint": checkpoint})
    got, orig = unb64(out["images"][0]), np.asarray(src, np.int16)
    assert got.shape == orig.shape, "only-masked keeps the init image's size"
    keep = outside(box, got.shape)
    assert np.array_equal(got[keep], orig[keep])
    assert np.abs(got[inside(box, 2 * BLUR)] - orig[inside(box, 2 * BLUR)]).mean() > 5
    assert "Inpaint area: Only masked" in json.loads(out["info"])["infotexts"][0]
    assert "Masked area padding: 8" in json.loads(out["info"])["infotexts"][0]


def test_padding_sets_the_crop_region():
    mask = box_mask(160, 96, (100, 40, 116, 56))
    region = img2img_images.crop_region(mask, 8)
    assert region == (92, 32, 124, 64)
    assert img2img_images.expand_crop_region(region, 64, 64, 160, 96) == (92, 32, 124, 64)
    assert img2img_images.expand_crop_region((92, 32, 124, 48), 64, 64, 160, 96) == (92, 24, 124, 56)
    assert img2img_images.expand_crop_region(img2img_images.crop_region(mask, 40), 64, 64, 160, 96) == (60, 0, 156, 96)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_mask_of_any_mode_and_size(api, mode):
    box = (20, 20, 44, 44)
    if mode == "RGBA":  # a painter's layer: transparent, the stroke opaque (its colour does not matter)
        mask = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
        mask.paste((10, 200, 30, 255), tuple(2 * v for v in box))
    else:
        mask = box_mask(128, 128, tuple(2 * v for v in box), "RGB")  # another size: resized to the image
    src = picture()
    out = post(api, init_images=[b64(src)], mask=b64(mask), mask_blur=BLUR, inpaint_full_res=False,
               inpainting_fill=1, denoising_strength=0.9)
    got, orig = unb64(out["images"][0]), np.asarray(src, np.int16)
    keep = outside(box, got.shape)
    assert np.array_equal(got[keep], orig[keep])
    assert np.abs(got[inside(box)] - orig[inside(box)]).mean() > 5


@pytest.mark.parametrize("resize_mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(api, resize_mode):
    out = post(api, init_images=[b64(picture(96, 48))], resize_mode=resize_mode, width=64, height=64,
               denoising_strength=0.5)
    assert unb64(out["images"][0]).shape == (64, 64, 3)


def test_resize_and_fill_and_crop_pixels():
    src = picture(96, 48)
    crop = np.asarray(img2img_images.resize_image(1, src, 64, 64), np.int16)
    assert np.abs(crop - np.asarray(src.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64)),
                                    np.int16)).max() == 0
    filled = np.asarray(img2img_images.resize_image(2, src, 64, 64), np.int16)
    inner = np.asarray(src.resize((64, 32), Image.Resampling.LANCZOS), np.int16)
    assert np.array_equal(filled[16:48], inner)
    # the band above is the first row stretched: every band row the same, the edge's colours (red, green)
    assert all(np.array_equal(filled[i], filled[0]) for i in range(16))
    assert np.abs(filled[0, :, :2].astype(int) - inner[0, :, :2]).max() <= 2


def test_include_init_images_and_saving(api, api_server):
    src = b64(picture())
    out = post(api, init_images=[src], denoising_strength=0.5)
    assert out["parameters"]["init_images"] is None
    folder = api_server.data_dir / "outputs" / "img2img-images"
    before = set(folder.rglob("*.png"))  # other tests (the browser ones too) save here as well
    out = post(api, init_images=[src], denoising_strength=0.5, include_init_images=True, save_images=True)
    assert out["parameters"]["init_images"] == [src]
    saved = sorted(set(folder.rglob("*.png")) - before)
    assert len(saved) == 1 and "Denoising strength: 0.5" in Image.open(saved[0]).info["parameters"]


@pytest.mark.parametrize("script, args, size, offset", [
    ("Poor man's outpainting", [32, 4, "fill", ["left", "down"]], (96, 96), (32, 0)),
    ("outpainting mk2", ["", 32, 4, ["right"], 1.0, 0.05], (96, 64), (0, 0)),
])
def test_outpainting_scripts_expand_and_keep_the_picture(api, script, args, size, offset):
    src = picture()
    out = post(api, init_images=[b64(src)], script_name=script, script_args=args, denoising_strength=0.9)
    got = unb64(out["images"][0])
    assert (got.shape[1], got.shape[0]) == size
    # the original sits where it was put, untouched away from the seams (overlap + blur of 20 pixels)
    x0, y0 = offset
    far = slice(20, 44)
    assert np.array_equal(got[y0 + 20:y0 + 44, x0 + 20:x0 + 44], np.asarray(src, np.int16)[far, far])
    # and the new border was painted
    assert got[:, -8:].std() > 1 if "right" in str(args) else got[:, :8].std() > 1
    assert "Script: " in json.loads(out["info"])["infotexts"][0]


@pytest.mark.parametrize("fields, status, words", [
    ({"init_images": []}, 422, "init_images"),
    ({"init_images": None}, 422, "init_images"),
    ({"width": 100}, 422, "multiple of 8"),
    ({"mask": "not an image"}, 422, "mask"),
    ({"width": 4096, "height": 64}, 422, "width"),
    ({"denoising_strength": 1.5}, 422, "denoising_strength"),
    ({"denoising_strength": -0.1}, 422, "denoising_strength"),
    ({"inpainting_fill": 7}, 422, "inpainting_fill"),
    ({"resize_mode": 9}, 422, "resize_mode"),
    ({"script_name": "outpainting mk2", "script_args": ["", 4000]}, 422, "pixels"),
    ({"script_name": "No such script"}, 400, "unknown script"),
    ({"script_name": "X/Y/Z plot", "script_args": [1]}, 422, "X/Y/Z plot"),
])
def test_bad_input_is_a_4xx_with_a_message(api, fields, status, words):
    body = {**SMALL, "init_images": [b64(picture())], **fields}
    r = api.post(api.base + "/img2img", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()


def test_batch_runs_a_folder_keeps_names_and_never_overwrites(context, tmp_path):
    """img2img's Batch mode in the service: each image of the folder (with its same-named mask), saved under its
    own name in the output folder; a name already there gets -1; an unreadable file is skipped and named."""
    src, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    for folder in (src, masks, out):
        folder.mkdir()
    picture().save(src / "a.png")
    picture(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "b.png")
    (src / "broken.png").write_text("not an image")
    for name in ("a", "b", "broken"):
        box_mask().save(masks / f"{name}.png")
    (out / "a.png").write_bytes(b"made earlier by the user")
    req = Img2ImgRequest(prompt="a red house", steps=2, width=64, height=64, seed=3, denoising_strength=0.6,
                         inpaint_full_res=False)
    folders = img2img.BatchFolders.from_text(str(src), str(out), str(masks))
    result = img2img.run_img2img_batch(context, req, folders, None, {})
    assert len(result.images) == 2 and result.grid_count == 0
    assert sorted(p.name for p in out.iterdir()) == ["a-1.png", "a.png", "b.png"]
    assert (out / "a.png").read_bytes() == b"made earlier by the user"
    assert Image.open(out / "b.png").info["parameters"].startswith("a red house\n")
    assert any("broken.png" in w for w in result.info["warnings"])
    with pytest.raises(ValueError, match="does not exist"):
        img2img.BatchFolders.from_text(str(tmp_path / "nowhere"))
