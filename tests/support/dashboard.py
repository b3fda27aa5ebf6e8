"""A dashboard page in Chromium, watched: a console error, an uncaught exception or a request to anything but the
node fails the test that caused it (`PageWatch.assert_clean`). Screenshots go to `test-artifacts/dashboard/`.

The page comes from whatever serves the dashboard at `url`: a live `ringlet node`, or the API over a fake node
(tests/support/fake_api.py) where a test scripts the answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlparse

from playwright.sync_api import Browser, ConsoleMessage, Page, Request

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}


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


class Served(Protocol):
    """Something serving the dashboard and the API at `url`."""

    @property
    def url(self) -> str: ...


ServedBy = TypeVar("ServedBy", bound=Served)


@dataclass
class DashboardPage(Generic[ServedBy]):
    page: Page
    watch: PageWatch
    node: ServedBy

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


def open_page(browser: Browser, node: ServedBy, viewport: dict[str, int]) -> Iterator[DashboardPage[ServedBy]]:
    context = browser.new_context(viewport=viewport)
    watch = PageWatch()
    context.on("request", watch.on_request)
    page = context.new_page()
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.page_errors.append(str(error)))
    page.set_default_timeout(15_000)
    yield DashboardPage(page, watch, node)
    context.close()
