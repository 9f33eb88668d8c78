"""What a person sees while clicking around: tabs that keep their place, the checkpoint box, uploads that are not
images, sizes and errors, seed reuse, the live preview, layout, and icon buttons with names."""
from __future__ import annotations

import base64
import json
import re

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, infotext, open_ui, set_number, small
from tests.conftest import Server, copy_models

TABS = ["txt2img", "img2img", "Extras", "Caption", "VQA", "Image search", "Train", "PNG Info", "Checkpoint Merger", "Settings", "Extensions"]
# one element each tab shows, to know the content that came with the label
TAB_CONTENT = {"txt2img": "#txt2img_prompt", "img2img": "#img2img_prompt", "Extras": "#extras_generate",
               "Caption": "#caption_run",
               "VQA": "#vqa_ask", "Image search": "#search_run", "Train": "#train_lora_start",
               "PNG Info": "#pnginfo_image", "Checkpoint Merger": "#modelmerger_merge",
               "Settings": "#settings_submit", "Extensions": "#extensions_apply"}


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


def strip(page: Page) -> list[str]:
    return [t.inner_text().strip() for t in page.locator("#tabs > div > button[role=tab], "
                                                         "#tabs > .tab-wrapper button[role=tab]").all()]


TAB_IDS = {"txt2img": "tab_txt2img", "img2img": "tab_img2img", "Extras": "tab_extras", "Caption": "tab_caption",
           "VQA": "tab_vqa",
           "Image search": "tab_search", "Train": "tab_train", "PNG Info": "tab_pnginfo",
           "Checkpoint Merger": "tab_modelmerger", "Settings": "tab_settings", "Extensions": "tab_extensions"}


def top_tab(page: Page, name: str):
    return page.locator(f"#{TAB_IDS[name]}-button")


def test_tabs_keep_their_label_place_and_content_in_any_order(page, server):
    open_ui(page, server)
    assert strip(page) == TABS
    for order in (TABS[2:5] + TABS[5:] + TABS[:2], list(reversed(TABS)), ["VQA", "Caption", "Settings", "Image search",
                                                                          "Train", "PNG Info", "img2img", "Train",
                                                                          "VQA", "txt2img"]):
        for name in order:
            top_tab(page, name).click()
            expect(top_tab(page, name)).to_have_attribute("aria-selected", "true")
            expect(page.locator(TAB_CONTENT[name]).first).to_be_visible()
            assert strip(page) == TABS, (name, strip(page))
    for elem_id in ("tab_caption", "tab_vqa", "tab_search", "tab_pnginfo", "tab_settings"):
        assert page.locator(f"#{elem_id}-button").count() <= 1


def test_switching_to_an_unhashed_checkpoint_keeps_its_title_in_the_box(page, tiny_models, tmp_path):
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors", "tiny-sdxl.safetensors"])
    srv = Server(["--models-dir", str(models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        box = page.locator("#setting_sd_model_checkpoint input")
        expect(box).to_have_value("tiny-sd15.safetensors")  # not hashed yet: the bare name, as A1111 shows it
        box.click()
        page.locator("#setting_sd_model_checkpoint").get_by_role("option", name="tiny-sdxl.safetensors").click()
        # loading hashes the file: the box shows the new title, which is one of its choices
        expect(box).to_have_value(re.compile(r"^tiny-sdxl\.safetensors \[[0-9a-f]{10}\]$"), timeout=GEN_TIMEOUT)
        box.click()
        options = page.locator("#setting_sd_model_checkpoint").get_by_role("option")
        expect(options.filter(has_text="tiny-sdxl.safetensors [")).to_have_count(1)  # the value is a choice
        page.keyboard.press("Escape")
        assert "not in the list of choices" not in srv.log()
    finally:
        srv.stop()


def test_a_file_that_is_not_an_image_gets_one_short_message(page, server, tmp_path):
    """PNG Info: a text file named .png gives "not an image: NAME" and no stale parameters; img2img refuses it
    at upload; no message shows component lists, server paths or exception names."""
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a real picture", "steps": 2, "width": 64,
                                                               "height": 64}, timeout=120)
    real = tmp_path / "real.png"
    real.write_bytes(base64.b64decode(r.json()["images"][0]))
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    open_ui(page, server)
    top_tab(page, "PNG Info").click()
    upload = page.locator("#pnginfo_image input[type=file]")
    upload.set_input_files(str(real))
    expect(page.locator("#pnginfo_html")).to_contain_text("a real picture", timeout=GEN_TIMEOUT)
    upload.set_input_files(str(fake))  # dropped over the first one
    html_box = page.locator("#pnginfo_html")
    expect(html_box).to_have_text("not an image: fake.png", timeout=GEN_TIMEOUT)
    expect(html_box).not_to_contain_text("a real picture")
    page.click("#pnginfo_send_txt2img")  # nothing of the previous image is left to send
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("")

    top_tab(page, "img2img").click()
    page.locator("#img2img_image input[type=file]").set_input_files(str(fake))
    expect(page.locator("#img2img_error")).to_have_text("not an image: fake.png", timeout=GEN_TIMEOUT)
    expect(page.locator("#img2img_image img")).to_have_count(0)  # cleared, no broken picture
    page.click("#img2img_generate")
    expect(page.locator("#img2img_error")).to_contain_text("No image", timeout=GEN_TIMEOUT)
    toasts = " ".join(t.inner_text() for t in page.locator(".toast-body, [data-testid='toast-body']").all())
    page_text = page.locator("body").inner_text()
    for leak in ("Could not preprocess", "UnidentifiedImageError", "/tmp/", "gradio"):
        assert leak not in toasts and leak not in page_text, leak


def test_typed_sizes_snap_and_an_error_keeps_the_last_result(page, server):
    open_ui(page, server)
    box = page.locator("#txt2img_width input[type=number]")
    box.fill("100")
    box.press("Enter")
    expect(box).to_have_value("104")  # the slider's step of 8, as dragging gives
    small(page, steps=2)
    page.locator("#txt2img_prompt textarea").fill("a good one")
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img")
    expect(info).to_contain_text("a good one\nSteps: 2", timeout=GEN_TIMEOUT)
    # a request the server refuses: hires fix beyond the largest size
    set_number(page, "txt2img_width", 1024)
    page.locator("#txt2img_hr").get_by_text("Hires. fix").click()
    page.locator("#txt2img_enable_hr input").check()
    set_number(page, "txt2img_hr_scale", 4)
    page.locator("#txt2img_prompt textarea").fill("too big")
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_error")).to_contain_text("hires size 4096x256", timeout=GEN_TIMEOUT)
    expect(info).to_contain_text("a good one\nSteps: 2")  # the last result stays, with its infotext
    expect(page.locator("#txt2img_gallery img")).to_have_count(1)
    expect(page.locator("#txt2img_gallery")).not_to_contain_text("Error")
    expect(info).not_to_contain_text("Error")


def test_reuse_seed_takes_the_selected_image(page, server):
    open_ui(page, server)
    small(page, steps=2, batch_count=2)
    set_number(page, "txt2img_batch_size", 2)
    page.locator("#txt2img_seed input").fill("1234")
    page.click("#txt2img_generate")
    gallery = page.locator("#txt2img_gallery")
    expect(gallery.locator("img")).to_have_count(5, timeout=GEN_TIMEOUT)  # a grid, then seeds 1234..1237
    gallery.locator("button.thumbnail-item, .thumbnail-item").nth(4).click()
    expect(page.locator("#html_info_txt2img")).to_contain_text("Seed: 1237")
    page.locator("#txt2img_reuse_seed").click()
    expect(page.locator("#txt2img_seed input")).to_have_value("1237")


def test_live_preview_shows_over_the_gallery_at_the_result_size(page, server):
    open_ui(page, server)
    small(page, steps=150, batch_count=3)
    page.locator("#txt2img_prompt textarea").fill("a long job")
    page.click("#txt2img_generate")
    preview = page.locator("#txt2img_preview img")
    expect(preview).to_be_visible(timeout=GEN_TIMEOUT)
    block = page.locator("#txt2img_preview").bounding_box()
    shown, gallery = preview.bounding_box(), page.locator("#txt2img_gallery").bounding_box()
    # it covers the gallery's box (where the result will appear), not a thumbnail beside it
    assert abs(block["width"] - gallery["width"]) < 40 and abs(block["y"] - gallery["y"]) < 40, (block, gallery)
    assert shown["height"] > 0.9 * gallery["height"], (shown, gallery)
    # the preview's src changes with every step: wait for one that has finished decoding
    natural = page.wait_for_function(
        "() => { const i = document.querySelector('#txt2img_preview img');"
        " return i && i.complete && i.naturalWidth > 0 && [i.naturalWidth, i.naturalHeight]; }",
        timeout=GEN_TIMEOUT,
    ).json_value()
    assert natural == [64, 64]  # the cheap latent preview (8x8), upscaled to the result's size
    page.click("#txt2img_interrupt")
    expect(page.locator("#txt2img_preview")).to_be_hidden(timeout=GEN_TIMEOUT)


def test_layout_fits_its_boxes(page, server, tmp_path):
    open_ui(page, server)
    for slider in ("txt2img_batch_count", "txt2img_batch_size"):
        block = page.locator(f"#{slider}").bounding_box()
        track = page.locator(f"#{slider} input[type=range]").bounding_box()
        assert track["x"] + track["width"] <= block["x"] + block["width"] + 1, slider
        expect(page.locator(f"#{slider}")).to_contain_text("100" if slider.endswith("count") else "8")
    page.click("#txt2img_style_edit")
    editor = page.locator("#txt2img_style_editor").bounding_box()
    prompt = page.locator("#txt2img_prompt").bounding_box()
    assert editor["width"] > prompt["width"] * 0.9  # the editor spans the tab, not the narrow side column
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64}, timeout=120)
    path = tmp_path / "small.png"
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    top_tab(page, "PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    expect(page.locator("#pnginfo_html")).to_contain_text("parameters", timeout=GEN_TIMEOUT)
    assert page.locator("#pnginfo_image").bounding_box()["height"] > 300  # does not collapse after a drop


def test_icon_buttons_have_names_tooltips_and_font_free_icons(page, server):
    open_ui(page, server)
    for elem_id, name in [("txt2img_random_seed", "Random seed"), ("txt2img_reuse_seed", "Reuse the seed"),
                          ("txt2img_style_apply", "Apply the selected styles"), ("refresh_sd_model_checkpoint",
                                                                                   "Rescan the model folders")]:
        button = page.locator(f"#{elem_id}")
        expect(button).to_have_attribute("title", re.compile("^" + re.escape(name)))
        expect(page.get_by_role("button", name=re.compile("^" + re.escape(name))).first).to_be_visible()
        expect(button.locator("img")).to_have_count(1)  # an SVG picture, not an emoji glyph
        assert not re.search("[\U0001F300-\U0001FAFF]", button.inner_text())


def test_pasting_an_infotext_selects_its_styles_and_takes_their_text_out(page, tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "styles.csv").write_text('name,prompt,negative_prompt\nmystyle,"oil painting, warm light",ugly\n')
    srv = Server(["--api", "--models-dir", str(tiny_models)], data)
    try:
        r = requests.post(srv.url + "/sdapi/v1/txt2img", json={"prompt": "a fox", "negative_prompt": "blurry",
                                                               "styles": ["mystyle"], "steps": 2, "width": 64,
                                                               "height": 64}, timeout=120)
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert text.startswith("a fox, oil painting, warm light\nNegative prompt: blurry, ugly")
        assert 'Styles array: "[\\"mystyle\\"]"' in text or 'Styles array: ["mystyle"]' in text
        path = tmp_path / "fox.png"
        path.write_bytes(base64.b64decode(r.json()["images"][0]))
        open_ui(page, srv)
        top_tab(page, "PNG Info").click()
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
        expect(page.locator("#pnginfo_html")).to_contain_text("a fox", timeout=GEN_TIMEOUT)
        page.click("#pnginfo_send_txt2img")
        expect(page.locator("#txt2img_prompt textarea")).to_have_value("a fox")
        expect(page.locator("#txt2img_neg_prompt textarea")).to_have_value("blurry")
        expect(page.locator("#txt2img_styles .token")).to_contain_text("mystyle")
        small(page, steps=2)
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img")).to_contain_text("a fox, oil painting, warm light\n",
                                                                  timeout=GEN_TIMEOUT)
        assert "oil painting, warm light, oil painting" not in infotext(page)  # applied once, not twice
    finally:
        srv.stop()


def test_vqa_model_box_is_labelled_model(page, server):
    open_ui(page, server)
    top_tab(page, "VQA").click()
    expect(page.locator("#vqa_model")).to_contain_text("Model")
    expect(page.locator("#vqa_model")).not_to_contain_text("Captioner")
