"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (`phi3`): the Llama block, its checkpoint holding q/k/v and gate/up already
fused (`Transformer.load_weights` takes them as they are), rotary scaling by longrope (`rope.py`), a rotary embedding
on part of each head with a `partial_rotary_factor` (Phi-4-mini's 0.75), a served context capped by its sliding
window (`ModelArgs.context_length`). Its dropouts (`resid_pdrop`, `embd_pdrop`, `attention_dropout`) act in training
only."""

from ringlet.models.config import ModelArgs
from ringlet.models.llama import Transformer
from ringlet.models.registry import register


@register("phi3")
def build_phi3(args: ModelArgs, start: int, end: int) -> Transformer:
    assert not args.attention_bias and not args.qk_norm, "phi3 projections have no bias and no q/k norm"
    return Transformer(args, start, end)
