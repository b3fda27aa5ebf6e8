"""GPT-OSS in the CUDA engines on a real GPU (skipped cleanly without one; run through the device tool): the fused and
graphed CUDA steps refuse its attention sinks, and the eager steps they fall back to give transformers' greedy
tokens, with float and with MXFP4 experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from ringlet.models.gpt_oss import Mxfp4Experts
from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import synthetic_tokenizer
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.gpt_oss import (
    ENGINE_PROMPTS,
    generate_two_at_once,
    reference_greedy,
    reference_model,
    write_mxfp4_checkpoint,
)
from tests.support.random_models import load_checkpoint_stage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SETTINGS = EngineConfig(kv_cache_tokens=1024, max_context=128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[transformers.GptOssForCausalLM, Path]]:
    root = tmp_path_factory.mktemp("gpt_oss")
    plain = reference_model()
    plain.save_pretrained(root / "float")
    packed = reference_model()
    write_mxfp4_checkpoint(packed, root / "float", root / "mxfp4")
    return {"float": (plain, root / "float"), "mxfp4": (packed, root / "mxfp4")}


def cuda_stage(path: Path) -> LoadedStage:
    model = load_checkpoint_stage(path).to("cuda")
    args = model.args
    return LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)


@torch.no_grad()
@pytest.mark.parametrize("experts", ["float", "mxfp4"])
def test_batch_engine_on_cuda_generates_transformers_greedy_tokens(checkpoints, experts):  # type: ignore[no-untyped-def]
    reference, path = checkpoints[experts]
    stage = cuda_stage(path)
    assert isinstance(stage.model.layers[0].mlp.experts, Mxfp4Experts) == (experts == "mxfp4")
    engine = TorchBatchEngine(stage, torch.device("cuda"), SETTINGS)
    assert engine.paged_decode is None  # the graphed step refuses the sinks
    engine.warmup()
    for ours, prompt in zip(generate_two_at_once(engine, 12), ENGINE_PROMPTS, strict=True):
        assert ours == reference_greedy(reference, prompt, 12)


@torch.no_grad()
def test_static_engine_on_cuda_generates_transformers_greedy_tokens(checkpoints):  # type: ignore[no-untyped-def]
    reference, path = checkpoints["mxfp4"]
    engine = TorchEngine(cuda_stage(path), torch.device("cuda"), SETTINGS)
    engine.warmup()
    assert engine.decoder is None  # neither the fused step nor a CUDA graph
    prompt = ENGINE_PROMPTS[0]
    task = TextGenerationTask(prompt=" ".join(f"t{n}" for n in prompt), max_tokens=12, ignore_eos=True,
                              sampling=SamplingParams(temperature=0))
    ours = [chunk.token_id for chunk in engine.generate(task) if chunk.token_id is not None]
    assert ours == reference_greedy(reference, prompt, 12)
