"""Embeddings on the CUDA engine (skipped cleanly without a GPU; run through the device tool): equal to transformers'
fp32 reference in fp32, and close to it in bf16, also after the engine has captured its CUDA graphs and generated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import EmbeddingTask, SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.embedding_models import embedding_checkpoint, reference_from_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 512
INPUTS = [[5, 17, 300, 2], list(range(40, 140)), [9], list(range(200, 233))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_checkpoint(tmp_path_factory.mktemp("emb") / "cuda", vocab_size=VOCAB)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", None)])
def test_cuda_embeddings_match_transformers_after_graphs_and_generation(checkpoint: Path, precision: str,
                                                                       tolerance: float | None) -> None:
    engine = TorchBatchEngine.load(str(checkpoint), device="cuda",
                                   config=EngineConfig(precision=precision, max_context=512, max_step_tokens=64))
    engine.warmup()  # CUDA graphs captured, a short generation run
    before = _greedy_text(engine)
    chunks = engine.embed(EmbeddingTask(model="m", inputs=INPUTS))
    got = torch.tensor([v for c in chunks for v in c.embeddings or ()])
    expected = reference_from_ids(checkpoint, INPUTS)
    if tolerance is not None:
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    else:  # bf16 weights and activations: the direction, not the last bits
        assert float(F.cosine_similarity(got, expected).min()) > 0.99
    assert _greedy_text(engine) == before, "embedding left the engine's generation as it was"


def _greedy_text(engine: TorchBatchEngine) -> str:
    task = TextGenerationTask(prompt="t3 t4 t5", max_tokens=8, ignore_eos=True, sampling=SamplingParams(temperature=0))
    return "".join(chunk.text for chunk in engine.generate(task))
