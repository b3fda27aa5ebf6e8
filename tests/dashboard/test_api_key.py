"""The dashboard of a node started with --api-key: it asks for the key once (however many calls were refused at
the same time), keeps it in the browser, and then works as usual; without it, it says what is wrong."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Dialog

from tests.support.dashboard import DESKTOP, DashboardPage, open_page
from tests.support.processes import LiveNode, start_node, stop_node

KEY = "dashboard-test-key"
REFUSED = "the server responded with a status of 401"  # Chromium's console line for each refused call


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    node = start_node(tmp_path_factory.mktemp("keyed-node"), "keyed-node", "--no-default-instance", "--api-key", KEY)
    try:
        yield node
    finally:
        stop_node(node)


@pytest.fixture
def keyed_dashboard(browser: Browser, keyed_node: LiveNode) -> Iterator[DashboardPage]:
    yield from open_page(browser, keyed_node, DESKTOP)


def test_the_dashboard_asks_for_the_key_once_and_keeps_it(keyed_dashboard: DashboardPage) -> None:
    page, asked = keyed_dashboard.page, []

    def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(KEY)

    page.on("dialog", answer)
    keyed_dashboard.open("cluster")
    assert len(asked) == 1 and "API key" in asked[0]
    page.get_by_text("keyed-node").first.wait_for()
    page.reload()
    page.get_by_test_id("connection").filter(has_text="live").wait_for()
    assert len(asked) == 1, "the key is kept in the browser"
    watch = keyed_dashboard.watch
    watch.console_errors = [e for e in watch.console_errors if REFUSED not in e]  # the calls before the key
    watch.assert_clean()


def test_a_dismissed_prompt_leaves_the_refusal_visible(keyed_dashboard: DashboardPage) -> None:
    page = keyed_dashboard.page
    page.on("dialog", lambda dialog: dialog.dismiss())
    page.goto(f"{keyed_dashboard.node.url}/#cluster")
    page.get_by_text("wants an API key").first.wait_for()
