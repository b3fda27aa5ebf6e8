"""Qwen2 / Qwen2.5: the Llama block with biases on the q/k/v projections (`attention_bias`)."""

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.registry import register


@register("qwen2")
def build_qwen2(args: ModelArgs, start: int, end: int) -> Transformer:
    assert args.attention_bias, "qwen2 checkpoints carry q/k/v biases"
    return Transformer(args, start, end)
