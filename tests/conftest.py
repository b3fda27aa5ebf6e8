"""Settings for every test, and for the node and runner processes the tests start (they inherit the environment)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the fixtures, not here: tests/worker/engines/ipex_env runs where httpx is not installed
    from tests.support.processes import LiveNode

# CPU decode steps stay eager: compiling takes minutes and most tests decode a few tokens. The compiled path has its
# own tests (tests/worker/engines/test_cpu_compile.py), which ask for it explicitly.
os.environ.setdefault("RINGLET_CPU_COMPILE", "0")

# Models pulled with Ollama are found by name: tests see only the Ollama stores they build, never the machine's own.
os.environ["OLLAMA_MODELS"] = "/nonexistent/ollama-store-of-the-tests"

# No test reaches a real hub (a repo id placed by a test, or by the API fuzzer, is looked up there): a closed port,
# refused at once; the tests that download point HF_ENDPOINT at the fake hub.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

# Without a GPU, Triton kernels (the fused CUDA decode step) run in Triton's interpreter on CPU tensors. Read when a
# kernel is defined, so it is set before anything imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _fresh_compiled_functions() -> Iterator[None]:
    """Each test module starts with torch.compile's caches empty. An engine compiles its decode step from the same
    function as every other engine (`TorchBatchEngine._decode`), each adding entries to that function's cache: a
    serving process holds one engine, but a test process makes dozens, and past dynamo's limit of entries a
    function (8) a compiled step fails."""
    yield
    dynamo = sys.modules.get("torch._dynamo")  # only where a test compiled: this file imports no torch
    if dynamo is not None:
        dynamo.reset()


# fixtures shared across directories: the fake hub and its tiny checkpoint, the API over a fake node, live nodes
pytest_plugins = ["tests.support.hub", "tests.support.fake_api"]


@pytest.fixture(scope="session")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """One node for the whole session, with its default instance (the embedded model) ready."""
    from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node, wait_until

    node = start_node(tmp_path_factory.mktemp("live-node"))
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S,
                   "the default instance ready", node.log, poll_s=0.25)
        assert node.alive(), f"the node exited:\n{node.log()}"
        yield node
    finally:
        code = stop_node(node)
    assert code == 0, f"the node exited with {code} on SIGTERM:\n{node.log()}"


@pytest.fixture(scope="session")
def model_id(live_node: LiveNode) -> str:
    return str(live_node.ready_instances()[0]["instance"]["model"])
