"""A node serves a model pulled with Ollama by its Ollama name: placed at start, listed, answered through the API."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringlet.models.embedded import embedded_model_path
from tests.support.ollama_store import pull
from tests.support.processes import start_node, stop_node

pytestmark = pytest.mark.slow


def test_a_node_serves_an_ollama_model_by_its_name(tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    pull(store, ("registry.ollama.ai", "library", "smollm2", "135m"), embedded_model_path())
    node = start_node(tmp_path, "ollama-node", "--model", "smollm2:135m", env={"OLLAMA_MODELS": str(store)})
    try:
        [instance] = [r for r in node.state()["instances"].values()]
        assert instance["instance"]["model"] == "smollm2:135m"
        node.wait_for_instance(instance["instance"]["instance_id"])
        listed = {m["card"]["id"]: m for m in node.json("/models")["models"]}
        assert listed["smollm2:135m"]["card"]["source"] == "ollama" and listed["smollm2:135m"]["on_disk"]
        answer = node.post("/v1/chat/completions", json={
            "model": "smollm2:135m", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        tags = node.json("/api/tags")["models"]
        assert "smollm2:135m" in {t["name"] for t in tags}
        missing = node.post("/instance", json={"model": "llama3.2:1b"})
        assert missing.status_code == 404 and "llama3.2:1b" in missing.text
    finally:
        assert stop_node(node) == 0, node.log()
