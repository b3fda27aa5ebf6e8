"""A tiny random-weight Starcoder2 checkpoint: an architecture mlx-lm has a model for and ringlet's torch models do
not (LayerNorms with biases, biased attention, an ungated GELU MLP), built and saved with transformers' own classes
over the embedded model's tokenizer; and transformers' logits and greedy tokens for it, the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.support.embedding_models import write_tokenizer

# mlx-lm's starcoder2 computes the exact GELU, attends every position and reads a top-level rope_theta (100000 where
# there is none, as transformers writes it in rope_parameters): the reference is told the same
CONFIG: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "norm_epsilon": 1e-5, "rope_theta": 100000.0,
          "hidden_act": "gelu", "sliding_window": None, "use_bias": True, "bos_token_id": 1, "eos_token_id": 2}


def starcoder2_checkpoint(directory: Path, tied: bool = True, seed: int = 0) -> Path:
    """A random Starcoder2 saved in `directory` (safetensors, config.json, the embedded model's tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer(directory, append_end_of_text=False)
    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    config = transformers.Starcoder2Config(vocab_size=vocab_size, tie_word_embeddings=tied, **CONFIG)
    torch.manual_seed(seed)
    model = transformers.Starcoder2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # not the ones and zeros of a fresh LayerNorm: a norm that is skipped must show
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(parameter))
            if name == "model.embed_tokens.weight":
                parameter.mul_(20)  # activations of a realistic size, not 0.02
    model.save_pretrained(directory)
    return directory


def reference_model(directory: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def reference_greedy(directory: Path, ids: list[int], tokens: int) -> list[int]:
    """transformers' greedy continuation of `ids`, `tokens` long (end-of-sequence tokens included)."""
    model = reference_model(directory)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens,  # type: ignore[operator]
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]
