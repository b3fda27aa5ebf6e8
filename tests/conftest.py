"""Settings for every test, and for the node and runner processes the tests start (they inherit the environment)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures, not here: tests/worker/engines/ipex_env runs where httpx is not installed
    from tests.support.processes import LiveNode

# CPU decode steps stay eager: compiling takes minutes and most tests decode a few tokens. The compiled path has its
# own tests (tests/worker/engines/test_cpu_compile.py), which ask for it explicitly.
os.environ.setdefault("RINGLET_CPU_COMPILE", "0")

# The tests' nodes hold 16,384 positions of KV cache a runner (two 8k contexts), not a quarter of the machine's free
# memory (65,536 fp32 positions of the embedded model, 3 GB zeroed as each runner loads: seconds a load, and nodes
# beside each other crowd the machine's memory). Tests of the cache's own sizing pass their settings.
os.environ.setdefault("RINGLET_KV_CACHE_TOKENS", "16384")

# Models pulled with Ollama are found by name: tests see only the Ollama stores they build, never the machine's own.
os.environ["OLLAMA_MODELS"] = "/nonexistent/ollama-store-of-the-tests"

# No test reaches a real hub (a repo id placed by a test, or by the API fuzzer, is looked up there): a closed port,
# refused at once; the tests that download point HF_ENDPOINT at the fake hub.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

# Without a GPU, Triton kernels (the fused CUDA decode step) run in Triton's interpreter on CPU tensors. Read when a
# kernel is defined, so it is set before anything imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def pytorch_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's int4/int8 products and decode attention through PyTorch's kernels, x unrounded, not ringlet's VNNI
    ones (which round x to int8, as llama.cpp does; `tests/models/test_cpu_vnni.py` checks them): for tests that
    hold a loaded model's logits to a float reference at bf16's tolerance."""
    from ringlet.models.kernels import cpu_vnni

    monkeypatch.setattr(cpu_vnni, "available", lambda: False)
    monkeypatch.setattr(cpu_vnni, "loaded", False)


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


@pytest.fixture(autouse=True, scope="session")
def _gguf_files_parsed_once() -> Iterator[None]:
    """gguf-py parses a file's whole vocabulary into arrays of its own as it opens it (0.7 s for the embedded
    model's, timing `gguf_loader._open_reader` on it); the tests open the same few files hundreds of times in this
    process, so here each version of a file is parsed once (a failed open is not kept). Node and runner processes open
    theirs as a user's do."""
    try:
        from ringlet.models import gguf_loader
        from ringlet.models.loader import file_version
    except ImportError:  # the IPEX environment's tests, which run without ringlet's model layer
        yield
        return
    real = gguf_loader._open_reader
    parsed = functools.lru_cache(maxsize=8)(lambda path, _size, _mtime_ns: real(path))

    def open_reader(path: Path) -> Any:
        try:
            version = file_version(path)
        except OSError:
            return real(path)  # which says what is wrong with it
        return parsed(*version)

    gguf_loader._open_reader = open_reader
    yield
    gguf_loader._open_reader = real


# fixtures shared across directories: the fake hub and its tiny checkpoint, the API over a fake node, live nodes
pytest_plugins = ["tests.support.hub", "tests.support.fake_api"]


@pytest.fixture(scope="session")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """One node for the whole session, with its default instance (the embedded model) ready."""
    from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node, wait_until

    node = start_node(tmp_path_factory.mktemp("live-node"))
    try:
        wait_until(lambda: node.ready_instances() or not node.alive(), LOAD_TIMEOUT_S,
                   "the default instance ready", node.log, poll_s=0.1)
        assert node.alive(), f"the node exited:\n{node.log()}"
        yield node
    finally:
        code = stop_node(node)
    assert code == 0, f"the node exited with {code} on SIGTERM:\n{node.log()}"


@pytest.fixture(scope="session")
def model_id(live_node: LiveNode) -> str:
    return str(live_node.ready_instances()[0]["instance"]["model"])
