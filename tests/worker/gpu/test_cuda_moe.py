"""Mixture-of-experts models in the batched CUDA engine on a real GPU (skipped cleanly without one; run through the
device tool): the graphed decode step's routing and expert kernels against the eager packed forward."""

from __future__ import annotations

import pytest
import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.paged_cache import BatchLayout, SequenceStep
from ringlet.models.quant import int8_linear, quantize_layer_int4
from ringlet.models.quant_cuda import CUDA_GROUP_SIZE, CudaInt4Experts
from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.shared.tasks import SamplingParams, TextGenerationTask
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine
from tests.support.greedy import batch_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# sparse layers with a dense one between them; experts as wide as the kernels' tiles and narrower than them
CONFIG = {"model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 384,
          "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [2],
          "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
          "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
          "tie_word_embeddings": False}
SETTINGS = EngineConfig(max_context=1024, max_batch=16, kv_cache_tokens=16 * 1024)


def batch_engine(dtype: torch.dtype, graphs: bool = True, int4: bool = False) -> TorchBatchEngine:
    args = model_args(CONFIG)
    weights = random_weights(args, dtype, "cuda", seed=1)
    weights["model.embed_tokens.weight"] *= 50  # peaked logits: greedy choices are not near-ties
    for name in weights:
        if name.endswith("mlp.gate.weight"):
            weights[name] *= 50  # routers that choose: the experts' weights differ
    model = build_stage(args, weights=weights, dtype=dtype, device="cuda")
    if int4:  # as load_stage rounds a layer for --precision int4 on CUDA
        for index, layer in enumerate(model.layers):
            quantize_layer_int4(layer, index, dtype, {}, False, CUDA_GROUP_SIZE)
        model.lm_head = int8_linear(model.lm_head.weight.data, None, dtype)
        assert all(isinstance(b.mlp.experts, CudaInt4Experts) for b in model.layers if hasattr(b.mlp, "experts"))
    stage = LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)
    engine = TorchBatchEngine(stage, torch.device("cuda"), SETTINGS)
    if not graphs:
        engine.paged_decode = None
    engine.warmup()
    return engine


def test_graphed_moe_steps_give_the_eager_steps_tokens():
    """fp32: requests joining and leaving a batch get from the graphed steps the tokens the eager steps give."""
    graphed, eager = batch_engine(torch.float32), batch_engine(torch.float32, graphs=False)
    assert graphed.paged_decode is not None and graphed.paged_decode.graphs
    tasks = [TextGenerationTask(task_id=f"task-{i}", prompt=" ".join(f"t{(i * 31 + j * 7) % 997}" for j in range(n)),
                                max_tokens=m, ignore_eos=True, sampling=SamplingParams(temperature=0))
             for i, (n, m) in enumerate([(5, 40), (120, 20), (33, 30), (64, 12)])]
    together = batch_tokens(graphed, tasks)
    assert [len(t) for t in together.values()] == [40, 20, 30, 12]
    assert batch_tokens(eager, tasks) == together


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_moe_step_tracks_the_packed_forward(rows, precision):
    """bf16 experts, or int4 ones (`CudaInt4Experts`: the graphed step's int4 expert kernels against the eager
    forward's int4 linear per expert)."""
    engine = batch_engine(torch.bfloat16, int4=precision == "int4")
    model, step = engine.model, engine.paged_decode
    assert step is not None
    reference = model.make_paged_cache(engine.num_blocks, engine.block_size)
    lengths = [12 + 9 * i for i in range(rows)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(rows)]
    generator = torch.Generator().manual_seed(5)
    agree = 0
    with torch.inference_mode():
        for length, table in zip(lengths, tables):
            prompt = torch.randint(0, CONFIG["vocab_size"], (length,), generator=generator).cuda()
            for cache in (engine.cache, reference):
                model.forward_batch(prompt, cache, BatchLayout.build([SequenceStep(0, length, table)],
                                                                     engine.block_size, "cuda", cache.pad_slot))
        tokens = torch.randint(0, CONFIG["vocab_size"], (rows,), generator=generator)
        for n in range(6):
            steps = [SequenceStep(length + n, 1, table) for length, table in zip(lengths, tables)]
            want = model.forward_batch(tokens.cuda(), reference, BatchLayout.build(steps, engine.block_size, "cuda",
                                                                                   reference.pad_slot)).float()
            got = step(tokens, steps).float()
            torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            tokens = want.argmax(-1).cpu()
    assert agree >= 0.9 * 6 * rows

