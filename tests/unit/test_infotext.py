"""Infotext is written in A1111's layout and parses back exactly, by A1111's rules."""
from __future__ import annotations

import io

import pytest
from PIL import ExifTags, Image, PngImagePlugin

from modules.core import infotext
from modules.core.infotext import (
    create_infotext,
    infotext_to_txt2img_fields,
    parse_infotext,
)

BASE_PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1234567890,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Version": "v1.10.1",
}

TRICKY_PROMPTS = [
    "a cat sitting on a mat",
    "a cat, sitting: on a mat",
    'a "quoted" prompt, with \\"escapes\\"',
    "line one\nline two\n\nline four after a blank line",
    "unicode ✓ 日本語 émoji 🐱, ok",
    "prompt ending in a colon:",
    "(masterpiece:1.2), [from:to:0.5], [a|b], <lora:detail_v2:0.8>, BREAK second chunk",
    "Steps: 5, Sampler: fake, Seed: 1\nstill the prompt",
    "literal backslash-n \\n and tab\tinside",
    "",
    "a, b, c: d, e: f, g: h",  # looks like params, but the real params line follows
    "{}[]()<>|\\/'`~!@#$%^&*_+=;?",
]

TRICKY_NEGATIVES = [
    "",
    "ugly, blurry",
    "bad anatomy\nworse hands, extra: fingers",
    "日本語のネガティブ",
    "ends with colon:",
]

TRICKY_EXTRA_PARAMS = [
    {},
    {"Lora hashes": "detail_v2: 0123456789ab, other: ba9876543210", "TI hashes": "easyneg: abcdef012345"},
    {"Hires upscale": 2, "Hires steps": 10, "Hires upscaler": "R-ESRGAN 4x+", "Denoising strength": 0.45},
    {"Quote start": '"quoted" value', "Inner quote": 'say "hi"', "Backslash": "C:\\models\\x.safetensors"},
    {"Multi line": "first\nsecond", "Padded": "  spaced  ", "Unicode value": "naïve, café: ✓"},
    {"Emphasis": "No norm", "Clip skip": 2, "ENSD": 31337, "Seed resize from": "-1x-1"},
    {"JSON-ish": '{"a": [1, 2], "b": "c"}', "Slash/key": "a/b", "Dash-key": "x-y"},
]


def _cases():
    for i, prompt in enumerate(TRICKY_PROMPTS):
        for j, negative in enumerate(TRICKY_NEGATIVES):
            extra = TRICKY_EXTRA_PARAMS[(i + j) % len(TRICKY_EXTRA_PARAMS)]
            yield pytest.param(prompt, negative, {**BASE_PARAMS, **extra}, id=f"p{i}-n{j}")


@pytest.mark.parametrize(("prompt", "negative", "params"), list(_cases()))
def test_round_trip_is_exact(prompt, negative, params):
    text = create_infotext(prompt, negative, params)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    for key, value in params.items():
        assert parsed[key] == str(value), key


def test_layout_matches_the_contract():
    text = create_infotext("a cat\non two lines", "ugly", BASE_PARAMS)
    assert text == (
        "a cat\non two lines\n"
        "Negative prompt: ugly\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234567890, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )


def test_fixed_key_order_then_extras_in_given_order_then_version():
    params = {
        "Version": "v1",
        "Lora hashes": "x: 1",
        "Clip skip": 2,
        "Seed": 5,
        "Emphasis": "Original",
        "Steps": 3,
        "Denoising strength": 0.5,
        "VAE": "vae.pt",
        "Sampler": "Euler",
        "Face restoration": "CodeFormer",
        "Image CFG scale": 1.5,
    }
    line = create_infotext("p", "", params).split("\n")[-1]
    keys = [pair.split(":")[0] for pair in line.split(", ") if ":" in pair and not pair.startswith(" ")]
    assert keys == [
        "Steps", "Sampler", "Image CFG scale", "Seed", "Face restoration", "VAE", "Denoising strength",
        "Clip skip", "Lora hashes", "Emphasis", "Version",
    ]


def test_empty_values_and_clip_skip_one_are_left_out():
    text = create_infotext("p", "", {**BASE_PARAMS, "VAE": None, "Model": "", "Clip skip": 1, "Tiling": None})
    assert "VAE" not in text and "Model:" not in text and "Clip skip" not in text and "Tiling" not in text
    assert "Clip skip: 2" in create_infotext("p", "", {**BASE_PARAMS, "Clip skip": 2})


def test_negative_line_left_out_when_empty_and_empty_prompt_has_no_blank_line():
    assert "Negative prompt" not in create_infotext("p", "", BASE_PARAMS)
    text = create_infotext("", "bad", BASE_PARAMS)
    assert text.startswith("Negative prompt: bad\nSteps: 20")
    assert create_infotext("", "", BASE_PARAMS).startswith("Steps: 20")


def test_values_with_separators_are_json_quoted():
    text = create_infotext("p", "", {**BASE_PARAMS, "Lora hashes": "a: 1, b: 2", "Note": "x\ny"})
    assert 'Lora hashes: "a: 1, b: 2"' in text
    assert 'Note: "x\\ny"' in text
    assert "Sampler: DPM++ 2M," in text  # plain values stay bare


def test_size_tuples_are_written_as_wxh():
    text = create_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Size": (640, 480), "Seed": 1})
    assert "Size: 640x480" in text


def test_parse_an_a1111_infotext():
    text = (
        "masterpiece, best quality, 1girl, (smile:1.1)\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 2792445015, "
        "Size: 512x768, Model hash: 6ce0161689, Model: anything, Denoising strength: 0.5, Clip skip: 2, "
        'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "masterpiece, best quality, 1girl, (smile:1.1)"
    assert parsed["Negative prompt"] == "lowres, bad anatomy"
    assert parsed["Steps"] == "28"
    assert parsed["Sampler"] == "Euler a"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768" and parsed["Size"] == "512x768"
    assert parsed["Clip skip"] == "2"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert list(parsed)[:3] == ["Prompt", "Negative prompt", "Steps"]


def test_missing_keys_get_a1111s_defaults():
    parsed = parse_infotext("a prompt\nSteps: 20, Sampler: Euler, Seed: 1")
    assert parsed["Clip skip"] == "1"
    assert parsed["Schedule type"] == "Automatic"
    assert parsed["Hires sampler"] == "Use same sampler"
    assert parsed["Hires resize-1"] == 0 and parsed["Hires resize-2"] == 0
    assert parsed["Masked area padding"] == 32
    assert parsed["RNG"] == "GPU"
    assert parsed["Negative prompt"] == ""


def test_a_last_line_with_fewer_than_three_pairs_is_prompt():
    parsed = parse_infotext("first line\nSteps: 20, Seed: 5")
    assert parsed["Prompt"] == "first line\nSteps: 20, Seed: 5"
    assert "Steps" not in parsed
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"
    assert parse_infotext("")["Prompt"] == ""


def test_negative_prompt_may_span_lines_and_everything_after_belongs_to_it():
    text = "pos\nNegative prompt: neg one\nneg two\nSteps: 1, Sampler: Euler, Seed: 2"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "pos"
    assert parsed["Negative prompt"] == "neg one\nneg two"


def test_lines_are_stripped_like_a1111_and_crlf_is_accepted():
    text = "  padded prompt  \r\nNegative prompt:   neg  \r\nSteps: 1, Sampler: Euler, Seed: 2\r\n"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "padded prompt"
    assert parsed["Negative prompt"] == "neg"
    assert parsed["Seed"] == "2"


def test_quoted_values_unquote_and_bad_quotes_stay_raw():
    parsed = parse_infotext('p\nSteps: 1, Aa: "x, y", Bb: "unterminated, Cc: 3, Dd: 4')
    assert parsed["Aa"] == "x, y"
    assert parsed["Bb"] == '"unterminated'
    assert parsed["Cc"] == "3"


def test_empty_values_are_skipped_like_a1111():
    parsed = parse_infotext("p\nSteps: 1, Empty: , Sampler: Euler, Seed: 3")
    assert "Empty" not in parsed
    assert parsed["Sampler"] == "Euler"


def test_every_wxh_value_is_split():
    parsed = parse_infotext("p\nSteps: 1, Seed: 2, Hires resize: 1024x1536, Seed resize from: 640x480")
    assert parsed["Hires resize-1"] == "1024" and parsed["Hires resize-2"] == "1536"
    assert parsed["Seed resize from-1"] == "640" and parsed["Seed resize from-2"] == "480"


def test_quote_and_unquote_helpers():
    assert infotext.quote("plain") == "plain"
    assert infotext.quote("a,b") == '"a,b"'
    assert infotext.quote("ü: ✓") == '"ü: ✓"'  # not ASCII-escaped, as A1111 writes it
    assert infotext.unquote('"a\\"b"') == 'a"b'
    assert infotext.unquote('"') == '"'
    assert infotext.unquote('"1"') == "1"


def test_txt2img_fields_convert_types():
    text = create_infotext(
        "a cat",
        "dog",
        {
            **BASE_PARAMS,
            "Variation seed": 99,
            "Variation seed strength": 0.25,
            "Seed resize from": "640x480",
            "Denoising strength": 0.55,
            "Hires upscale": 1.5,
            "Hires steps": 12,
            "Hires upscaler": "Latent",
            "Hires sampler": "Euler",
            "Clip skip": 2,
            "ENSD": 31337,
            "Face restoration": "CodeFormer",
        },
    )
    fields = infotext_to_txt2img_fields(parse_infotext(text))
    assert fields["prompt"] == "a cat" and fields["negative_prompt"] == "dog"
    assert fields["steps"] == 20 and isinstance(fields["steps"], int)
    assert fields["cfg_scale"] == 7.0 and isinstance(fields["cfg_scale"], float)
    assert fields["seed"] == 1234567890
    assert (fields["width"], fields["height"]) == (512, 768)
    assert fields["sampler_name"] == "DPM++ 2M" and fields["scheduler"] == "Karras"
    assert fields["subseed"] == 99 and fields["subseed_strength"] == 0.25
    assert (fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (640, 480)
    assert fields["denoising_strength"] == 0.55
    assert fields["enable_hr"] is True
    assert fields["hr_scale"] == 1.5 and fields["hr_second_pass_steps"] == 12 and fields["hr_upscaler"] == "Latent"
    assert fields["hr_sampler_name"] == "Euler"
    assert fields["restore_faces"] is True
    assert fields["override_settings"] == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}


def test_txt2img_fields_without_hires_and_with_garbage_numbers():
    parsed = parse_infotext("p\nSteps: lots, Sampler: DPM++ 2M Karras, Seed: 12, CFG scale: high, Denoising strength: 0.7")
    fields = infotext_to_txt2img_fields(parsed)
    assert "steps" not in fields and "cfg_scale" not in fields
    assert fields["seed"] == 12
    assert fields["sampler_name"] == "DPM++ 2M Karras"
    assert fields["enable_hr"] is False  # a denoising strength alone is an img2img infotext
    assert "hr_sampler_name" not in fields
    assert fields["override_settings"] == {"CLIP_stop_at_last_layers": 1}


def test_a_flux_infotext_gives_distilled_cfg_and_the_shift_back():
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: Euler, CFG scale: 1.0, Seed: 5, Size: 1024x1024, "
                            "Model: flux1-dev, Distilled CFG Scale: 2.5, Shift: 3.0, Version: 0.1.0")
    fields = infotext_to_txt2img_fields(parsed)
    assert fields["distilled_cfg_scale"] == 2.5 and fields["cfg_scale"] == 1.0
    assert fields["override_settings"]["flow_shift"] == 3.0


def _png_with(text_chunks: dict[str, str]) -> Image.Image:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    buffer.seek(0)
    return Image.open(buffer)


def _jpeg_with_user_comment(comment: bytes) -> Image.Image:
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    return Image.open(buffer)


def test_read_png_parameters_and_items():
    image = _png_with({"parameters": "a cat\nSteps: 1, Sampler: Euler, Seed: 2", "Software": "test", "Title": "ü ✓"})
    assert infotext.read_image_infotext(image) == "a cat\nSteps: 1, Sampler: Euler, Seed: 2"
    assert infotext.png_info_items(image) == {"Software": "test", "Title": "ü ✓"}


def test_read_jpeg_user_comment_in_any_byte_order():
    text = "日本語, prompt: ✓\nSteps: 1, Sampler: Euler, Seed: 2"
    assert infotext.read_image_infotext(_jpeg_with_user_comment(infotext.encode_exif_user_comment(text))) == text
    little = b"UNICODE\0" + text.encode("utf-16-le")
    assert infotext.read_image_infotext(_jpeg_with_user_comment(little)) == text
    ascii_comment = b"ASCII\0\0\0" + b"plain prompt"
    assert infotext.read_image_infotext(_jpeg_with_user_comment(ascii_comment)) == "plain prompt"


def test_images_without_infotext_give_none():
    assert infotext.read_image_infotext(Image.new("RGB", (2, 2))) is None
    assert infotext.read_image_infotext(_png_with({"Software": "x"})) is None
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="JPEG")
    buffer.seek(0)
    jpeg = Image.open(buffer)
    assert infotext.read_image_infotext(jpeg) is None
    assert infotext.png_info_items(jpeg) == {}
