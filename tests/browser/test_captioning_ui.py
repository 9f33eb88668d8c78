"""The Caption and VQA tabs in a real Chromium against a real server over the tiny BLIP-2 models."""
from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

JOB_TIMEOUT = 60_000  # ms: the first caption loads the tiny model (about a second)


@pytest.fixture
def server(api_server):
    return api_server


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray((np.random.RandomState(5).rand(40, 48, 3) * 255).astype("uint8")).save(path)
    return path


def open_tab(page: Page, server, name: str) -> None:
    page.goto(server.url)
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()
    page.get_by_role("tab", name=name, exact=True).click()


def test_caption_tab_captions_copies_and_sends_to_txt2img(page, server, api, image_file):
    open_tab(page, server, "Caption")
    # no image yet: a visible notice, no job
    page.locator("#caption_run").click()
    expect(page.locator("#caption_error")).to_contain_text("No image")
    page.locator("#caption_image input[type=file]").set_input_files(str(image_file))
    page.locator("#caption_run").click()
    output = page.locator("#caption_output textarea")
    expect(output).not_to_have_value("", timeout=JOB_TIMEOUT)
    caption = output.input_value()
    assert caption.startswith("a photo of")  # the default style continues "a photo of"
    expect(page.locator("#caption_error")).to_have_text("")
    # the UI's caption is the API's caption for the same image and settings; both default to the same
    # captioner (BLIP v1 first: tiny-blip), which the API names "clip"
    b64 = base64.b64encode(image_file.read_bytes()).decode()
    r = api.post(api.base + "/interrogate", json={"image": b64, "model": "clip", "prompt": "a photo of"})
    assert r.status_code == 200 and r.json()["caption"] == caption, r.text
    expect(page.locator("#caption_output button[aria-label*='opy'], #caption_output button[title*='opy']").first) \
        .to_be_visible()
    page.locator("#caption_send_txt2img").click()
    expect(page.get_by_role("tab", name="txt2img", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator("#txt2img_prompt textarea")).to_have_value(caption)
    assert not page.errors, page.errors


def test_custom_style_shows_the_prompt_box(page, server, image_file):
    open_tab(page, server, "Caption")
    expect(page.locator("#caption_prompt")).to_be_hidden()
    page.locator("#caption_style").get_by_label("custom").check()
    expect(page.locator("#caption_prompt textarea")).to_be_visible()
    page.locator("#caption_prompt textarea").fill("a drawing of")
    page.locator("#caption_image input[type=file]").set_input_files(str(image_file))
    page.locator("#caption_run").click()
    output = page.locator("#caption_output textarea")
    expect(output).to_have_value(__import__("re").compile(r"^a drawing of"), timeout=JOB_TIMEOUT)


def test_vqa_tab_keeps_a_conversation_and_clears_it(page, server, image_file):
    open_tab(page, server, "VQA")
    question = page.locator("#vqa_question textarea")
    question.fill("what is it?")
    page.locator("#vqa_ask").click()
    expect(page.locator("#vqa_error")).to_contain_text("No image")
    page.locator("#vqa_image input[type=file]").set_input_files(str(image_file))
    expect(page.locator("#vqa_image img")).to_be_visible()
    question.fill("what is it?")
    page.locator("#vqa_ask").click()
    chat = page.locator("#vqa_chat")
    expect(chat).to_contain_text("what is it?", timeout=JOB_TIMEOUT)
    expect(question).to_have_value("")
    question.fill("and where?")
    question.press("Enter")
    expect(chat).to_contain_text("and where?", timeout=JOB_TIMEOUT)
    expect(chat.locator(".message-row, [data-testid='user'], [data-testid='bot']").first).to_be_visible()
    text = chat.inner_text()
    assert text.index("what is it?") < text.index("and where?")
    page.locator("#vqa_clear").click()
    expect(chat).not_to_contain_text("what is it?")
    assert not page.errors, page.errors
