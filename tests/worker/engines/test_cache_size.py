"""The positions of a batching engine's KV cache: as configured, else a few windows (a CPU's) or a batch of them (a
GPU's) in a share of the memory the weights leave, never more than the instance's placement counted, and never
less than one window."""

from __future__ import annotations

import torch

from ringlet.models.paged_cache import PagedKVCache
from ringlet.shared.config import CPU_CONTEXTS, EngineConfig
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine, kv_cache_tokens
from tests.support.tiny_model import CONFIG, tiny_stage

CPU = torch.device("cpu")
ROOMY = 1 << 40


def per_token() -> int:
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    return PagedKVCache.bytes_per_block(CONFIG["num_hidden_layers"], 1, CONFIG["num_key_value_heads"], head_dim,
                                        torch.float32)


def test_a_cpu_caches_a_few_windows_where_a_quarter_of_the_memory_holds_them() -> None:
    stage = tiny_stage()
    assert kv_cache_tokens(stage, CPU, EngineConfig(), 1024, ROOMY) == CPU_CONTEXTS * 1024
    assert kv_cache_tokens(stage, CPU, EngineConfig(), 1024, 4 * 2000 * per_token()) == 2000
    assert kv_cache_tokens(stage, CPU, EngineConfig(), 1024, 0) == 1024, "one window at least"


def test_the_cache_holds_no_more_than_the_placement_counted() -> None:
    stage = tiny_stage()
    assert kv_cache_tokens(stage, CPU, EngineConfig(kv_cache_plan=3000), 1024, ROOMY) == 3000
    assert kv_cache_tokens(stage, CPU, EngineConfig(kv_cache_plan=3000), 1024, 4 * 2000 * per_token()) == 2000, \
        "nor more than the memory found free holds"
    assert kv_cache_tokens(stage, CPU, EngineConfig(kv_cache_plan=100), 1024, ROOMY) == 1024, "one window at least"
    assert kv_cache_tokens(stage, CPU, EngineConfig(kv_cache_tokens=512, kv_cache_plan=3000), 1024, ROOMY) == 512, \
        "a node's own setting wins"


def test_the_engine_allocates_the_planned_cache() -> None:
    engine = TorchBatchEngine(tiny_stage(), CPU, EngineConfig(max_context=256, kv_cache_plan=800, cpu_compile=False))
    assert engine.num_blocks * engine.block_size == engine.cache.num_blocks * engine.cache.block_size == 800
