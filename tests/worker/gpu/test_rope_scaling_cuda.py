"""Rope scaling on the CUDA steps (skipped cleanly without a GPU; run through the device tool): the graphed paged
decode step and the fused static one read the rotary tables, scaled by the type's attention factor, as the model's
own forward does, at positions past the scaling's original length (tests/models/test_rope_scaling.py holds that
forward to transformers)."""

from __future__ import annotations

import pytest
import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from ringlet.worker.engines.torch.engine import TorchEngine
from tests.support.random_models import GPU_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ORIGINAL = 256
HALF = GPU_CONFIG["hidden_size"] // GPU_CONFIG["num_attention_heads"] // 2
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(HALF)],
                 "long_factor": [1.0 + 0.5 * i for i in range(HALF)], "original_max_position_embeddings": ORIGINAL},
}
SETTINGS = EngineConfig(max_context=1024, max_batch=8, kv_cache_tokens=8 * 1024)


def stage(scaling: dict) -> LoadedStage:
    args = model_args(GPU_CONFIG | {"rope_scaling": scaling})
    weights = random_weights(args, torch.float32, "cuda", seed=1)
    weights["model.embed_tokens.weight"] *= 50
    model = build_stage(args, weights=weights, dtype=torch.float32, device="cuda")
    return LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3 * want.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_graphed_paged_step_equals_the_packed_forward_past_the_original_length(kind):
    engine = TorchBatchEngine(stage(SCALINGS[kind]), torch.device("cuda"), SETTINGS)
    engine.warmup()
    model, step = engine.model, engine.paged_decode
    assert step is not None and step.graphs
    reference = model.make_paged_cache(engine.num_blocks, engine.block_size)
    lengths = [ORIGINAL + 30 * i for i in range(4)]
    width = -(-(max(lengths) + 16) // engine.block_size)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(len(lengths))]
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for length, table in zip(lengths, tables):
            prompt = torch.randint(0, GPU_CONFIG["vocab_size"], (length,), generator=generator).cuda()
            for cache in (engine.cache, reference):
                model.forward_batch(prompt, cache, BatchLayout.build([SequenceStep(0, length, table)],
                                                                     engine.block_size, "cuda", cache.pad_slot))
        tokens = torch.randint(0, GPU_CONFIG["vocab_size"], (len(lengths),), generator=generator)
        for n in range(8):
            steps = [SequenceStep(length + n, 1, table) for length, table in zip(lengths, tables)]
            want = model.forward_batch(tokens.cuda(), reference, BatchLayout.build(steps, engine.block_size, "cuda",
                                                                                   reference.pad_slot))
            close(step(tokens, steps), want)
            tokens = want.argmax(-1).cpu()


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_fused_static_decode_equals_the_eager_forward_past_the_original_length(kind):
    engine = TorchEngine(stage(SCALINGS[kind]), torch.device("cuda"), SETTINGS)
    decoder = engine.decoder
    assert decoder is not None and decoder.fused is not None
    decoder.warm()
    model = engine.stage.model
    eager = model.make_cache(1, SETTINGS.max_context)
    prompt = torch.randint(0, GPU_CONFIG["vocab_size"], (1, ORIGINAL + 20),
                           generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        for cache in (engine.cache, eager):
            model(prompt, cache, 0)
        token = prompt[:, -1:]
        for position in range(prompt.shape[1], prompt.shape[1] + 8):
            want = model(token, eager, position)[:, -1]
            close(decoder(token, position), want)
            token = want.argmax(-1, keepdim=True)
