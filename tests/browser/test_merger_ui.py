"""The Checkpoint Merger tab in a real Chromium: pick A and B, merge, read where the checkpoint was saved, and find it
in the checkpoint box's choices without a refresh click; a merge without a model shows a notice."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, open_ui
from tests.browser.test_ui_details import strip
from tests.conftest import Server
from tests.integration.test_merge import make_models


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    models = make_models(tiny_models, tmp_path_factory.mktemp("merger-ui-models"))
    s = Server(["--models-dir", str(models), "--device", "cpu"], tmp_path_factory.mktemp("merger-ui-data"))
    yield s
    s.stop()


def open_merger(page: Page, server) -> None:
    open_ui(page, server)
    names = strip(page)  # A1111's place: right after PNG Info (extensions' tabs follow), before Settings
    assert names.index("PNG Info") + 1 == names.index("Checkpoint Merger") < names.index("Settings"), names
    page.locator("#tab_modelmerger-button").click()
    expect(page.locator("#modelmerger_merge")).to_be_visible()


def choose(page: Page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(option)


def test_a_merge_from_the_tab_is_listed_in_the_checkpoint_box(page, server, tmp_path):
    open_merger(page, server)
    choose(page, "modelmerger_primary_model_name", "tiny-sd15.safetensors")
    choose(page, "modelmerger_secondary_model_name", "tiny-b.safetensors")
    name = page.locator("#modelmerger_custom_name textarea, #modelmerger_custom_name input").first
    name.fill("ui-merge")
    page.locator("#modelmerger_merge").click()
    saved = page.locator("#modelmerger_saved")
    expect(saved).to_contain_text("Checkpoint saved to", timeout=GEN_TIMEOUT)
    expect(saved).to_contain_text("ui-merge.safetensors")
    page.screenshot(path=str(tmp_path / "merger-tab.png"), full_page=True)
    # the checkpoint box at the top lists the new model (the merge refreshed it)
    box = page.locator("#setting_sd_model_checkpoint input")
    box.click()
    options = page.locator("#setting_sd_model_checkpoint").get_by_role("option")
    expect(options.filter(has_text="ui-merge.safetensors")).to_have_count(1)
    page.keyboard.press("Escape")
    # and so do the merger's own model boxes
    page.locator("#modelmerger_primary_model_name input").click()
    expect(page.locator("#modelmerger_primary_model_name").get_by_role("option", name="ui-merge.safetensors",
                                                                        exact=True)).to_have_count(1)
    page.keyboard.press("Escape")
    assert not page.errors, page.errors


def test_a_merge_without_models_shows_a_notice(page, server):
    open_merger(page, server)
    page.locator("#modelmerger_merge").click()
    notice = page.locator("#modelmerger_error")
    expect(notice).to_contain_text("needs a primary model")
    expect(page.locator("#modelmerger_saved")).to_have_count(0)
