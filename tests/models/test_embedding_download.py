"""An embedding model's repo as sentence-transformers publishes it (Qwen3-Embedding: the bare backbone's tensor names,
without `model.`, over several files): a stage's download fetches the files of its layers and the pooling files, and
the whole download loads as an embedding model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringlet.models.download import download_model
from ringlet.models.pooling import Pooling
from ringlet.worker.engines.torch.engine import load_torch_stage
from tests.support.embedding_models import CONFIG, embedding_checkpoint
from tests.support.fake_hub import FakeHub, HubRepo

REPO = "ringlet-test/tiny-qwen3-embedding"
POOLING_FILES = {"modules.json", "1_Pooling/config.json"}


@pytest.fixture
def embedding_repo(hub: FakeHub, tmp_path: Path) -> dict[str, bytes]:
    directory = embedding_checkpoint(tmp_path / "built", max_shard_size="100KB")
    files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    hub.repos[REPO] = HubRepo(files)
    return files


def _fetched(hub: FakeHub) -> set[str]:
    return {name for name in hub.repos[REPO].files if hub.file_gets(name)}


def test_a_stage_fetches_its_layers_files_and_the_pooling_files(hub: FakeHub,
                                                                embedding_repo: dict[str, bytes]) -> None:
    weight_map = json.loads(embedding_repo["model.safetensors.index.json"])["weight_map"]
    assert not any(name.startswith("model.") for name in weight_map), "stored as sentence-transformers saves it"
    layer_1 = {file for name, file in weight_map.items() if name.startswith("layers.1.")}
    assert layer_1 < set(weight_map.values()), "the test needs a stage that does not span every file"
    download_model(REPO, layers=(1, 2))
    fetched = _fetched(hub)
    assert POOLING_FILES <= fetched
    shards = {name for name in fetched if name.endswith(".safetensors")}
    assert shards == layer_1, "the middle stage's files only: no embedding, no final norm"


def test_the_whole_download_loads_as_an_embedding_model(hub: FakeHub, embedding_repo: dict[str, bytes]) -> None:
    path = download_model(REPO)
    stage, _ = load_torch_stage(path, precision="fp32")
    assert stage.pooling == Pooling(mode="lasttoken", normalize=True)
    assert stage.args.num_hidden_layers == CONFIG["num_hidden_layers"]
