"""The local store: names, where it lives, what it lists, removal, locks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringlet.models.store import (
    INCOMPLETE_DIR,
    MANIFEST_FILE,
    ModelRef,
    ModelStore,
    extra_model_dirs,
    find_local,
    model_lock,
    ringlet_home,
    split_gguf_parts,
)
from ringlet.shared.errors import ModelLoadError
from tests.support.hub import NUM_LAYERS


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RINGLET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RINGLET_MODEL_DIRS", raising=False)
    return tmp_path / "home"


def put_model(root: Path, repo_id: str, files: dict[str, bytes], only: set[str] | None = None) -> Path:
    directory = root / repo_id
    directory.mkdir(parents=True)
    for name, data in files.items():
        if "/" not in name and (only is None or name in only or not name.endswith(".safetensors")):
            (directory / name).write_bytes(data)
    return directory


def test_model_references() -> None:
    assert ModelRef.parse("Qwen/Qwen3-0.6B") == ModelRef("Qwen/Qwen3-0.6B")
    assert ModelRef.parse(" bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M ") == ModelRef(
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M")
    for bad in ("qwen3", "a/b/c", "../etc", "org/..", "org/na me", "org/-x", "org/a--b", "/abs"):
        with pytest.raises(ModelLoadError, match="expected ORG/NAME"):
            ModelRef.parse(bad)


def test_home_and_extra_directories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RINGLET_HOME", raising=False)
    assert ringlet_home() == Path.home() / ".ringlet"
    monkeypatch.setenv("RINGLET_HOME", str(tmp_path))
    assert ModelStore().root == tmp_path / "models"
    monkeypatch.setenv("RINGLET_MODEL_DIRS", f"/mnt/a::{tmp_path}/b:")
    assert extra_model_dirs() == [Path("/mnt/a"), tmp_path / "b"]


def test_list_tells_complete_partial_and_unfinished(
    home: Path, tiny_checkpoint: dict[str, bytes], weight_map: dict[str, str]
) -> None:
    store = ModelStore()
    assert store.models() == []
    put_model(store.root, "org/full", tiny_checkpoint)
    layer0_files = {f for n, f in weight_map.items() if n.startswith("model.layers.0.")}
    partial = put_model(store.root, "org/half", tiny_checkpoint, only=layer0_files)
    unfinished = store.root / "org/fresh"
    (unfinished / INCOMPLETE_DIR).mkdir(parents=True)
    (unfinished / INCOMPLETE_DIR / "model.safetensors.abc.incomplete").write_bytes(b"x" * 500)

    listed = {m.repo_id: m for m in store.models()}
    assert list(listed) == ["org/fresh", "org/full", "org/half"]
    full, half, fresh = listed["org/full"], listed["org/half"], listed["org/fresh"]
    assert (full.status, full.detail, full.format) == ("complete", f"{NUM_LAYERS}/{NUM_LAYERS} layers", "safetensors")
    assert full.size_bytes == sum(len(d) for n, d in tiny_checkpoint.items() if "/" not in n)
    assert half.status == "partial" and half.detail.startswith("layers 0")
    assert (fresh.status, fresh.incomplete_bytes, fresh.size_bytes) == ("incomplete", 500, 0)
    assert find_local("org/half") == partial and find_local("ORG/FULL") == store.root / "org/full"
    assert find_local("org/fresh") is None and find_local("org/absent") is None
    assert find_local("./not-a-repo-name") is None


def test_a_file_listed_in_the_manifest_but_gone_is_not_complete(home: Path, tiny_checkpoint: dict[str, bytes]) -> None:
    store = ModelStore()
    directory = put_model(store.root, "org/full", tiny_checkpoint)
    (directory / MANIFEST_FILE).parent.mkdir()
    manifest = {"repo_id": "org/full", "commit": "c" * 40, "endpoint": "http://x",
                "files": {"tokenizer.json": {"size": len(tiny_checkpoint["tokenizer.json"])}}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert store.get("org/full").status == "complete"  # type: ignore[union-attr]
    (directory / "tokenizer.json").unlink()
    model = store.get("org/full")
    assert model is not None and (model.status, model.detail) == ("partial", "missing tokenizer.json")
    (directory / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="manifest.json is damaged"):
        store.get("org/full")


def test_remove(home: Path, tiny_checkpoint: dict[str, bytes]) -> None:
    store = ModelStore()
    put_model(store.root, "org/full", tiny_checkpoint)
    put_model(store.root, "org/other", {"x.gguf": b"GGUF"})
    removed = store.remove("Org/Full")
    assert removed.repo_id == "org/full" and not (store.root / "org/full").exists()
    assert (store.root / "org").is_dir()  # still holds org/other
    store.remove("org/other")
    assert not (store.root / "org").exists()
    with pytest.raises(ModelLoadError, match=r"model 'org/full' is not in the store .*`ringlet models` lists it"):
        store.remove("org/full")


def test_a_model_being_written_cannot_be_locked_twice_or_removed(home: Path) -> None:
    store = ModelStore()
    directory = store.model_dir("org/busy")
    with model_lock(directory):
        with pytest.raises(ModelLoadError, match="is being written by another download"), model_lock(directory):
            pass
        with pytest.raises(ModelLoadError, match="wait for it or cancel it, then remove it"):
            store.remove("org/busy")
    store.remove("org/busy")


def test_gguf_variants(home: Path) -> None:
    store = ModelStore()
    put_model(store.root, "org/m-GGUF", {"m.Q4_K_M.gguf": b"GGUF4", "m.Q8_0.gguf": b"GGUF8"})
    model = store.get("org/m-GGUF")
    assert model is not None and model.format == "gguf" and model.status == "complete"
    assert find_local("org/m-GGUF:Q8_0") == store.root / "org/m-GGUF/m.Q8_0.gguf"
    with pytest.raises(ModelLoadError, match="several GGUF files match"):
        find_local("org/m-GGUF")
    with pytest.raises(ModelLoadError, match="no GGUF file matches; available: m.Q4_K_M.gguf, m.Q8_0.gguf"):
        find_local("org/m-GGUF:IQ2_XS")


def test_a_split_gguf_model_is_one_choice_named_by_its_first_file(home: Path) -> None:
    store = ModelStore()
    put_model(store.root, "org/big-GGUF", {"big-Q4_K_M-00001-of-00002.gguf": b"GGUF1",
                                           "big-Q4_K_M-00002-of-00002.gguf": b"GGUF2", "big-Q8_0.gguf": b"GGUF8"})
    first = store.root / "org/big-GGUF/big-Q4_K_M-00001-of-00002.gguf"
    assert find_local("org/big-GGUF:Q4_K_M") == first
    assert split_gguf_parts(first) == [first, first.with_name("big-Q4_K_M-00002-of-00002.gguf")]
    assert split_gguf_parts(first.with_name("big-Q8_0.gguf")) == [first.with_name("big-Q8_0.gguf")]
    with pytest.raises(ModelLoadError, match=r"several GGUF files match \(big-Q4_K_M-00001-of-00002.gguf, "
                                             r"big-Q8_0.gguf\)"):
        find_local("org/big-GGUF")
