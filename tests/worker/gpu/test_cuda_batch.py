"""The batched CUDA engine on a real GPU (skipped cleanly without one; run through the device tool): decode steps
replayed from CUDA graphs per batch bucket, steps with prompt chunks on graphs of their own (or eagerly, past the
largest), requests joining and leaving mid-generation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.greedy import batch_tokens
from tests.support.random_models import GPU_CONFIG as CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SETTINGS = EngineConfig(max_context=1024, max_batch=64, kv_cache_tokens=32 * 1024)


def batch_engine(dtype: torch.dtype, graphs: bool = True) -> TorchBatchEngine:
    args = model_args(CONFIG)
    weights = random_weights(args, dtype, "cuda", seed=1)
    weights["model.embed_tokens.weight"] *= 50  # peaked logits: greedy choices are not near-ties
    model = build_stage(args, weights=weights, dtype=dtype, device="cuda")
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cuda"), SETTINGS)
    if not graphs:
        engine.paged_decode = None
    engine.warmup()
    return engine


def tasks(sampling: SamplingParams) -> list[TextGenerationTask]:
    """Prompts of 5 to 300 tokens and answers of 20 to 70: sequences join and leave while others decode."""
    return [TextGenerationTask(task_id=f"task-{i}", prompt=" ".join(f"t{(i * 31 + j * 7) % 997}" for j in range(n)),
                               max_tokens=m, ignore_eos=True, sampling=sampling)
            for i, (n, m) in enumerate([(5, 70), (300, 20), (40, 50), (130, 64), (17, 33), (220, 45)])]


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=7)],
                         ids=["greedy", "seeded sampling"])
def test_batched_tokens_equal_each_request_alone_and_the_eager_steps(sampling):
    """fp32: the graphed steps of a changing batch give each request the tokens it gets alone, and the tokens of
    eager steps."""
    graphed, eager = batch_engine(torch.float32), batch_engine(torch.float32, graphs=False)
    assert graphed.paged_decode is not None and graphed.paged_decode.graphs
    together = batch_tokens(graphed, tasks(sampling))
    assert [len(t) for t in together.values()] == [70, 20, 50, 64, 33, 45]
    for task in tasks(sampling):
        assert batch_tokens(graphed, [task])[task.task_id] == together[task.task_id], task.task_id
    assert batch_tokens(eager, tasks(sampling)) == together


def test_bf16_graphed_step_tracks_the_packed_forward():
    """bf16, 40 sequences in the bucket of 64: logits within rounding of the model's own packed forward, and the
    same greedy choice almost everywhere."""
    engine = batch_engine(torch.bfloat16)
    model, step = engine.model, engine.paged_decode
    assert step is not None
    reference = model.make_paged_cache(engine.num_blocks, engine.block_size)
    lengths = [10 + 7 * i for i in range(40)]
    tables, next_block = [], 0
    for length in lengths:
        count = -(-(length + 8) // engine.block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for length, table in zip(lengths, tables):
            prompt = torch.randint(0, CONFIG["vocab_size"], (length,), generator=generator)
            prefill = [SequenceStep(0, length, table)]
            for cache in (engine.cache, reference):
                model.forward_batch(prompt.cuda(), cache, BatchLayout.build(prefill, engine.block_size, "cuda",
                                                                            cache.pad_slot))
        tokens, agree = torch.randint(0, CONFIG["vocab_size"], (40,), generator=generator), 0
        for n in range(8):
            steps = [SequenceStep(length + n, 1, table) for length, table in zip(lengths, tables)]
            want = model.forward_batch(tokens.cuda(), reference, BatchLayout.build(steps, engine.block_size, "cuda",
                                                                                   reference.pad_slot)).float()
            got = step(tokens, steps).float()
            torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            tokens = want.argmax(-1).cpu()
    assert agree >= 0.95 * 8 * 40


class Counting:
    """The graphed step, counting its replays."""

    def __init__(self, step: Any) -> None:
        self.step, self.replays = step, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    def __call__(self, tokens: torch.Tensor, steps: list[SequenceStep]) -> torch.Tensor:
        self.replays += 1
        return self.step(tokens, steps)


@pytest.mark.parametrize("chunk", [30, 600], ids=["on one graph", "too long: the decodes on theirs"])
def test_a_step_of_decodes_and_prompt_chunks(chunk):
    """fp32: a step mixing decodes, a prompt's last chunk and an earlier chunk of another prompt gives the logits of
    the eager step over them all, in the steps' order: all on one graph where its tokens fit the largest bucket (the
    picks in the same order), else the decodes replayed from their graph and the chunks eager."""
    engine = batch_engine(torch.float32)
    assert engine.paged_decode is not None
    counting = engine.paged_decode = Counting(engine.paged_decode)  # type: ignore[assignment]
    width = 40  # blocks of engine.block_size: 640 positions a sequence
    tables = [list(range(width * i, width * (i + 1))) for i in range(6)]
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for table in tables[:4]:  # four sequences with 12 positions in their cache
            engine._forward_eager(torch.randint(0, CONFIG["vocab_size"], (12,), generator=generator),
                                  [SequenceStep(0, 12, table)])
    mixed = [SequenceStep(12, 1, tables[0]), SequenceStep(0, chunk, tables[4]), SequenceStep(12, 1, tables[1]),
             SequenceStep(0, 16, tables[5], wants_logits=False), SequenceStep(12, 1, tables[2]),
             SequenceStep(12, 1, tables[3])]
    tokens = torch.randint(0, CONFIG["vocab_size"], (sum(s.count for s in mixed),), generator=generator)
    with torch.inference_mode():
        got = engine.forward_batch(tokens, mixed).float()
        assert counting.replays == 1
        if chunk == 30:
            assert engine.last_picks is not None and engine.last_picks.tokens() == got.argmax(-1).tolist()
        else:
            assert engine.last_picks is None
        want = engine._forward_eager(tokens, mixed).float()  # the same keys and values written again
    assert got.shape == (5, CONFIG["vocab_size"])
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)
