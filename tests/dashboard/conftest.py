"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a live `ringlet node`.

Every page is watched: a console error, an uncaught exception or a request to anything but the node fails
the test that caused it (`PageWatch.assert_clean`). Screenshots go to `test-artifacts/dashboard/`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.support.dashboard import DESKTOP, PHONE, DashboardPage, open_page
from tests.support.fake_api import FakeServer
from tests.support.fake_node import FakeNode
from tests.support.processes import LiveNode, start_node, stop_node

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


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


@pytest.fixture(scope="package")
def dashboard_build() -> None:
    """dashboard/build/, which a node serves when it exists as the node starts (or as its app is made)."""
    _ensure_dashboard_built()


# Package scope: Playwright's sync API keeps an event loop running in this thread while it is open, which other
# tests' asyncio.run() would trip over.
@pytest.fixture(scope="package")
def dashboard_node(dashboard_build: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """A node without instances (the tests create one from the UI), its catalog warmed up."""
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


@pytest.fixture
def dashboard(browser: Browser, dashboard_node: LiveNode) -> Iterator[DashboardPage[LiveNode]]:
    yield from open_page(browser, dashboard_node, DESKTOP)


@pytest.fixture
def phone_dashboard(browser: Browser, dashboard_node: LiveNode) -> Iterator[DashboardPage[LiveNode]]:
    yield from open_page(browser, dashboard_node, PHONE)


@pytest.fixture
def scripted_dashboard(browser: Browser, dashboard_build: None, fake_server: FakeServer,
                       node: FakeNode) -> Iterator[DashboardPage[FakeServer]]:
    """The page served by the API over a fake node (tests/support/fake_api.py): one ready instance of the embedded
    model whose answers the test scripts (`node.script`, `node.token_delay_s`), streamed over real HTTP."""
    yield from open_page(browser, fake_server, DESKTOP)
