"""Browser fixtures: one headless Chromium per session, a fresh page per test, failures photographed.

A failing test that used `browser_page` leaves `test-artifacts/<test name>.png` (the page as it
was when the test failed); tests save their own screenshots there too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from nativelm.fsutil import atomic_write_bytes
from tests.e2e.browser import VIEWPORT, artifact_path, launch_chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """The system Chromium, headless, started once per test session."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page in a fresh browser context (no cookies or storage shared between tests)."""
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            try:
                atomic_write_bytes(artifact_path(request.node.nodeid), page.screenshot(full_page=True))
            except Exception as exc:  # noqa: BLE001 - a missing screenshot must not hide the failure
                print(f"could not save a failure screenshot: {exc}")
        context.close()
