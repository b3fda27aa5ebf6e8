"""The interactive `ringlet run` as a person types it, in a pseudo-terminal (pexpect): against a node, it shows the
node loading the model (layers loaded, from /state), pulls a model the node lacks first (an Ollama library name
mapped to a GGUF repo on the fake hub), then chats, keeping the conversation, until /bye (on a fake node, and on a
live one that downloads and runs the model); in this process, it loads the embedded model and answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from ringlet.api.app import create_app
from ringlet.models.download import DownloadManager
from ringlet.models.embedded import EMBEDDED_MODEL_ID, embedded_model_path
from ringlet.models.store import ModelStore
from ringlet.shared.tasks import ChatMessage
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.fake_node import REPLY, FakeNode, serving
from tests.support.processes import LOAD_TIMEOUT_S, start_node, stop_node
from tests.support.tiny_gguf import write_tiny_gguf

ANSWER = "".join(REPLY)
# fp32, as the live nodes run: the int4 file's greedy answer to the capital question is not Paris
TERMINAL = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "40", "RINGLET_PRECISION": "fp32"}


def spawn(*args: str, timeout: float = 60) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "ringlet", "run", *args], env=TERMINAL, encoding="utf-8",
                         timeout=timeout, dimensions=(40, 200))


def bye(child: pexpect.spawn) -> None:
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[FakeNode, str]]:
    """A fake node that takes a while to load a model, with no instance yet; its API's URL."""
    fake = FakeNode(tmp_path / "store")
    fake.downloads.close()
    fake.downloads = DownloadManager(on_update=fake._download_changed)  # the default store, the hub of HF_ENDPOINT
    fake.delete_instance(fake.instance_for(EMBEDDED_MODEL_ID).instance.instance_id)
    fake.load_s = 3.0
    try:
        with serving(create_app(fake)) as url:
            yield fake, url
    finally:
        fake.downloads.close()


def test_run_shows_the_node_loading_then_chats_until_bye(node: tuple[FakeNode, str]) -> None:
    fake, url = node
    child = spawn(EMBEDDED_MODEL_ID, "--url", url)
    child.expect(r"loading \[[#.]+\] \d+/30 layers")  # what the node's /state says while the model loads
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect_exact(ANSWER)
    child.expect_exact(">>> ")
    child.sendline("And of Germany?")
    child.expect_exact(ANSWER)
    bye(child)
    assert fake.loaded_on_demand, "the node loaded the model for `ringlet run`"
    assert fake.submitted[-1].messages == [
        ChatMessage(role="user", content="What is the capital of France?"),
        ChatMessage(role="assistant", content=ANSWER),
        ChatMessage(role="user", content="And of Germany?")]


def test_a_prompt_alone_loads_the_default_model_on_a_node_that_has_none_ready(node: tuple[FakeNode, str]) -> None:
    fake, url = node
    result = subprocess.run([sys.executable, "-m", "ringlet", "run", "--url", url, "What is the capital of France?"],
                            check=False, env=TERMINAL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ANSWER in result.stdout and fake.loaded_on_demand
    assert fake.submitted[-1].messages == [ChatMessage(role="user", content="What is the capital of France?")]


def test_a_precision_for_this_process_is_refused_against_a_named_node(node: tuple[FakeNode, str]) -> None:
    fake, url = node
    result = subprocess.run([sys.executable, "-m", "ringlet", "run", "--url", url, "--precision", "int4", "Say hi, please"],
                            check=False, env=TERMINAL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--precision choose how this process loads a model; the node at {url} loads at its own" in result.stderr
    assert not fake.submitted, "nothing ran on the node at settings it was not asked for"


def test_run_pulls_an_ollama_name_on_the_node_first(hub: FakeHub, node: tuple[FakeNode, str], tmp_path: Path) -> None:
    fake, url = node
    write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen3")
    hub.repos["Qwen/Qwen3-0.6B-GGUF"] = HubRepo({"Qwen3-0.6B-Q8_0.gguf": (tmp_path / "tiny.gguf").read_bytes()})
    child = spawn("qwen3:0.6b", "--url", url)
    child.expect_exact(f"pulling qwen3:0.6b on the node at {url}")
    child.expect(r"loading \[[#.]+\] \d/2 layers")
    child.expect_exact(">>> ")
    child.sendline("Hello there")
    child.expect_exact(ANSWER)
    bye(child)
    stored = ModelStore().get("Qwen/Qwen3-0.6B-GGUF")
    assert stored is not None and stored.status == "complete"
    assert fake.submitted[-1].model == "qwen3:0.6b"


def test_an_unknown_model_is_one_clear_line(node: tuple[FakeNode, str]) -> None:
    _, url = node
    child = spawn("no-such-model", "--url", url)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "ringlet: error: 404: model 'no-such-model' not found" in child.before
    assert "Traceback" not in child.before


@pytest.mark.slow
def test_run_in_this_process_loads_the_embedded_model_and_chats() -> None:
    child = spawn("--local", "--max-tokens", "16", timeout=300)
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect_exact("Paris")
    bye(child)


@pytest.mark.slow
def test_run_pulls_and_runs_an_ollama_name_on_a_live_node(hub: FakeHub, tmp_path: Path) -> None:
    # the embedded model's GGUF file, served where ringlet's table sends qwen3:0.6b
    hub.repos["Qwen/Qwen3-0.6B-GGUF"] = HubRepo({"Qwen3-0.6B-Q8_0.gguf": embedded_model_path().read_bytes()})
    live = start_node(tmp_path, "names-node", "--no-default-instance",
                      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "RINGLET_CPU_COMPILE": "0"})
    try:
        child = spawn("qwen3:0.6b", "--url", live.url, "--max-tokens", "12", timeout=LOAD_TIMEOUT_S)
        child.expect_exact(f"pulling qwen3:0.6b on the node at {live.url}")
        child.expect(r"loading \[[#.]+\] \d+/30 layers")  # the node's runner reporting its layers
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("Paris")
        bye(child)
        [record] = live.state()["instances"].values()
        assert record["instance"]["model"] == "Qwen/Qwen3-0.6B-GGUF" and record["status"] == "ready"
        # `ringlet ps`: idle since the answer, held on the CPU
        listed = subprocess.run([sys.executable, "-m", "ringlet", "ps", "--url", live.url], capture_output=True,
                                text=True, timeout=60, check=True).stdout.splitlines()
        row = next(line for line in listed if "Qwen/Qwen3-0.6B-GGUF" in line).split()
        assert re.fullmatch(r"\d+s", row[5]) and row[9:11] == ["100%", "CPU"], row
    finally:
        assert stop_node(live) == 0, live.log()
