"""A tiny random Llama (fp32, peaked logits so greedy choices are no near-ties) with a synthetic word tokenizer:
enough to test generation loops in milliseconds."""

from __future__ import annotations

import torch

from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import random_weights, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.shared.config import EngineConfig
from ringlet.worker.engines.torch.batch_engine import TorchBatchEngine

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257, "max_position_embeddings": 1024,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def tiny_stage(seed: int = 0) -> LoadedStage:
    args = model_args(CONFIG)
    weights = random_weights(args, torch.float32, "cpu", seed=seed)
    weights["model.embed_tokens.weight"] *= 50  # peaked logits: greedy choices are not near-ties
    weights["lm_head.weight"] *= 50
    model = build_stage(args, weights=weights, dtype=torch.float32, device="cpu")
    return LoadedStage(args, model, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers)


def tiny_batch_engine(config: EngineConfig = EngineConfig(kv_cache_tokens=4096), seed: int = 0) -> TorchBatchEngine:
    return TorchBatchEngine(tiny_stage(seed), torch.device("cpu"), config)


def words(*numbers: int) -> str:
    """A prompt of the synthetic tokenizer's words (t3 t14 ...)."""
    return " ".join(f"t{n}" for n in numbers)
