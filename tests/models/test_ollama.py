"""Models pulled with Ollama, served in place from an Ollama store built here (manifests and blobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringlet.cli import main
from ringlet.models.embedded import embedded_model_path
from ringlet.models.loader import resolve_model_path
from ringlet.models.names import Catalog
from ringlet.models.ollama import OllamaName, find_ollama_model, ollama_models
from ringlet.models.repack_cache import RepackCache
from ringlet.shared.errors import InvalidModelError, ModelLoadError, ModelNotFoundError
from tests.support.ollama_store import WEIGHTS, pull
from tests.support.tiny_gguf import write_tiny_gguf


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "ringlet-home"))
    pull(root, ("registry.ollama.ai", "library", "smollm2", "135m"), embedded_model_path())
    return root


@pytest.mark.parametrize("text, parts, short", [
    ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("qwen3", ("registry.ollama.ai", "library", "qwen3", "latest"), "qwen3:latest"),
    ("someone/model:q4", ("registry.ollama.ai", "someone", "model", "q4"), "someone/model:q4"),
    ("hf.co/org/Repo-GGUF:Q4_K_M", ("hf.co", "org", "Repo-GGUF", "Q4_K_M"), "hf.co/org/Repo-GGUF:Q4_K_M"),
])
def test_ollama_names_parse_as_ollama_reads_them(text: str, parts: tuple[str, ...], short: str) -> None:
    name = OllamaName.parse(text)
    assert name is not None and (name.host, name.namespace, name.model, name.tag) == parts and str(name) == short


@pytest.mark.parametrize("text", ["/abs/model.gguf", "../model", "a/b/c/d", "bad name", "x:../../etc", "x:a/b"])
def test_what_cannot_be_an_ollama_name_is_none(text: str) -> None:
    assert OllamaName.parse(text) is None


def test_a_pulled_model_is_found_by_name_and_served_in_place(store: Path) -> None:
    blob = store / "blobs" / ("sha256-" + "ab" * 32)
    for name in ("smollm2:135m", "SmolLM2:135M", "registry.ollama.ai/library/smollm2:135m"):
        found = find_ollama_model(name)
        assert found is not None and found.path == blob and found.name == "smollm2:135m"
    assert find_ollama_model("smollm2") is None  # tag latest was not pulled
    assert find_ollama_model("Qwen/Qwen3-0.6B") is None
    assert resolve_model_path("smollm2:135m") == blob
    assert [m.name for m in ollama_models()] == ["smollm2:135m"]
    assert ollama_models()[0].size_bytes == embedded_model_path().stat().st_size


def test_older_blob_names_are_found_too(tmp_path: Path) -> None:
    pull(tmp_path, ("registry.ollama.ai", "library", "old", "latest"), embedded_model_path(), spelling="sha256:")
    found = find_ollama_model("old", root=tmp_path)
    assert found is not None and found.path.name == "sha256:" + "ab" * 32


def test_a_model_with_an_adapter_or_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    pull(tmp_path, ("registry.ollama.ai", "library", "tuned", "latest"), embedded_model_path(),
         extra={"application/vnd.ollama.image.adapter": "ef" * 32})
    with pytest.raises(ModelLoadError, match="tuned:latest has a LoRA adapter, which ringlet does not apply"):
        find_ollama_model("tuned", root=tmp_path)
    manifest = tmp_path / "manifests/registry.ollama.ai/library/gone/latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": WEIGHTS, "digest": "sha256:" + "12" * 32}]}))
    with pytest.raises(ModelLoadError, match="gone:latest: its weights .* are missing; `ollama pull gone:latest`"):
        find_ollama_model("gone", root=tmp_path)
    manifest.write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read its manifest"):
        find_ollama_model("gone", root=tmp_path)
    assert [m.name for m in ollama_models(tmp_path)] == []  # none of them servable, none listed


def test_the_node_lists_and_places_pulled_models_by_their_ollama_names(store: Path, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny-falcon"
    write_tiny_gguf(tiny, arch="falcon")
    pull(store, ("registry.ollama.ai", "library", "falcon", "7b"), tiny, digest="77" * 32)
    catalog = Catalog(local_roots=[])
    listed = [card for card in catalog.cards() if card.source == "ollama"]
    assert [card.id for card in listed] == ["smollm2:135m"]  # the falcon file is an architecture ringlet lacks
    card = listed[0]
    assert card.format == "gguf" and card.num_layers == 30
    assert catalog.resolve("smollm2:135m") is card and catalog.add_local("SmolLM2:135m") is card
    with pytest.raises(InvalidModelError, match="falcon:7b is not a model this node can load: .*'falcon'"):
        catalog.add_local("falcon:7b")
    with pytest.raises(ModelNotFoundError, match="not pulled yet: `ringlet pull llama3.2:1b`"):
        catalog.add_local("llama3.2:1b")  # a library name: mapped to a GGUF repo, not in ringlet's store either
    pull(store, ("registry.ollama.ai", "library", "llama3.2", "1b"), embedded_model_path(), digest="99" * 32)
    assert catalog.resolve("llama3.2:1b").source == "ollama", "the model pulled with Ollama wins over the mapping"


def test_a_fresh_catalog_lists_what_ollama_pulled_on_disk_with_the_files_type(store: Path) -> None:
    on_disk = {model.card.id: model for model in Catalog(local_roots=[]).on_disk()}
    assert "smollm2:135m" in on_disk, "listed without the node's model list having been asked for first"
    card = on_disk["smollm2:135m"].card
    assert card.quantization == "Q4_1" and card.four_bit_share == 1.0, "counted as its file's 4-bit groups"


@pytest.mark.slow
def test_ringlet_run_and_models_serve_a_model_pulled_with_ollama(store: Path) -> None:
    def ringlet(*args: str) -> subprocess.CompletedProcess[str]:
        # fp32, as the live nodes run: the int4 file's greedy answer to this question is not Paris
        return subprocess.run([sys.executable, "-m", "ringlet", *args], capture_output=True, text=True, timeout=300,
                              env=os.environ | {"RINGLET_ENGINE": "cpu", "RINGLET_PRECISION": "fp32"}, check=False)

    listed = ringlet("models")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("smollm2:135m"))
    assert "ollama" in line and str(store / "blobs") in line
    prompt = ("run", "What is the capital of France?", "--max-tokens", "12")
    pulled = ringlet(*prompt, "--model", "smollm2:135m")
    embedded = ringlet(*prompt, "--model", str(embedded_model_path()))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == embedded.stdout and "Paris" in pulled.stdout
    missing = ringlet(*prompt, "--model", "phi4-mini:3.8b")  # a name ringlet maps to no Hugging Face repo
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    assert f"not pulled with Ollama ({store})" in missing.stderr and "`ollama pull phi4-mini:3.8b`" in missing.stderr


def test_ringlet_rm_leaves_a_pulled_model_to_ollama_and_removes_its_repacked_weights(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = store / "blobs" / ("sha256-" + "ab" * 32)
    assert main(["rm", "smollm2:135m"]) == 2
    err = capsys.readouterr().err
    assert "Ollama pulled" in err and "`ollama rm smollm2:135m`" in err and "not a Hugging Face" not in err
    cache = RepackCache.for_files([blob])
    assert cache is not None
    cache.directory.mkdir(parents=True)
    (cache.directory / "blk.0.safetensors").write_bytes(b"\0" * 1000)
    assert main(["rm", "smollm2:135m"]) == 0
    assert "removed ringlet's repacked weights of smollm2:135m" in capsys.readouterr().out
    assert not cache.directory.exists() and blob.is_file(), "ringlet's copy goes, Ollama's file stays"
