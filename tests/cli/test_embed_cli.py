"""`ringlet embed` as a person runs it (a real process), against a fake node's API: texts from the arguments or stdin,
one JSON array a line in order, and the node's refusals as one line."""

from __future__ import annotations

import json
import subprocess
import sys

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from ringlet.shared.tasks import EmbeddingTask
from tests.support.fake_node import FAKE_DIMENSIONS, FakeNode


def ringlet(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringlet", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_texts_from_arguments_or_stdin_print_one_array_a_line(url: str, node: FakeNode) -> None:
    given = ringlet("embed", "--url", url, "first text", "second")
    assert given.returncode == 0, given.stderr
    piped = ringlet("embed", "--url", url, "--model", EMBEDDED_MODEL_ID, stdin="first text\n\nsecond\n")
    assert piped.returncode == 0, piped.stderr
    assert given.stdout == piped.stdout
    vectors = [json.loads(line) for line in given.stdout.splitlines()]
    assert [len(v) for v in vectors] == [FAKE_DIMENSIONS, FAKE_DIMENSIONS] and vectors[0] != vectors[1]
    tasks = [t for t in node.submitted if isinstance(t, EmbeddingTask)]
    assert [t.inputs for t in tasks] == [["first text", "second"]] * 2


def test_dimensions_go_to_the_node_and_refusals_are_one_line(url: str, node: FakeNode) -> None:
    cut = ringlet("embed", "--url", url, "--dimensions", "3", "a b")
    assert cut.returncode == 0, cut.stderr
    assert len(json.loads(cut.stdout)) == 3
    refused = ringlet("embed", "--url", url, "--dimensions", str(FAKE_DIMENSIONS + 1), "a b")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"ringlet: error: 400: dimensions {FAKE_DIMENSIONS + 1} is more "
                                     f"than the model's {FAKE_DIMENSIONS}")
    empty = ringlet("embed", "--url", url, stdin="\n")
    assert empty.returncode == 2 and "no text to embed" in empty.stderr
