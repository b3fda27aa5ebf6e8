"""Mistral: the Llama block; a sliding window, where set, bounds the context we serve."""

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.registry import register


@register("mistral")
def build_mistral(args: ModelArgs, start: int, end: int) -> Transformer:
    return Transformer(args, start, end)
