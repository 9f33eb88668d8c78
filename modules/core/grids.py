"""Labelled image grids for scripts (X/Y/Z plot, prompt matrix) and the model comparison report: cells in rows with margins, legends above the
columns and left of the rows, a caption strip under a cell. The font is the one Pillow ships (FreeType), so
grids look the same on every machine without a system font."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont


@dataclass
class GridAnnotation:
    """One legend line (A1111's name); an inactive one is drawn greyed and struck through (prompt matrix)."""
    text: str = ""
    is_active: bool = True


@lru_cache(maxsize=16)
def font(size: int):
    return ImageFont.load_default(size=max(6, int(size)))


def image_grid(images: list, rows: int | None = None, cols: int | None = None, *, margin: int = 0,
               background="#ffffff") -> Image.Image:
    """Cells of the largest image's size, row by row, `margin` pixels apart (none at the outer edge)."""
    images = list(images)
    if not images:
        raise ValueError("no images for a grid")
    if cols is None:
        if rows is None:
            rows = max(1, int(len(images) ** 0.5))
            while len(images) % rows:
                rows -= 1
        cols = (len(images) + rows - 1) // rows
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w + (cols - 1) * margin, rows * h + (rows - 1) * margin), background)
    for i, im in enumerate(images):
        x, y = (i % cols) * (w + margin), (i // cols) * (h + margin)
        grid.paste(im.convert("RGB"), (x + (w - im.width) // 2, y + (h - im.height) // 2))
    return grid


def _split_long(draw: ImageDraw.ImageDraw, word: str, fnt, width: int) -> list[str]:
    """A word wider than `width` (a checkpoint name) in pieces that fit."""
    pieces, piece = [], ""
    for ch in word:
        if piece and draw.textlength(piece + ch, font=fnt) > width:
            pieces.append(piece)
            piece = ch
        else:
            piece += ch
    return pieces + [piece]


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    lines = []
    for paragraph in str(text).split("\n"):
        words, line = [], ""
        for word in paragraph.split(" "):
            words += _split_long(draw, word, fnt, width) if draw.textlength(word, font=fnt) > width else [word]
        for word in words:
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=fnt) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def legend_font_size(width: int, height: int, setting: int = 0) -> int:
    return setting or max(10, (width + height) // 25)


def draw_grid_annotations(im: Image.Image, width: int, height: int, hor_texts: list, ver_texts: list,
                          margin: int = 0, *, background="#ffffff", active="#000000", inactive="#999999",
                          font_size: int = 0) -> Image.Image:
    """`im` (a grid of cells `width` x `height`, `margin` apart) with each column's legend above it and each
    row's to its left. hor_texts[col] and ver_texts[row] are lists of GridAnnotation (or of strings)."""
    size = legend_font_size(width, height, font_size)
    fnt = font(size)
    spacing = size // 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def lines_of(texts, box_w):
        out = []
        for t in texts:
            ann = t if isinstance(t, GridAnnotation) else GridAnnotation(str(t))
            out += [(line, ann.is_active) for line in _wrap(probe, ann.text, fnt, box_w)] if ann.text else []
        return out

    pad_left = 0 if not any(any((t.text if isinstance(t, GridAnnotation) else t) for t in v) for v in ver_texts) \
        else width * 3 // 4
    hor = [lines_of(t, max(width - spacing, 10)) for t in hor_texts]
    ver = [lines_of(t, max(pad_left - 2 * spacing, 10)) for t in ver_texts]
    line_h = size + spacing
    pad_top = 0 if not any(hor) else max(len(lines) for lines in hor) * line_h + spacing * 2
    result = Image.new("RGB", (im.width + pad_left, im.height + pad_top), background)
    result.paste(im, (pad_left, pad_top))
    draw = ImageDraw.Draw(result)

    def block(lines, cx, cy):
        y = cy - len(lines) * line_h / 2
        for text, is_active in lines:
            w = draw.textlength(text, font=fnt)
            color = active if is_active else inactive
            draw.text((cx - w / 2, y), text, font=fnt, fill=color)
            if not is_active:
                draw.line((cx - w / 2, y + size / 2, cx + w / 2, y + size / 2), fill=color, width=max(1, size // 12))
            y += line_h

    for col, lines in enumerate(hor):
        block(lines, pad_left + col * (width + margin) + width / 2, pad_top / 2)
    for row, lines in enumerate(ver):
        block(lines, pad_left / 2, pad_top + row * (height + margin) + height / 2)
    return result


def caption_under(im: Image.Image, text: str, *, background="#ffffff", color="#000000",
                  font_size: int = 0) -> Image.Image:
    """`im` with `text` in a strip under it (X/Y/Z plot's timing and memory of a cell)."""
    size = font_size or max(8, im.width // 16)
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, text, fnt, im.width - 4)
    strip = len(lines) * (size + size // 3) + size // 2
    out = Image.new("RGB", (im.width, im.height + strip), background)
    out.paste(im.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    y = im.height + size // 4
    for line in lines:
        draw.text(((im.width - draw.textlength(line, font=fnt)) / 2, y), line, font=fnt, fill=color)
        y += size + size // 3
    return out


def draw_prompt_matrix(im: Image.Image, width: int, height: int, all_prompts: list[str], margin: int = 0,
                       **colors) -> Image.Image:
    """A1111's prompt-matrix legend: the parts of all_prompts[1:] on/off along the columns and rows."""
    prompts = all_prompts[1:]
    boundary = (len(prompts) + 1) // 2
    hor_prompts, ver_prompts = prompts[:boundary], prompts[boundary:]
    hor = [[GridAnnotation(x, is_active=bool(pos & (1 << i))) for i, x in enumerate(hor_prompts)]
           for pos in range(1 << len(hor_prompts))]
    ver = [[GridAnnotation(x, is_active=bool(pos & (1 << i))) for i, x in enumerate(ver_prompts)]
           for pos in range(1 << len(ver_prompts))]
    return draw_grid_annotations(im, width, height, hor, ver, margin, **colors)


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along a side of `size`, overlapping by at least `overlap`, spread
    evenly so the last one ends at the edge."""
    if size <= tile:
        return [0]
    step = max(tile - overlap, 1)
    count = -(-(size - overlap) // step)
    count = max(count, 2)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def split_tiles(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> list[tuple[int, int, Image.Image]]:
    """(x, y, tile) of `image` cut into tiles of tile_w x tile_h overlapping by `overlap` (SD upscale)."""
    return [(x, y, image.crop((x, y, x + tile_w, y + tile_h)))
            for y in tile_origins(image.height, tile_h, overlap) for x in tile_origins(image.width, tile_w, overlap)]


def combine_tiles(size: tuple[int, int], tiles: list[tuple[int, int, Image.Image]]) -> Image.Image:
    """The tiles put back at their places; where two overlap, each weighs in by its distance from its own edge
    (a linear blend, so no seam shows)."""
    import numpy as np
    w, h = size
    acc = np.zeros((h, w, 3), np.float64)
    weight = np.zeros((h, w, 1), np.float64)
    for x, y, im in tiles:
        a = np.asarray(im.convert("RGB"), np.float64)
        th, tw = a.shape[:2]
        ramp_x = np.minimum(np.arange(tw) + 1, np.arange(tw)[::-1] + 1).astype(np.float64)
        ramp_y = np.minimum(np.arange(th) + 1, np.arange(th)[::-1] + 1).astype(np.float64)
        wgt = np.minimum(ramp_y[:, None], ramp_x[None, :])[..., None]
        acc[y:y + th, x:x + tw] += a * wgt
        weight[y:y + th, x:x + tw] += wgt
    out = acc / np.maximum(weight, 1e-9)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
