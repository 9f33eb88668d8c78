"""The img2img tab in a real Chromium against a real `webui.py` server: inpainting a mask painted with the mouse,
"Send to img2img" from txt2img, the notice for bad input, and Interrogate."""
from __future__ import annotations

import datetime
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, open_ui, set_number, small
from tests.conftest import Server


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


@pytest.fixture
def red_blue(tmp_path):
    """A 64x64 PNG: left half red, right half blue."""
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))
    path = tmp_path / "red_blue.png"
    image.save(path)
    return path


def img2img_outputs(server) -> set:
    folder = server.data_dir / "outputs" / "img2img-images" / datetime.date.today().isoformat()
    return set(folder.glob("*.png")) if folder.exists() else set()


def open_img2img(page: Page, server, sub_tab: str = "img2img") -> None:
    open_ui(page, server)
    page.get_by_role("tab", name="img2img", exact=True).first.click()
    expect(page.locator("#img2img_prompt textarea")).to_be_visible()
    if sub_tab != "img2img":
        page.locator("#mode_img2img").get_by_role("tab", name=sub_tab, exact=True).click()


def paint_stroke(page: Page, editor: str, points: list[tuple[int, int]], image_size: int = 64) -> None:
    """Drag the mouse over the editor's canvas through `points` (image pixel coordinates)."""
    canvas = page.locator(f"#{editor} canvas").first
    expect(canvas).to_be_visible()
    page.locator(f"#{editor}").scroll_into_view_if_needed()  # mouse events only land inside the viewport
    zoom_text = page.locator(f"#{editor}").inner_text()
    zoom = float(re.search(r"(\d+)%", zoom_text).group(1)) / 100  # the editor shows the image at this zoom
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred on the canvas

    def screen(x, y):
        return cx + (x - image_size / 2) * zoom, cy + (y - image_size / 2) * zoom

    page.mouse.move(*screen(*points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*screen(*p), steps=8)
    page.mouse.up()


def test_inpaint_a_stroke_painted_with_the_mouse_keeps_the_rest_of_the_image(page, server, red_blue):
    open_img2img(page, server)
    page.locator("#img2img_image input[type=file]").set_input_files(str(red_blue))
    expect(page.locator("#img2img_image img")).to_be_visible()
    page.click("#img2img_copy_to_inpaint")  # "Copy image to: inpaint" switches to the inpaint tab
    expect(page.locator("#mode_img2img").get_by_role("tab", name="Inpaint", exact=True)) \
        .to_have_attribute("aria-selected", "true")
    expect(page.locator("#img2maskimg canvas").first).to_be_visible(timeout=GEN_TIMEOUT)
    expect(page.locator("#img2maskimg")).to_contain_text("%")  # the zoom shown once the image is on the canvas
    expect(page.locator("#img2img_mask_blur")).to_be_visible()  # the inpaint controls show in the inpaint tab
    expect(page.locator("#img2img_denoising_strength input[type=number]")).to_have_value("0.75")
    expect(page.locator("#img2img_mask_blur input[type=number]")).to_have_value("4")
    expect(page.locator("#img2img_inpaint_full_res_padding input[type=number]")).to_have_value("32")
    expect(page.locator("#img2img_inpainting_fill input[value=original]")).to_be_checked()
    set_number(page, "img2img_width", 64)
    set_number(page, "img2img_height", 64)
    set_number(page, "img2img_steps", 3)
    set_number(page, "img2img_denoising_strength", 1)
    page.locator("#img2img_prompt textarea").fill("a green square")
    paint_stroke(page, "img2maskimg", [(4, 2), (32, 2), (60, 2)])  # along the top edge
    before = img2img_outputs(server)
    page.click("#img2img_generate")
    expect(page.locator("#img2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
    info = page.locator("#html_info_img2img .infotext")
    expect(info).to_contain_text("Mask blur: 4")
    expect(info).to_contain_text("Denoising strength: 1")
    expect(page.locator("#img2img_error")).to_have_text("")
    new = sorted(img2img_outputs(server) - before)
    assert len(new) == 1, new
    original = np.asarray(Image.open(red_blue).convert("RGB")).astype(int)
    with Image.open(new[0]) as im:
        assert im.size == (64, 64)
        assert "a green square" in im.info["parameters"]
        out = np.asarray(im.convert("RGB")).astype(int)
    diff = np.abs(out - original).max(axis=2)
    changed_rows = (diff > 0).sum(axis=1)
    # far from the stroke (row 2, the editor's default brush is wide on a 64 px image) and its 4 px blur:
    # exactly the original's pixels
    assert diff[48:].max() == 0, changed_rows.tolist()
    # under the stroke the picture was repainted
    assert (diff[0:5, 6:58] > 0).mean() > 0.5, changed_rows.tolist()
    assert not page.errors, page.errors


def test_send_to_img2img_from_txt2img(page, server):
    open_ui(page, server)
    small(page, steps=2)
    page.locator("#txt2img_prompt textarea").fill("a small boat")
    page.locator("#txt2img_neg_prompt textarea").fill("storm")
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img .infotext")
    expect(info).to_contain_text("a small boat\n", timeout=GEN_TIMEOUT)
    seed = re.search(r"Seed: (\d+)", info.inner_text()).group(1)
    page.click("#txt2img_send_to_img2img")
    expect(page.get_by_role("tab", name="img2img", exact=True).first).to_have_attribute("aria-selected", "true")
    expect(page.locator("#img2img_prompt textarea")).to_have_value("a small boat")
    expect(page.locator("#img2img_neg_prompt textarea")).to_have_value("storm")
    expect(page.locator("#img2img_seed input")).to_have_value(seed)
    expect(page.locator("#img2img_width input[type=number]")).to_have_value("64")
    expect(page.locator("#img2img_height input[type=number]")).to_have_value("64")
    expect(page.locator("#img2img_image img")).to_be_visible()

    # and the sent image is what img2img works on
    set_number(page, "img2img_steps", 2)
    before = img2img_outputs(server)
    page.click("#img2img_generate")
    expect(page.locator("#html_info_img2img .infotext")).to_contain_text("a small boat\nNegative prompt: storm",
                                                                          timeout=GEN_TIMEOUT)
    assert len(img2img_outputs(server) - before) == 1

    # Send to inpaint puts the image on the inpaint canvas
    page.get_by_role("tab", name="txt2img", exact=True).click()
    page.click("#txt2img_send_to_inpaint")
    expect(page.locator("#mode_img2img").get_by_role("tab", name="Inpaint", exact=True)) \
        .to_have_attribute("aria-selected", "true")
    expect(page.locator("#img2maskimg canvas").first).to_be_visible()
    expect(page.locator("#img2img_mask_blur")).to_be_visible()
    assert not page.errors, page.errors


def test_generate_without_an_image_shows_a_notice(page, server):
    open_img2img(page, server)
    page.locator("#img2img_prompt textarea").fill("anything")
    page.click("#img2img_generate")
    expect(page.locator(".toast-body").first).to_contain_text("No image", timeout=GEN_TIMEOUT)
    expect(page.locator("#img2img_error")).to_contain_text("No image: upload an image")
    expect(page.locator("#img2img_gallery img")).to_have_count(0)
    # inpaint without a painted mask is refused too, with its own notice
    page.locator("#mode_img2img").get_by_role("tab", name="Inpaint", exact=True).click()
    page.click("#img2img_generate")
    expect(page.locator("#img2img_error")).to_contain_text("No image: upload an image in the inpaint tab first.")
    assert not page.errors, page.errors


def test_interrogate_fills_the_prompt(page, server, red_blue):
    open_img2img(page, server)
    page.locator("#img2img_image input[type=file]").set_input_files(str(red_blue))
    expect(page.locator("#img2img_image img")).to_be_visible()
    page.click("#img2img_interrogate")
    box = page.locator("#img2img_prompt textarea")
    expect(box).not_to_have_value("", timeout=GEN_TIMEOUT)
    assert len(box.input_value().split()) >= 2
    expect(page.locator("#img2img_error")).to_have_text("")


def test_interrogate_without_a_captioner_gives_a_notice(page, tiny_models, tmp_path, red_blue):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    srv = Server(["--models-dir", str(models)], tmp_path / "data")
    try:
        open_img2img(page, srv)
        page.locator("#img2img_image input[type=file]").set_input_files(str(red_blue))
        expect(page.locator("#img2img_image img")).to_be_visible()
        page.click("#img2img_interrogate")
        expect(page.locator("#img2img_error")).to_contain_text("No captioner installed", timeout=GEN_TIMEOUT)
        expect(page.locator(".toast-body").first).to_contain_text("No captioner")
        expect(page.locator("#img2img_prompt textarea")).to_have_value("")
        assert srv.alive(), srv.log()
    finally:
        page.close()
        srv.stop()
