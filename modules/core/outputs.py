"""Image files and image bytes: A1111 file naming, atomic saving, grids, base64 in and out.

Saved files follow A1111's `outputs/<kind>/YYYY-MM-DD/NNNNN-SEED-PROMPTSTART.png`: a 5-digit counter
per folder (1 + the highest counter already there), the infotext inside the file (PNG text chunk
`parameters`, EXIF UserComment for JPEG/WebP). A file appears under its final name only once it is
complete, and an existing file is never overwritten, even by another process saving into the
same folder.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import re
import threading
import uuid
import warnings
from datetime import date, datetime
from pathlib import Path
from typing import Mapping, Sequence

from PIL import ExifTags, Image, ImageColor, PngImagePlugin, UnidentifiedImageError

from modules.core.infotext import encode_exif_user_comment

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "[seed]-[prompt_spaces]"
MAX_FILENAME_CHARS = 128
# Linux allows 255 bytes per name; a margin keeps room for tools that append to names.
MAX_FILENAME_BYTES = 240
MAX_DECODE_PIXELS = 40_000_000
MAX_PROMPT_WORDS = 8

# Characters no file name may hold on Windows or Linux, plus '#' (A1111 drops it too: it breaks
# URLs to the file). Control characters are handled separately.
_INVALID_FILENAME_CHARS = '<>:"/\\|?*#'
_WHITESPACE_RUN = re.compile(r"\s+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_WORD_SPLIT = re.compile(r"[\s!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]+")
_PATTERN_TOKEN = re.compile(r"\[([^\[\]]+)\]")
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# A JPEG APP1 segment holds at most 65535 bytes, including its length field and "Exif\0\0" header
# and the TIFF structure around the comment.
_JPEG_EXIF_LIMIT = 65_000

# One lock for every folder: the section it guards (list the folder, link one file) is short, and
# a second process is kept out by the no-overwrite link, not by this lock.
_save_lock = threading.Lock()


class InvalidImageError(ValueError):
    """Image data that cannot be used: bad base64, bytes that are not an image, or too many pixels."""


# --- folders and names -----------------------------------------------------------------------------


def dated_folder(root: Path, kind: str, when: date | None = None) -> Path:
    """root/kind/YYYY-MM-DD, e.g. outputs/txt2img-images/2024-05-01 (not created here).

    `kind` is one folder name such as "txt2img-images", "img2img-images", "txt2img-grids"; anything
    that could leave `root` is refused with ValueError.
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(f"output kind must be a plain folder name, got {kind!r}")
    when = when or date.today()
    return Path(root) / kind / when.strftime("%Y-%m-%d")


def samples_folder(root: Path, kind: str, when: date | None = None, custom: str | os.PathLike = "") -> Path:
    """Where an image is saved: `dated_folder(root, kind)`, or CUSTOM/YYYY-MM-DD when the user set an output
    directory for images (A1111's `outdir_samples`, which replaces the per-tab folders)."""
    if custom:
        return Path(custom).expanduser() / (when or date.today()).strftime("%Y-%m-%d")
    return dated_folder(root, kind, when)


def next_sequence_number(folder: Path) -> int:
    """1 + the highest leading counter of any file name in `folder` (0 for an empty or missing folder).

    Like A1111's get_next_sequence_number: "00012-123-cat.png" counts 12; names that do not start
    with a number are ignored.
    """
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        head = os.path.splitext(name)[0].split("-", 1)[0]
        if head.isdigit():
            highest = max(highest, int(head))
    return highest + 1


def sanitize_filename_part(text: str, *, replace_spaces: bool = False) -> str:
    """`text` made safe as part of a file name on Windows and Linux.

    Whitespace runs (newlines and tabs too) become one space (or '_' with replace_spaces), control
    characters go, characters invalid on Windows or Linux become '_' as A1111 does, and leading
    spaces / trailing spaces and dots are trimmed (Windows drops them silently).
    """
    text = _WHITESPACE_RUN.sub(" ", str(text))
    text = _CONTROL_CHARS.sub("", text)
    text = text.translate({ord(ch): "_" for ch in _INVALID_FILENAME_CHARS})
    if replace_spaces:
        text = text.replace(" ", "_")
    return text.lstrip(" ").rstrip(" .")


def _prompt_words(prompt: str) -> str:
    words = [w for w in _WORD_SPLIT.split(prompt or "") if w]
    return " ".join(words[:MAX_PROMPT_WORDS]) or "empty"


def expand_pattern(pattern: str, *, seed: int | str, prompt: str, when: datetime | None = None) -> str:
    """The file-name decoration for A1111 pattern tokens, sanitized.

    Tokens: [seed], [prompt_spaces] (prompt as is), [prompt] (spaces as '_'), [prompt_words]
    (the first 8 words, punctuation dropped), [date] (YYYY-MM-DD), [datetime] (YYYYmmddHHMMSS).
    An unknown token is kept as written, as A1111 does.
    """
    when = when or datetime.now()
    values = {
        "seed": str(seed),
        "prompt_spaces": sanitize_filename_part(prompt or ""),
        "prompt": sanitize_filename_part(prompt or "", replace_spaces=True),
        "prompt_words": sanitize_filename_part(_prompt_words(prompt)),
        "date": when.strftime("%Y-%m-%d"),
        "datetime": when.strftime("%Y%m%d%H%M%S"),
    }

    def substitute(match: re.Match) -> str:
        return values.get(match.group(1).lower(), match.group(0))

    expanded = sanitize_filename_part(_PATTERN_TOKEN.sub(substitute, pattern))
    # An empty prompt must not leave "1234-" behind.
    return expanded.rstrip(" -_")


def _fit_name(counter: int, decoration: str, extension: str) -> str:
    """NNNNN[-decoration].ext, the decoration shortened (at a word end where one is near) to fit the limits."""
    prefix = f"{counter:05d}"
    suffix = f".{extension}"

    def build(part: str) -> str:
        return f"{prefix}-{part}{suffix}" if part else f"{prefix}{suffix}"

    def fits(name: str) -> bool:
        return len(name) <= MAX_FILENAME_CHARS and len(name.encode("utf-8")) <= MAX_FILENAME_BYTES

    if fits(build(decoration)):
        return build(decoration)
    keep = min(len(decoration), MAX_FILENAME_CHARS)
    while keep > 0 and not fits(build(decoration[:keep])):
        keep -= 1
    cut = decoration[:keep]
    space = cut.rfind(" ")
    # Break at the last word end unless that throws away more than a third of what fits.
    if space > 0 and space >= keep * 2 // 3:
        cut = cut[:space]
    return build(cut.rstrip(" .-_"))


# --- encoding --------------------------------------------------------------------------------------


def image_format(extension: str) -> str:
    """Pillow format name for a file extension (png, jpg/jpeg, webp); ValueError otherwise."""
    try:
        return _FORMATS[extension.lower().lstrip(".")]
    except KeyError:
        raise ValueError(f"unsupported image format {extension!r}; use one of: png, jpg, webp") from None


def _exif_with_comment(text: str, limit: int | None) -> bytes:
    def build(comment: str) -> bytes:
        exif = Image.Exif()
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = encode_exif_user_comment(comment)
        return exif.tobytes()

    data = build(text)
    if limit is None or len(data) <= limit:
        return data
    # Keep the image: a JPEG cannot hold this much metadata, so the comment is shortened to fit.
    log.warning("infotext of %d characters is too long for JPEG EXIF; it is truncated", len(text))
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if len(build(text[:mid])) <= limit:
            low = mid
        else:
            high = mid - 1
    return build(text[:low])


def encode_image(image: Image.Image, fmt: str = "PNG", *, infotext: str | None = None, quality: int = 80,
                 chunks: Mapping[str, str] | None = None) -> bytes:
    """Image file bytes in `fmt` (PNG, JPEG, WEBP; extensions accepted), with the infotext inside when given.
    `chunks` are more PNG text chunks (the extras tab's `extras`); other formats leave them out."""
    pil_format = image_format(fmt)
    kwargs: dict = {}
    if pil_format == "PNG":
        texts = {**({"parameters": infotext} if infotext else {}), **{k: v for k, v in (chunks or {}).items() if v}}
        if texts:
            info = PngImagePlugin.PngInfo()
            # Pillow writes iTXt (UTF-8) when the text is not Latin-1, so any prompt survives.
            for key, text in texts.items():
                info.add_text(key, text)
            kwargs["pnginfo"] = info
    else:
        kwargs["quality"] = quality
        if pil_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("RGB")
        elif pil_format == "WEBP" and image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        if infotext:
            kwargs["exif"] = _exif_with_comment(infotext, _JPEG_EXIF_LIMIT if pil_format == "JPEG" else None)
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **kwargs)
    return buffer.getvalue()


def encode_image_base64(image: Image.Image, fmt: str = "PNG", infotext: str | None = None,
                        chunks: Mapping[str, str] | None = None) -> str:
    """Base64 of the image file (no data: prefix), carrying the infotext (and PNG `chunks`) when given."""
    return base64.b64encode(encode_image(image, fmt, infotext=infotext, chunks=chunks)).decode("ascii")


def decode_image_base64(text: str | bytes, *, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """A loaded PIL image from raw base64 or a data URI (whitespace, URL-safe alphabet and missing padding tolerated).

    Raises InvalidImageError with a readable message for bad base64, bytes that are not an image,
    truncated data, and images over `max_pixels` (checked from the header before any pixel is
    decoded, so a decompression bomb costs nothing).
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise InvalidImageError(f"image must be a base64 string, got {type(text).__name__}")
    data = text.strip()
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep:
            raise InvalidImageError("data URI has no ',' before its data")
        if not header.endswith(";base64"):
            raise InvalidImageError("data URI is not base64-encoded (expected ';base64,')")
    data = "".join(data.split()).replace("-", "+").replace("_", "/")
    if not data:
        raise InvalidImageError("image data is empty")
    data += "=" * (-len(data) % 4)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image is not valid base64: {exc}") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as exc:
            raise InvalidImageError(f"image is too large: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidImageError(f"data is not an image in a format this server reads ({len(raw)} bytes)") from exc
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidImageError(
                f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                f"the limit is {max_pixels / 1e6:g} megapixels"
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidImageError(f"image data is truncated or corrupt: {exc}") from None
    return image


# --- saving ----------------------------------------------------------------------------------------


def save_image(
    image: Image.Image,
    folder: Path,
    *,
    seed: int | str,
    prompt: str,
    infotext: str | None,
    extension: str = "png",
    pattern: str = DEFAULT_PATTERN,
    jpeg_quality: int = 80,
    chunks: Mapping[str, str] | None = None,
) -> Path:
    """Save `image` as folder/NNNNN-<pattern>.<extension> and return the path.

    The counter is 1 + the highest in the folder. The file is encoded and written to a hidden temp
    file in the same folder first, then published under its final name with a hard link, which
    fails instead of replacing a file that exists (so neither a thread nor another process can
    overwrite one); on file systems without hard links it falls back to os.replace after checking
    the name is free, under the lock.
    """
    extension = extension.lower().lstrip(".")
    decoration = expand_pattern(pattern, seed=seed, prompt=prompt)
    return _write_new(image, Path(folder), extension, infotext, jpeg_quality,
                      lambda counter: _fit_name(counter, decoration, extension), next_sequence_number, chunks)


def save_image_named(image: Image.Image, folder: Path, stem: str, *, infotext: str | None, extension: str = "png",
                     jpeg_quality: int = 80, chunks: Mapping[str, str] | None = None) -> Path:
    """Save `image` as folder/STEM.EXT (img2img batch outputs keep their input's name), or STEM-1.EXT, STEM-2.EXT
    ... when that name is taken: a file already there is never replaced. Written as `save_image` writes."""
    extension = extension.lower().lstrip(".")
    stem = sanitize_filename_part(stem) or "image"
    return _write_new(image, Path(folder), extension, infotext, jpeg_quality,
                      lambda n: f"{stem}.{extension}" if n == 0 else f"{stem}-{n}.{extension}", lambda _folder: 0,
                      chunks)


def _write_new(image, folder: Path, extension: str, infotext, quality: int, name_for, first_counter,
               chunks: Mapping[str, str] | None = None) -> Path:
    """Encode `image`, write it to a hidden temp file in `folder`, and publish it under the first free
    name_for(counter) from first_counter(folder) on."""
    data = encode_image(image, extension, infotext=infotext, quality=quality, chunks=chunks)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide permissions
        # the way a plain open() would (mkstemp would leave the image readable by its owner only).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        with _save_lock:
            return _publish(temp, folder, name_for, first_counter(folder))
    finally:
        if temp.exists():
            temp.unlink()


def _publish(temp: Path, folder: Path, name_for, counter: int) -> Path:
    for _ in range(10_000):
        target = folder / name_for(counter)
        try:
            os.link(temp, target)
            return target
        except FileExistsError:
            counter += 1
            continue
        except OSError:
            # No hard links here (FAT, some network shares): replace is atomic but would overwrite,
            # so the name is checked first; only another process racing this instant could collide.
            if target.exists():
                counter += 1
                continue
            os.replace(temp, target)
            return target
    raise RuntimeError(f"could not find a free file name in {folder}")


# --- grids -----------------------------------------------------------------------------------------


def grid_shape(count: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) of A1111's image grid with its default settings.

    rows = round(sqrt(n)) unless given (never more than n), cols = ceil(n / rows):
    1 -> 1x1, 2 -> 1x2, 3 -> 2x2, 4 -> 2x2, 5 -> 2x3, 6 -> 2x3, 8 -> 3x3, 9 -> 3x3.
    """
    if count < 1:
        raise ValueError("a grid needs at least one image")
    if rows is None or rows < 1:
        rows = round(math.sqrt(count))
    rows = max(1, min(rows, count))
    return rows, math.ceil(count / rows)


def make_grid(
    images: Sequence[Image.Image],
    rows: int | None = None,
    *,
    background: str | tuple[int, int, int] = "black",
    margin: int = 0,
) -> Image.Image:
    """All images in one RGB picture, row by row; cells take the largest size, smaller images are centred.

    Empty cells and the `margin` between cells show `background` (black by default; the settings
    "grid_background_color" and "grid_margin" give the batch grids theirs).
    """
    images = list(images)
    row_count, col_count = grid_shape(len(images), rows)
    cell_w = max(img.width for img in images)
    cell_h = max(img.height for img in images)
    color = ImageColor.getrgb(background) if isinstance(background, str) else tuple(background)
    grid = Image.new("RGB", (col_count * cell_w + (col_count - 1) * margin, row_count * cell_h + (row_count - 1) * margin),
                     color=color[:3])
    for index, img in enumerate(images):
        x = (index % col_count) * (cell_w + margin) + (cell_w - img.width) // 2
        y = (index // col_count) * (cell_h + margin) + (cell_h - img.height) // 2
        grid.paste(img.convert("RGB"), (x, y))
    return grid
