"""The A1111 infotext: writing and parsing the `parameters` text, and reading it out of image files.

Format (contract section 4)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>     (left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, ...

PNG files carry it as the `parameters` text chunk; JPEG and WebP as the EXIF UserComment, written
as "UNICODE\\0" + UTF-16 text the way A1111 (via piexif) writes it.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from PIL import ExifTags, Image

# Keys in the order A1111's create_infotext writes them; any other key follows in the caller's
# order, and "Version" always comes last.
FIXED_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Clip skip",
)
LAST_KEY = "Version"
NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# What parse_infotext fills in for keys an infotext does not mention: the values A1111 assumes for
# an absent key (so pasting an old infotext resets the field instead of keeping a stale value).
# Types are A1111's too: most are strings, a few are ints.
PARSE_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}

# One `Key: value` pair of the parameter line. A key starts with a word character and holds word
# characters, spaces, '-' and '/'; a value is either a JSON string (escapes allowed) or anything up
# to the next comma. These are A1111's rules, so lines written by either program parse alike.
_PAIR = re.compile(
    r"""
    \s*
    (?P<key> \w [\w \-/]+ )
    : \s*
    (?P<value> " (?: \\. | [^\\"] )+ " | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
_SIZE_VALUE = re.compile(r"(\d+)x(\d+)")

# The Exif sub-IFD and its UserComment tag.
_EXIF_IFD = ExifTags.IFD.Exif
_USER_COMMENT = ExifTags.Base.UserComment
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_JIS_PREFIX = b"JIS\0\0\0\0\0"

# Image.info keys that are file-format details, not text the user put there; A1111's /png-info
# leaves the same ones out of `items`.
_NON_TEXT_INFO_KEYS = frozenset(
    {
        "parameters", "exif", "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "loop",
        "background", "timestamp", "duration", "progressive", "progression", "icc_profile",
        "chromaticity", "photoshop", "transparency", "gamma", "srgb", "aspect", "xmp",
    }
)


# --- writing ---------------------------------------------------------------------------------------


def quote(value: str) -> str:
    """`value` as it must appear in the parameter line: JSON-quoted where a bare value would not parse back.

    A1111 quotes values holding ',', ':' or a newline. This also quotes values that start with a
    double quote or begin/end with whitespace, which A1111 would otherwise unquote or trim on the
    way back; A1111 reads the quoted form correctly, so the output stays compatible.
    """
    needs_quotes = (
        any(ch in value for ch in ",:\n\r")
        or value.startswith('"')
        or value != value.strip()
    )
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


def unquote(text: str) -> str:
    """The value of a JSON-quoted parameter; anything else is returned unchanged (A1111's rule)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        result = json.loads(text)
    except ValueError:
        return text
    return result if isinstance(result, str) else text


def format_value(value: Any) -> str:
    """A parameter value as text: (w, h) pairs as "WxH", everything else via str()."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)


def _clip_skip_applies(value: Any) -> bool:
    try:
        return int(float(value)) > 1
    except (TypeError, ValueError):
        return True


def ordered_params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, text) pairs in infotext order, without empty values and without Clip skip <= 1."""
    present = {k: v for k, v in params.items() if v is not None and format_value(v) != ""}
    if "Clip skip" in present and not _clip_skip_applies(present["Clip skip"]):
        del present["Clip skip"]
    keys = [k for k in FIXED_KEY_ORDER if k in present]
    keys += [k for k in present if k not in FIXED_KEY_ORDER and k != LAST_KEY]
    if LAST_KEY in present:
        keys.append(LAST_KEY)
    return [(k, format_value(present[k])) for k in keys]


def create_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The infotext of one image.

    `params` maps infotext keys ("Steps", "Sampler", "Size", "Lora hashes", ...) to values; None
    and "" are left out, Clip skip only appears above 1, (w, h) tuples are written "WxH".
    A parameter line with fewer than 3 pairs cannot be told apart from a prompt line when parsed
    (A1111's rule), so real callers always pass at least Steps, Sampler and Seed.
    """
    line = ", ".join(f"{key}: {quote(text)}" for key, text in ordered_params(params))
    parts = [prompt or ""]
    if negative_prompt:
        parts.append(f"{NEGATIVE_PROMPT_PREFIX} {negative_prompt}")
    if line:
        parts.append(line)
    # A1111 strips the result, so an empty prompt does not leave a blank first line.
    return "\n".join(parts).strip()


# --- parsing ---------------------------------------------------------------------------------------


def parse_params_line(line: str) -> list[tuple[str, str]]:
    """The (key, raw value) pairs of a parameter line, values still quoted."""
    return [(m.group("key"), m.group("value")) for m in _PAIR.finditer(line)]


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's parse_generation_parameters: {"Prompt", "Negative prompt", then every parameter}.

    - The last line is the parameter line only if it holds at least 3 `Key: value` pairs.
    - Lines before the one starting "Negative prompt:" are the prompt, the rest the negative prompt.
      Like A1111, each prompt line is stripped of surrounding whitespace.
    - Quoted values are JSON-unquoted. A value like "512x768" also gives "<Key>-1" = "512" and
      "<Key>-2" = "768" as strings, the way A1111 returns them (A1111 then drops "<Key>" itself;
      here it is kept so every written parameter reads back).
    - Keys the text lacks get PARSE_DEFAULTS (Clip skip "1", Schedule type "Automatic", ...).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    params_line = ""
    if len(parse_params_line(lines[-1])) >= 3:
        params_line = lines.pop()

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result: dict[str, Any] = {
        "Prompt": _join_lines(prompt_lines),
        "Negative prompt": _join_lines(negative_lines),
    }
    for key, raw_value in parse_params_line(params_line):
        if raw_value == "":
            continue  # A1111 skips a key with nothing after the colon
        value = unquote(raw_value)
        result[key] = value
        size = _SIZE_VALUE.fullmatch(value)
        if size:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)

    for key, default in PARSE_DEFAULTS.items():
        result.setdefault(key, default)
    return result


def _join_lines(lines: list[str]) -> str:
    # A1111 drops blank lines that come before any text, and keeps later ones.
    while lines and lines[0] == "":
        lines = lines[1:]
    return "\n".join(lines)


# --- infotext -> request fields --------------------------------------------------------------------


def to_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return int(number) if number.is_integer() else None


def to_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_bool(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


_INT_FIELDS = {
    "Steps": "steps",
    "Seed": "seed",
    "Size-1": "width",
    "Size-2": "height",
    "Variation seed": "subseed",
    "Seed resize from-1": "seed_resize_from_w",
    "Seed resize from-2": "seed_resize_from_h",
    "Hires steps": "hr_second_pass_steps",
    "Hires resize-1": "hr_resize_x",
    "Hires resize-2": "hr_resize_y",
}
_FLOAT_FIELDS = {
    "CFG scale": "cfg_scale",
    "Distilled CFG Scale": "distilled_cfg_scale",  # Forge's name (FLUX)
    "Variation seed strength": "subseed_strength",
    "Denoising strength": "denoising_strength",
    "Eta": "eta",
    "Hires upscale": "hr_scale",
    "Refiner switch at": "refiner_switch_at",
}
_TEXT_FIELDS = {
    "Prompt": "prompt",
    "Negative prompt": "negative_prompt",
    "Sampler": "sampler_name",
    "Schedule type": "scheduler",
    "Hires upscaler": "hr_upscaler",
    "Hires schedule type": "hr_scheduler",
    "Hires prompt": "hr_prompt",
    "Hires negative prompt": "hr_negative_prompt",
    "Refiner": "refiner_checkpoint",
}
# Infotext keys that A1111 applies as settings for one request (override_settings), not as fields.
_SETTING_FIELDS = {"Clip skip": "CLIP_stop_at_last_layers", "ENSD": "eta_noise_seed_delta"}
_FLOAT_SETTING_FIELDS = {"Eta DDIM": "eta_ddim", "Eta": "eta_ancestral", "Shift": "flow_shift"}  # Shift: FLUX/SD3


def infotext_to_txt2img_fields(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """A1111 txt2img request fields ("send to txt2img") from a parse_infotext result.

    Numbers are converted (a value that does not convert is left out rather than failing the
    paste). Sampler names are passed on as written; the request's sampler resolution maps legacy
    names like "DPM++ 2M Karras". Hires fix is enabled when the infotext has a denoising strength
    and a hires scale, upscaler or resize, as A1111's paste does. Clip skip, ENSD and the etas become
    `override_settings`, the way A1111 applies them. The model is not switched (A1111's default
    "do not change selected model when reading generation parameters").
    """
    fields: dict[str, Any] = {}
    for key, name in _TEXT_FIELDS.items():
        if key in parsed and parsed[key] is not None:
            fields[name] = str(parsed[key])
    for key, name in _INT_FIELDS.items():
        if key in parsed and (number := to_int(parsed[key])) is not None:
            fields[name] = number
    for key, name in _FLOAT_FIELDS.items():
        if key in parsed and (number := to_float(parsed[key])) is not None:
            fields[name] = number

    sampler = parsed.get("Hires sampler")
    if sampler and sampler != "Use same sampler":
        fields["hr_sampler_name"] = str(sampler)
    checkpoint = parsed.get("Hires checkpoint")
    if checkpoint and checkpoint != "Use same checkpoint":
        fields["hr_checkpoint_name"] = str(checkpoint)
    styles = parsed.get("Styles array")
    if styles:
        try:
            names = json.loads(styles) if isinstance(styles, str) else styles
        except ValueError:
            names = None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            fields["styles"] = names  # their text is still in the prompts: see StyleDatabase.extract
    if parsed.get("Face restoration"):
        fields["restore_faces"] = True
    if "Tiling" in parsed:
        fields["tiling"] = _to_bool(parsed["Tiling"])

    hires_given = (
        "Hires upscale" in parsed
        or "Hires upscaler" in parsed
        or bool(fields.get("hr_resize_x"))
        or bool(fields.get("hr_resize_y"))
    )
    fields["enable_hr"] = "Denoising strength" in parsed and hires_given

    settings: dict[str, Any] = {}
    for key, name in _SETTING_FIELDS.items():
        if key in parsed and (number := to_int(parsed[key])) is not None:
            settings[name] = number
    for key, name in _FLOAT_SETTING_FIELDS.items():
        if key in parsed and (number := to_float(parsed[key])) is not None:
            settings[name] = number
    if settings:
        fields["override_settings"] = settings
    return fields


# --- image files -----------------------------------------------------------------------------------


def encode_exif_user_comment(text: str) -> bytes:
    """EXIF UserComment bytes for `text`: the "UNICODE\\0" marker then UTF-16 big-endian (piexif's form)."""
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def decode_exif_user_comment(data: bytes | str) -> str:
    """Text of an EXIF UserComment value, whatever character code marker it carries.

    A1111 writes UTF-16 big-endian; some tools write UTF-16 in the file's byte order, so the byte
    order is chosen by where the zero bytes of ASCII characters fall.
    """
    if isinstance(data, str):
        return data
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16", errors="replace")
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        codec = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"
        return body[: len(body) // 2 * 2].decode(codec, errors="replace")
    if prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace").rstrip("\0")
    if prefix == _JIS_PREFIX:
        return body.decode("shift_jis", errors="replace").rstrip("\0")
    if prefix == b"\0" * 8:
        return body.decode("utf-8", errors="ignore").rstrip("\0")
    return data.decode("utf-8", errors="ignore").rstrip("\0")


def _text_info(image: Image.Image) -> dict[str, Any]:
    info = dict(image.info or {})
    # PNG text chunks after the image data only reach `.text`, which reads the whole file.
    text_chunks = getattr(image, "text", None)
    if isinstance(text_chunks, dict):
        for key, value in text_chunks.items():
            info.setdefault(key, value)
    return info


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        exif = image.getexif()
        raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a corrupt EXIF block must not stop reading the rest of the image info
        return None
    if not raw:
        return None
    text = decode_exif_user_comment(raw)
    return text or None


def read_image_infotext(image: Image.Image) -> str | None:
    """The infotext an image file carries, or None.

    Like A1111's read_info_from_image: a non-empty EXIF UserComment (JPEG, WebP) wins, then the
    PNG `parameters` text chunk, then a GIF comment.
    """
    comment = _exif_user_comment(image) if "exif" in (image.info or {}) else None
    if comment:
        return comment
    info = _text_info(image)
    parameters = info.get("parameters")
    if isinstance(parameters, str) and parameters:
        return str(parameters)
    gif_comment = info.get("comment")
    if isinstance(gif_comment, bytes):
        gif_comment = gif_comment.decode("utf-8", errors="ignore")
    if isinstance(gif_comment, str) and gif_comment:
        return gif_comment
    return None


def png_info_items(image: Image.Image) -> dict[str, str]:
    """/sdapi/v1/png-info `items`: the image's other text metadata, without `parameters` and format details."""
    items: dict[str, str] = {}
    for key, value in _text_info(image).items():
        if not isinstance(key, str) or key in _NON_TEXT_INFO_KEYS:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="ignore")
        if isinstance(value, str):
            items[key] = str(value)
    return items
