"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live `ringlet node`.

Every page is watched: a console error, an uncaught exception or a request to anything but the node fails
the test that caused it (`PageWatch.assert_clean`). Screenshots go to `test-artifacts/dashboard/`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright

from tests.support.processes import LiveNode, start_node, stop_node

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboard"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}


def _ensure_dashboard_built() -> None:
    """The node serves dashboard/build/; build it the way scripts/setup.sh does when it is missing."""
    if (DASHBOARD / "build" / "index.html").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("dashboard/build/ is missing and npm is not installed: run scripts/setup.sh "
                    "(or apt-get install nodejs npm, then npm ci && npm run build in dashboard/)")
    if not (DASHBOARD / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DASHBOARD, check=True)
    subprocess.run([npm, "run", "build"], cwd=DASHBOARD, check=True)


# Package scope: Playwright's sync API keeps an event loop running in this thread while it is open, which other
# tests' asyncio.run() would trip over.
@pytest.fixture(scope="package")
def dashboard_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """A node without instances (the tests create one from the UI), its catalog warmed up."""
    _ensure_dashboard_built()
    node = start_node(tmp_path_factory.mktemp("dashboard-node"), "dash-node", "--no-default-instance")
    try:
        node.json("/models")  # the first catalog request imports torch; take that wait here, once
        yield node
    finally:
        code = stop_node(node)
    assert code == 0, f"the node exited with {code} on SIGTERM:\n{node.log()}"


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"no {CHROMIUM}: install Debian's Chromium (apt-get install chromium), or run "
                    "scripts/setup.sh --test; the tests never download a browser")
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@dataclass
class PageWatch:
    """What a page did that it must not: console errors, uncaught exceptions, requests off this machine."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url', '?')})")

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)
        parsed = urlparse(request.url)
        if parsed.scheme in ("data", "blob", "about"):
            return
        if parsed.hostname not in LOCAL_HOSTS:
            self.foreign_requests.append(request.url)

    def assert_clean(self) -> None:
        assert not self.page_errors, f"uncaught exceptions in the page: {self.page_errors}"
        assert not self.console_errors, f"console errors: {self.console_errors}"
        assert not self.foreign_requests, f"requests to hosts other than the node: {self.foreign_requests}"


@dataclass
class DashboardPage:
    page: Page
    watch: PageWatch
    node: LiveNode

    def open(self, view: str) -> None:
        self.page.goto(f"{self.node.url}/#{view}")
        self.page.get_by_test_id("connection").filter(has_text="live").wait_for()

    def show(self, view: str) -> None:
        self.page.get_by_test_id(f"nav-{view}").click()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _open_page(browser: Browser, node: LiveNode, viewport: dict[str, int]) -> Iterator[DashboardPage]:
    context = browser.new_context(viewport=viewport)
    watch = PageWatch()
    context.on("request", watch.on_request)
    page = context.new_page()
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.page_errors.append(str(error)))
    page.set_default_timeout(15_000)
    yield DashboardPage(page, watch, node)
    context.close()


@pytest.fixture
def dashboard(browser: Browser, dashboard_node: LiveNode) -> Iterator[DashboardPage]:
    yield from _open_page(browser, dashboard_node, DESKTOP)


@pytest.fixture
def phone_dashboard(browser: Browser, dashboard_node: LiveNode) -> Iterator[DashboardPage]:
    yield from _open_page(browser, dashboard_node, PHONE)
