"""The Train tab in a real Chromium: a dataset preview, a tiny LoRA run started from the form, its loss plot
growing, and its card appearing in txt2img's extra-networks panel when it ends; bad input shows a notice."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.browser.test_extra_networks_ui import open_panel
from tests.browser.test_ui import open_ui
from tests.conftest import Server
from tests.integration.test_training import make_dataset


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("train-ui-data")
    s = Server(["--models-dir", str(tiny_models), "--device", "cpu"], data)
    yield s
    s.stop()


def fill(page: Page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def open_train(page: Page, server) -> None:
    open_ui(page, server)
    page.locator("button[role='tab']", has_text="Train").first.click()
    expect(page.locator("#train_lora_start")).to_be_visible()


def test_a_lora_run_from_the_train_tab(page, server, tmp_path):
    data = make_dataset(tmp_path / "data")
    open_train(page, server)
    fill(page, "train_lora_train_data_dir", data)
    fill(page, "train_lora_output_name", "ui-cube")
    fill(page, "train_lora_max_train_steps", 30)
    fill(page, "train_lora_resolution", 64)
    fill(page, "train_lora_learning_rate", 0.01)
    page.locator("#train_lora_preview").click()
    summary = page.locator("#train_preview_summary")
    expect(summary).to_contain_text("3 images (6 with repeats")
    expect(summary).to_contain_text("30 steps")
    expect(page.locator("#train_preview img")).to_have_count(3)
    page.locator("#train_lora_start").click()
    status = page.locator("#train_status_text")
    expect(status).to_contain_text("ui-cube", timeout=60_000)
    expect(status).to_contain_text("loss", timeout=120_000)
    expect(status.locator(".train-state")).to_have_text("done", timeout=300_000)
    expect(status).to_contain_text("step 30/30")
    # the plot draws both lines: the smoothed one in its orange
    plot = page.locator("#train_loss_plot")
    expect(plot.locator("canvas, svg").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(1000)  # the plot's own transition
    pixels = np.asarray(Image.open(io.BytesIO(plot.screenshot())).convert("RGB")).astype(int)
    orange = (np.abs(pixels - [255, 127, 14]).sum(axis=2) < 60).sum()
    blue = (np.abs(pixels - [31, 119, 180]).sum(axis=2) < 60).sum()
    assert orange > 40 and blue > 40, (orange, blue)
    page.screenshot(path=str(tmp_path / "train-tab.png"), full_page=True)
    # the LoRA's card is in txt2img's panel without a reload or a refresh click
    page.locator("button[role='tab']", has_text="txt2img").first.click()
    cards = open_panel(page)
    expect(cards.locator(".extra-card[data-name='ui-cube']")).to_be_visible(timeout=30_000)
    assert not page.errors, page.errors


def test_bad_input_shows_a_notice(page, server, tmp_path):
    open_train(page, server)
    fill(page, "train_lora_train_data_dir", tmp_path / "missing")
    fill(page, "train_lora_output_name", "x")
    fill(page, "train_lora_max_train_steps", 3)
    page.locator("#train_lora_start").click()
    expect(page.locator("#train_notice")).to_contain_text("does not exist")
    expect(page.locator("#train_notice")).not_to_contain_text("Traceback")
