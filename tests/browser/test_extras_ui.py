"""The Extras tab in a real Chromium against a real `webui.py` server: upscale an uploaded image with Lanczos and
with the tiny ESRGAN model (the gallery shows an image of the asked size, saved to outputs/extras-images with
A1111's postprocessing infotext), a batch of uploaded files, and the notices for no image and an unknown
upscaler."""
from __future__ import annotations

import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, open_ui, set_number


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


@pytest.fixture
def picture(tmp_path):
    """A 48x32 PNG: a red square on blue."""
    image = Image.new("RGB", (48, 32), (0, 0, 255))
    image.paste((255, 0, 0), (8, 8, 24, 24))
    path = tmp_path / "picture.png"
    image.save(path)
    return path


def open_extras(page: Page, server) -> None:
    open_ui(page, server)
    page.locator("#tab_extras-button").click()
    expect(page.locator("#extras_generate")).to_be_visible()


def pick(page: Page, dropdown_id: str, option: str) -> None:
    page.keyboard.press("Escape")
    page.locator(f"#{dropdown_id} input").click()
    page.locator(f"#{dropdown_id}").get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{dropdown_id} input")).to_have_value(option)


def shown_sizes(page: Page, count: int = 1) -> list[list[int]]:
    images = page.locator("#extras_gallery img")
    expect(images).to_have_count(count, timeout=GEN_TIMEOUT)
    for i in range(count):  # loaded, so its natural size is the file's
        images.nth(i).evaluate("img => img.complete || new Promise(r => img.onload = r)")
    return [images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight]") for i in range(count)]


def extras_files(server) -> set:
    folder = server.data_dir / "outputs" / "extras-images"
    return set(folder.glob("*.png")) if folder.exists() else set()


def test_lanczos_scale_2_shows_and_saves_an_image_twice_the_size(page, server, picture):
    open_extras(page, server)
    before = extras_files(server)
    page.locator("#extras_image input[type=file]").set_input_files(str(picture))
    expect(page.locator("#extras_image img")).to_be_visible()
    pick(page, "extras_upscaler_1", "Lanczos")
    set_number(page, "extras_upscaling_resize", 2)
    page.click("#extras_generate")
    assert shown_sizes(page) == [[96, 64]]
    expect(page.locator("#html_info_extras")).to_contain_text(
        "Postprocess upscale by: 2, Postprocess upscaler: Lanczos")
    new = sorted(extras_files(server) - before)
    assert len(new) == 1 and new[0].name[:5].isdigit(), new
    with Image.open(new[0]) as saved:
        assert saved.size == (96, 64)
        assert saved.info["extras"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
        expected = Image.open(picture).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS)
        assert list(saved.convert("RGB").getdata()) == list(expected.getdata())
    assert not page.errors, page.errors


def test_the_tiny_esrgan_model_and_scale_to(page, server, picture):
    """A model upscaler from the list (models/ESRGAN), and "Scale to" with crop to fit."""
    open_extras(page, server)
    page.locator("#extras_image input[type=file]").set_input_files(str(picture))
    expect(page.locator("#extras_image img")).to_be_visible()
    pick(page, "extras_upscaler_1", "tiny-esrgan-4x")
    page.click("#extras_generate")  # Scale by 4, the default
    assert shown_sizes(page) == [[192, 128]]
    page.locator("#extras_resize_mode").get_by_role("tab", name="Scale to", exact=True).click()
    set_number(page, "extras_upscaling_resize_w", 128)
    set_number(page, "extras_upscaling_resize_h", 128)
    page.click("#extras_generate")
    expect(page.locator("#html_info_extras")).to_contain_text("Postprocess upscale to: 128x128", timeout=GEN_TIMEOUT)
    assert shown_sizes(page) == [[128, 128]]
    assert not page.errors, page.errors


def test_batch_process_upscales_every_file(page, server, picture, tmp_path):
    second = tmp_path / "second.png"
    Image.new("RGB", (16, 24), (0, 255, 0)).save(second)
    open_extras(page, server)
    page.locator("#mode_extras").get_by_role("tab", name="Batch Process", exact=True).click()
    page.locator("#extras_image_batch input[type=file]").set_input_files([str(picture), str(second)])
    expect(page.locator("#extras_image_batch").get_by_role("row")).to_have_count(2)
    pick(page, "extras_upscaler_1", "Nearest")
    set_number(page, "extras_upscaling_resize", 2)
    page.click("#extras_generate")
    assert sorted(shown_sizes(page, 2)) == [[32, 48], [96, 64]]
    assert {"picture.png", "second.png"} <= {p.name for p in extras_files(server)}  # batch files keep their names


def test_no_image_and_an_unknown_upscaler_show_notices(page, server, picture):
    open_extras(page, server)
    pick(page, "extras_upscaler_1", "Lanczos")
    page.click("#extras_generate")
    expect(page.locator(".toast-body").first).to_contain_text("No image", timeout=GEN_TIMEOUT)
    expect(page.locator("#extras_error")).to_contain_text("No image: upload an image")
    expect(page.locator("#extras_gallery img")).to_have_count(0)
    page.locator("#extras_image input[type=file]").set_input_files(str(picture))
    expect(page.locator("#extras_image img")).to_be_visible()
    box = page.locator("#extras_upscaler_1 input")  # a name typed in that no upscaler has
    box.fill("4x-UltraSharp")
    box.press("Enter")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.click("#extras_generate")
    expect(page.locator("#extras_error")).to_contain_text("unknown upscaler '4x-UltraSharp'", timeout=GEN_TIMEOUT)
    expect(page.locator("#extras_gallery img")).to_have_count(0)
    assert not page.errors, page.errors
