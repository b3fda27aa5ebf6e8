"""Qwen3 (dense): the Llama block with an RMSNorm on each head of q and k (`qk_norm`), no biases."""

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.registry import register


@register("qwen3")
def build_qwen3(args: ModelArgs, start: int, end: int) -> Transformer:
    assert args.qk_norm, "qwen3 normalises q and k per head"
    return Transformer(args, start, end)
