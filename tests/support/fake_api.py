"""Fixtures (registered for every test by tests/conftest.py) of the API under test: `create_app` over a FakeNode
(tests/support/fake_node.py), served over real HTTP on loopback so that the official `openai` and `ollama`
clients, httpx and the CLI talk to it as to a node."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ringlet.api.app import create_app
from tests.support.fake_node import REPLY, FakeNode, serving


@dataclass(frozen=True)
class FakeServer:
    node: FakeNode
    url: str


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    """One fake node and its API per test module: instances a module creates stay in that module."""
    node = FakeNode(tmp_path_factory.mktemp("fake-node-store"))
    try:
        with serving(create_app(node)) as url:
            yield FakeServer(node, url)
    finally:
        node.downloads.close()


@pytest.fixture
def node(fake_server: FakeServer) -> Iterator[FakeNode]:
    """The module's fake node with no tasks submitted or closed yet; a test's own script, token delay and load time
    are undone after it."""
    fake = fake_server.node
    fake.submitted.clear()
    fake.closed.clear()
    fake.kept_alive.clear()
    yield fake
    fake.script, fake.token_delay_s, fake.load_s = lambda: REPLY, 0.0, 0.0


@pytest.fixture
def url(fake_server: FakeServer) -> str:
    return fake_server.url
