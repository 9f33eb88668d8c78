"""What the outpainting scripts (`scripts/poor_mans_outpainting.py`, `scripts/outpainting_mk_2.py`) do to a
request: parse their A1111 arguments, grow the canvas, mask the new border, and make it an inpaint request.
Torch-free, so the API can check the grown size against its limits before the job is queued."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from modules.generation import images as pix
from modules.generation.params import MAX_SIZE, GenerationError

POOR_MANS = "Poor man's outpainting"
MK2 = "Outpainting mk2"
TITLES = (POOR_MANS, MK2)
DIRECTIONS = ("left", "right", "up", "down")
MAX_PIXELS = 512
FILL_NAMES = ("fill", "original", "latent noise", "latent nothing")


def find(name: str | None) -> str | None:
    """A script title from its name (case-insensitive, as A1111's API matches them); None for none."""
    if name in (None, "", "None"):
        return None
    for title in TITLES:
        if title.lower() == str(name).strip().lower():
            return title
    raise ValueError(f"unknown script {name!r} (img2img scripts: {', '.join(TITLES)})")


def parse_args(name: str | None, args: list[Any]) -> dict[str, Any] | None:
    """The script's positional args (A1111's order) -> a dict; ValueError naming the bad one.

    Poor man's outpainting: [pixels=128, mask_blur=4, masked_content=0 (index or name), directions]
    Outpainting mk2: [info (ignored), pixels=128, mask_blur=8, directions, fall_off_exponent=1.0, color_variation=0.05]
    """
    title = find(name)
    if title is None:
        return None
    args = list(args or [])
    if title == POOR_MANS:
        names = ["pixels", "mask_blur", "inpainting_fill", "direction"]
        values = dict(pixels=128, mask_blur=4, inpainting_fill=1, direction=list(DIRECTIONS))
    else:
        args = args[1:] if args else args
        names = ["pixels", "mask_blur", "direction", "noise_q", "color_variation"]
        values = dict(pixels=128, mask_blur=8, direction=list(DIRECTIONS), noise_q=1.0, color_variation=0.05)
    if len(args) > len(names):
        raise ValueError(f"script_args: {title} takes at most {len(names)} arguments ({', '.join(names)})")
    values.update(zip(names, args))
    try:
        values["pixels"] = int(values["pixels"])
        values["mask_blur"] = int(values["mask_blur"])
        if "noise_q" in values:
            values["noise_q"] = float(values["noise_q"])
            values["color_variation"] = float(values["color_variation"])
    except (TypeError, ValueError):
        raise ValueError(f"script_args for {title}: pixels and mask blur must be integers, fall-off and colour "
                         f"variation numbers") from None
    if not 8 <= values["pixels"] <= MAX_PIXELS:
        raise ValueError(f"script_args for {title}: pixels to expand must be between 8 and {MAX_PIXELS}")
    if not 0 <= values["mask_blur"] <= 64:
        raise ValueError(f"script_args for {title}: mask blur must be between 0 and 64")
    direction = values["direction"]
    direction = [direction] if isinstance(direction, str) else list(direction or [])
    if not direction or any(str(d).lower() not in DIRECTIONS for d in direction):
        raise ValueError(f"script_args for {title}: directions must be a non-empty list of {list(DIRECTIONS)}")
    values["direction"] = [str(d).lower() for d in direction]
    if title == POOR_MANS:
        fill = values["inpainting_fill"]
        if isinstance(fill, str) and fill in FILL_NAMES:
            fill = FILL_NAMES.index(fill)
        if fill not in range(4):
            raise ValueError(f"script_args for {title}: masked content must be 0..3 or one of {list(FILL_NAMES)}")
        values["inpainting_fill"] = fill
    else:
        if not 0 < values["noise_q"] <= 4 or not 0 <= values["color_variation"] <= 1:
            raise ValueError(f"script_args for {title}: fall-off exponent in (0, 4], colour variation in [0, 1]")
    values["title"] = title
    return values


def _canvas(size: tuple[int, int], a: dict) -> tuple[int, int, int, int, int, int]:
    """(width, height, left, right, up, down) of the grown canvas for an image of `size`: the border added on
    each side, grown to a multiple of 8 on the expanded sides."""
    px, dirs = a["pixels"], a["direction"]
    left, right = px * ("left" in dirs), px * ("right" in dirs)
    up, down = px * ("up" in dirs), px * ("down" in dirs)
    w, h = size[0] + left + right, size[1] + up + down
    w8, h8 = (w + 7) // 8 * 8, (h + 7) // 8 * 8
    right += (w8 - w) if right or not left else 0
    left += (w8 - w) if left and not right else 0
    down += (h8 - h) if down or not up else 0
    up += (h8 - h) if up and not down else 0
    return w8, h8, left, right, up, down


def output_size(req) -> tuple[int, int] | None:
    """The size an outpainting request will work at (its canvas; the largest over its init images), worked out
    without touching pixels, so server limits can be checked before the job is queued; None without a script."""
    try:
        a = parse_args(req.script_name, req.script_args)
    except ValueError:
        return None  # bad arguments: the request's validation names them
    if a is None or not req.init_images or not all(hasattr(im, "size") for im in req.init_images):
        return None
    sizes = [_canvas(image.size, a)[:2] for image in req.init_images]
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def _expand(image: Image.Image, a: dict) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """The init image on a bigger canvas and the mask of the new border (plus a blur-wide overlap)."""
    w8, h8, left, right, up, down = _canvas(image.size, a)
    canvas = pix.resize_image(2, image, w8, h8) if a["title"] == POOR_MANS else Image.new("RGB", (w8, h8))
    if a["title"] != POOR_MANS:
        canvas = _noise_fill(image, (w8, h8), (left, up), a)
    canvas.paste(image, (left, up))
    overlap = a["mask_blur"] * 2 if a["title"] == POOR_MANS else a["mask_blur"]
    mask = Image.new("L", (w8, h8), 255)
    keep = (left + (overlap if left else 0), up + (overlap if up else 0),
            left + image.width - (overlap if right else 0), up + image.height - (overlap if down else 0))
    mask.paste(0, keep)
    return canvas, mask, (w8, h8)


def _noise_fill(image: Image.Image, size, offset, a: dict) -> Image.Image:
    """mk2's new area: the edge colours stretched outward, with noise that grows with the distance (fall-off)."""
    base = np.asarray(pix.resize_image(2, image, *size), np.float32)
    placed = Image.new("RGB", size)
    placed.paste(pix.resize_image(2, image, *size))
    stretched = np.asarray(placed, np.float32)
    h, w = size[1], size[0]
    x0, y0 = offset
    xs, ys = np.arange(w), np.arange(h)
    dx = np.maximum(np.maximum(x0 - xs, xs - (x0 + image.width - 1)), 0) / max(a["pixels"], 1)
    dy = np.maximum(np.maximum(y0 - ys, ys - (y0 + image.height - 1)), 0) / max(a["pixels"], 1)
    dist = np.clip(np.maximum(dx[None, :], dy[:, None]), 0, 1) ** a["noise_q"]
    rng = np.random.default_rng(0)
    std = base.reshape(-1, 3).std(0) + 1
    noise = rng.normal(0, 1, (h, w, 3)) * std * (0.5 + a["color_variation"] * 10)
    out = stretched + noise * dist[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def apply(req):
    """A request naming an outpainting script -> the inpaint request that does it (others unchanged)."""
    a = parse_args(req.script_name, req.script_args)
    if a is None:
        return req
    canvases, mask, (w, h) = [], None, (0, 0)
    for image in req.init_images:
        canvas, mask, (w, h) = _expand(pix.flatten(image), a)
        canvases.append(canvas)
    if max(w, h) > MAX_SIZE:
        raise GenerationError(f"{a['title']}: the expanded image would be {w}x{h}, over {MAX_SIZE} pixels a side")
    fill = a.get("inpainting_fill", 1)
    return dataclasses.replace(req, init_images=canvases, mask=mask, width=w, height=h, resize_mode=0,
                               mask_blur_x=a["mask_blur"], mask_blur_y=a["mask_blur"], inpainting_fill=fill,
                               inpaint_full_res=False, inpainting_mask_invert=0)


def infotext_params(req) -> dict[str, Any]:
    a = parse_args(req.script_name, req.script_args)
    return {"Script": a["title"], "Outpainting pixels": a["pixels"],
            "Outpainting direction": " ".join(a["direction"])} if a else {}


def grow(p, title: str, args) -> Any:
    """The processing object `p` turned into the outpainting inpaint request (its fields, as a script sets them
    before `process_images(p)`)."""
    req = dataclasses.replace(p.request, init_images=list(p.init_images), script_name=title, script_args=list(args))
    grown = apply(req)
    p.init_images, p.image_mask = grown.init_images, grown.mask
    p.width, p.height = grown.width, grown.height
    p.resize_mode, p.inpainting_fill = 0, grown.inpainting_fill
    p.mask_blur_x, p.mask_blur_y = grown.mask_blur_x, grown.mask_blur_y
    p.inpaint_full_res, p.inpainting_mask_invert = False, 0
    p.script_name, p.script_args = title, list(args)
    p.extra_generation_params.update(infotext_params(req))
    return p
