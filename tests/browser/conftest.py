"""Browser fixtures: one real Chromium per run (Playwright's sync API), a fresh context and page per test."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Playwright's own browser download does not work here; use the system one
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


# Assertions wait up to 20 s (Playwright's default is 5): the page has many tabs and a busy 2-core machine can take
# longer than 5 s to build it. Nothing here measures time; a slow page only waits longer.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no shared storage) and page; browser-side errors are collected on `page.errors`."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()
