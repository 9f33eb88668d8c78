"""Pixel work around img2img and inpainting: A1111's resize modes, masks (mode, invert, blur), masked-content
fill, the "only masked" crop region, and compositing the result over the original (PIL/numpy only, no torch)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS


def flatten(image: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Any image mode -> RGB; transparent parts over `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return image.convert("RGB")


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize (cover, centre crop), 2 resize and fill (fit,
    centre, the gaps filled with the stretched edge rows/columns); 3 (latent upscale) resizes like 0 here."""
    iw, ih = image.size
    if mode in (0, 3) or (iw, ih) == (width, height) and mode != 1:
        return image.resize((width, height), LANCZOS) if (iw, ih) != (width, height) else image.copy()
    ratio, src_ratio = width / height, iw / ih
    if mode == 1:
        sw = width if ratio > src_ratio else iw * height // ih
        sh = height if ratio <= src_ratio else ih * width // iw
        resized = image.resize((max(1, sw), max(1, sh)), LANCZOS)
        out = Image.new(image.mode, (width, height))
        out.paste(resized, (width // 2 - resized.width // 2, height // 2 - resized.height // 2))
        return out
    sw = width if ratio < src_ratio else iw * height // ih
    sh = height if ratio >= src_ratio else ih * width // iw
    resized = image.resize((max(1, sw), max(1, sh)), LANCZOS)
    out = Image.new(image.mode, (width, height))
    x0, y0 = width // 2 - resized.width // 2, height // 2 - resized.height // 2
    out.paste(resized, (x0, y0))
    if ratio < src_ratio and y0 > 0:  # bands above and below: the first/last row stretched
        out.paste(resized.resize((width, y0), LANCZOS, box=(0, 0, resized.width, 0)), (0, 0))
        rest = height - (y0 + resized.height)
        if rest > 0:
            out.paste(resized.resize((width, rest), LANCZOS, box=(0, resized.height, resized.width, resized.height)),
                      (0, y0 + resized.height))
    elif ratio > src_ratio and x0 > 0:  # bands left and right: the first/last column stretched
        out.paste(resized.resize((x0, height), LANCZOS, box=(0, 0, 0, resized.height)), (0, 0))
        rest = width - (x0 + resized.width)
        if rest > 0:
            out.paste(resized.resize((rest, height), LANCZOS, box=(resized.width, 0, resized.width, resized.height)),
                      (x0 + resized.width, 0))
    return out


def mask_from_image(mask: Image.Image, size: tuple[int, int], *, invert: bool = False,
                    round_mask: bool = True) -> Image.Image:
    """Any mask image -> an L mask the init image's size (white = repaint). RGBA masks with transparency use
    their alpha (what A1111's painter sends); other modes their luminance."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        m = mask.getchannel("A")
    else:
        m = mask.convert("L")
    if m.size != size:
        m = m.resize(size, LANCZOS)
    if round_mask:
        m = m.point(lambda v: 255 if v > 128 else 0)
    if invert:
        m = ImageOps.invert(m)
    return m


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    if blur_x <= 0 and blur_y <= 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur((max(blur_x, 0), max(blur_y, 0))))


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"fill": the masked area painted with the colours around it (normalized blurs, coarse to fine)."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    keep = (np.asarray(mask.convert("L"), np.float32) < 128).astype(np.float32)
    if keep.min() == 1 or keep.max() == 0:
        return image.convert("RGB") if keep.max() == 0 else image.copy()
    out = (rgb * keep[..., None]).copy()
    filled = keep.copy()
    for radius in (256, 64, 16, 4, 2):
        w = Image.fromarray((keep * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
        den = np.asarray(w, np.float32) / 255.0
        channels = [Image.fromarray(np.clip(rgb[..., c] * keep, 0, 255).astype(np.uint8))
                    .filter(ImageFilter.GaussianBlur(radius)) for c in range(3)]
        num = np.stack([np.asarray(ch, np.float32) for ch in channels], -1)
        ok = (den > 0.02) & (keep == 0)
        est = num / np.maximum(den, 1e-6)[..., None]
        out[ok] = est[ok]
        filled = np.maximum(filled, ok.astype(np.float32))
    out[filled == 0] = rgb[keep == 1].mean(0)  # nothing near at all: the mean colour
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """The box around the mask's non-zero pixels grown by `pad` (clamped to the image); None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def expand_crop_region(region, width: int, height: int, image_w: int, image_h: int):
    """Grow a box to the processing aspect ratio width:height, centred, kept inside the image where possible."""
    x1, y1, x2, y2 = region
    ratio = width / height
    cw, ch = x2 - x1, y2 - y1
    if cw / ch < ratio:  # too tall: widen
        need = min(int(round(ch * ratio)), image_w) - cw
        x1 -= need // 2
        x2 += need - need // 2
        if x1 < 0:
            x2, x1 = min(x2 - x1, image_w), 0
        if x2 > image_w:
            x1, x2 = max(x1 - (x2 - image_w), 0), image_w
    else:  # too wide: heighten
        need = min(int(round(cw / ratio)), image_h) - ch
        y1 -= need // 2
        y2 += need - need // 2
        if y1 < 0:
            y2, y1 = min(y2 - y1, image_h), 0
        if y2 > image_h:
            y1, y2 = max(y1 - (y2 - image_h), 0), image_h
    return x1, y1, x2, y2


def overlay_mask(blurred_mask: Image.Image) -> Image.Image:
    """The compositing alpha: the blurred mask doubled and clipped (A1111's mask_for_overlay), so the painted
    area is fully generated and only the blur's outer half fades into the original."""
    a = np.asarray(blurred_mask.convert("L"), np.float32) * 2
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def composite(generated: Image.Image, original: Image.Image, alpha: Image.Image,
              paste_box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The generated picture over the original where `alpha` is white; with `paste_box` the generated crop is
    first scaled back into its box of the original. Pixels where alpha is 0 are the original's exactly."""
    original = original.convert("RGB")
    if paste_box is not None:
        x1, y1, x2, y2 = paste_box
        base = original.copy()
        base.paste(resize_image(1, generated.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
        generated = base
    generated = generated.convert("RGB")
    if generated.size != original.size:
        generated = generated.resize(original.size, LANCZOS)
    return Image.composite(generated, original, alpha.convert("L"))
