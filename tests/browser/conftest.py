"""Fixtures of the browser tests: a headless Chromium (Debian's `chromium`, driven by
Playwright), a real `hub console`, a hub and a worker; a screenshot of the page
whenever a test fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from hub.settings import Settings
from tests.support.console import ConsoleProcess
from tests.support.processes import ROOT, make_test_settings

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Where failing tests leave a screenshot of the page.
FAILURES = ROOT / "test-artifacts" / "browser"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: `apt-get install -y chromium` "
            "(scripts/test does it), or set CHROMIUM to its path",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def console_settings(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, database_url: str
) -> Settings:
    return make_test_settings(
        tmp_path_factory.mktemp("browser-console"),
        broker_url=rabbitmq_url,
        database_url=database_url,
    )


@pytest.fixture(scope="module")
def console(console_settings: Settings) -> Iterator[ConsoleProcess]:
    process = ConsoleProcess(console_settings, console_settings.data_dir / "console.log")
    yield process
    process.stop()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        FAILURES.mkdir(parents=True, exist_ok=True)
        path = FAILURES / f"{request.node.name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failing page: {path}")
    context.close()
