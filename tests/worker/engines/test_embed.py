"""Embeddings on the torch engine equal what transformers computes for a random Qwen3-Embedding-shaped checkpoint:
pooled by the last token and normalised, or by the mean; inputs batched together (padded) equal each alone; the
pooling is read from the sentence-transformers files, and a model without them is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.pooling import Pooling, gguf_pooling, read_pooling
from ringlet.shared.config import EngineConfig
from ringlet.shared.errors import ContextWindowError, ModelLoadError
from ringlet.shared.tasks import EmbeddingTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.embed import VECTORS_PER_CHUNK, embedding_chunks
from tests.support.embedding_models import embedding_checkpoint, reference_embeddings, token_ids
from tests.support.tiny_gguf import write_tiny_gguf

TEXTS = ["Hello world", "The capital of France is Paris, a city of many bridges and old stone streets.", "a",
         "Embeddings turn text into vectors."]
TOLERANCE = 2e-5  # fp32 on both sides; batching and kernel choices move the last bits


@pytest.fixture(scope="module")
def last_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_checkpoint(tmp_path_factory.mktemp("emb") / "last-token")


@pytest.fixture(scope="module")
def mean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mean pooling, not normalised, untied with no lm_head saved (as Qwen3-Embedding-8B ships)."""
    return embedding_checkpoint(tmp_path_factory.mktemp("emb") / "mean", mode="mean_tokens", normalize=False,
                                tied=False, seed=1)


def _engine(path: Path, step_tokens: int = 512) -> TorchBatchEngine:
    return TorchBatchEngine.load(str(path), config=EngineConfig(precision="fp32", kv_cache_tokens=1024,
                                                                max_step_tokens=step_tokens))


def _vectors(engine: TorchBatchEngine, task: EmbeddingTask) -> tuple[torch.Tensor, int]:
    chunks = engine.embed(task)
    assert chunks[-1].last and all(not c.last for c in chunks[:-1])
    assert chunks[-1].usage is not None
    return torch.tensor([v for c in chunks for v in c.embeddings or ()]), chunks[-1].usage.prompt_tokens


def test_last_token_pooling_equals_transformers(last_token: Path) -> None:
    assert read_pooling(last_token) == Pooling(mode="lasttoken", normalize=True)
    got, prompt_tokens = _vectors(_engine(last_token), EmbeddingTask(model="m", inputs=TEXTS))
    expected = reference_embeddings(last_token, TEXTS)
    assert got.shape == expected.shape == (len(TEXTS), 64)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))
    assert prompt_tokens == sum(len(token_ids(last_token, t)) for t in TEXTS)


def test_mean_pooling_of_a_headless_checkpoint_equals_transformers(mean: Path) -> None:
    assert read_pooling(mean) == Pooling(mode="mean", normalize=False)
    got, _ = _vectors(_engine(mean), EmbeddingTask(model="m", inputs=TEXTS))
    expected = reference_embeddings(mean, TEXTS, mode="mean_tokens", normalize=False)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=1e-5)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS))), "not normalised: the files say so"


def test_batched_inputs_equal_each_alone_and_token_ids_equal_text(last_token: Path) -> None:
    engine = _engine(last_token)
    together, _ = _vectors(engine, EmbeddingTask(model="m", inputs=TEXTS))
    alone = torch.cat([_vectors(engine, EmbeddingTask(model="m", inputs=[t]))[0] for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=TOLERANCE, rtol=0)
    ids = [token_ids(last_token, t) for t in TEXTS]
    as_ids, _ = _vectors(engine, EmbeddingTask(model="m", inputs=ids))
    torch.testing.assert_close(as_ids, together, atol=TOLERANCE, rtol=0)


def test_small_steps_split_the_inputs_and_a_long_input_into_forwards_of_their_size(last_token: Path) -> None:
    engine = _engine(last_token, step_tokens=16)  # the longest text is more than 16 tokens: it goes in pieces
    assert max(len(token_ids(last_token, t)) for t in TEXTS) > 16
    forwards: list[int] = []
    chunks = engine.embed(EmbeddingTask(model="m", inputs=TEXTS), after_forward=lambda: forwards.append(1))
    got = torch.tensor([v for c in chunks for v in c.embeddings or ()])
    torch.testing.assert_close(got, reference_embeddings(last_token, TEXTS), atol=TOLERANCE, rtol=0)
    assert len(forwards) > 2, "several forwards, each told to the runner"


def test_dimensions_cut_and_normalise_again(last_token: Path) -> None:
    got, _ = _vectors(_engine(last_token), EmbeddingTask(model="m", inputs=TEXTS[:2], dimensions=16))
    torch.testing.assert_close(got, reference_embeddings(last_token, TEXTS[:2], dimensions=16), atol=TOLERANCE,
                               rtol=0)
    with pytest.raises(ValueError, match="dimensions 65 is more than the model's 64"):
        _engine(last_token).embed(EmbeddingTask(model="m", inputs=["x"], dimensions=65))


def test_long_inputs_are_truncated_or_refused(last_token: Path) -> None:
    engine = _engine(last_token)
    long = list(range(10, 10 + engine.context_length + 5))
    _, prompt_tokens = _vectors(engine, EmbeddingTask(model="m", inputs=[long]))
    assert prompt_tokens == engine.context_length
    with pytest.raises(ContextWindowError, match=f"input 0 has {len(long)} tokens"):
        engine.embed(EmbeddingTask(model="m", inputs=[long], truncate=False))
    with pytest.raises(ValueError, match="beyond the model's vocabulary"):
        engine.embed(EmbeddingTask(model="m", inputs=[[10**6]]))


def test_a_generation_model_is_refused_by_name(tmp_path: Path, tiny_checkpoint: dict[str, bytes]) -> None:
    for name, data in tiny_checkpoint.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert read_pooling(tmp_path) is None
    with pytest.raises(ValueError, match="model 'tiny' is not an embedding model"):
        _engine(tmp_path).embed(EmbeddingTask(model="tiny", inputs=["hello"]))


def test_pooling_files_ringlet_cannot_follow_are_a_clear_error(tmp_path: Path, last_token: Path) -> None:
    (tmp_path / "modules.json").write_text((last_token / "modules.json").read_text())
    (tmp_path / "1_Pooling").mkdir()
    config = json.loads((last_token / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_max_tokens": True}))
    with pytest.raises(ModelLoadError, match="pooling_mode_max_tokens"):
        read_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_pooling(tmp_path)


@pytest.mark.parametrize(("pooling_type", "pooling"), [
    (None, None), (0, None), (1, Pooling("mean", True)), (2, Pooling("cls", True)), (3, Pooling("lasttoken", True)),
])
def test_a_gguf_file_names_its_pooling_in_its_metadata(tmp_path: Path, pooling_type: int | None,
                                                       pooling: Pooling | None) -> None:
    path = tmp_path / "tiny.gguf"

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_uint32("tokenizer.ggml.eos_token_id", 7)
        if pooling_type is not None:
            writer.add_uint32("qwen3.pooling_type", pooling_type)

    write_tiny_gguf(path, arch="qwen3", metadata=metadata)
    assert gguf_pooling(GGUFModel.open(path).pooling_type(), path) == pooling


def test_a_rerankers_gguf_pooling_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="pooling type 4"):
        gguf_pooling(4, tmp_path / "reranker.gguf")


def test_many_embeddings_travel_in_bounded_chunks() -> None:
    vectors = [[float(i)] for i in range(2 * VECTORS_PER_CHUNK + 1)]
    chunks = embedding_chunks("t", vectors, 7)
    assert [len(c.embeddings or ()) for c in chunks] == [VECTORS_PER_CHUNK, VECTORS_PER_CHUNK, 1]
    assert [v for c in chunks for v in c.embeddings or ()] == vectors
    assert [c.last for c in chunks] == [False, False, True] and chunks[-1].usage is not None
