"""The Intel GPU engine ("ipex"): ringlet's shared model definitions on native `torch.xpu`, with IPEX
optimisations applied only when a version-matched intel-extension-for-pytorch is importable.

IPEX also has a CPU backend (AMX / AVX-512), which is how this engine is exercised on Xeon machines.
Nothing here imports IPEX; `utils_ipex` does, lazily, after checking the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ringlet.models.cache import StaticKVCache
from ringlet.models.loader import LoadedStage
from ringlet.models.tokenizer import Tokenizer

IpexMode = Literal["auto", "require", "off"]  # use IPEX when usable / fail without it / never use it


class IPEXEngineError(RuntimeError):
    """The ipex engine cannot run as asked; the message says what to do."""


class IPEXDriverError(IPEXEngineError):
    """No usable Intel GPU: PyTorch without XPU support, no Level Zero driver, or a failing device."""


class IPEXMemoryError(IPEXEngineError):
    """The model does not fit the device's free memory, or the device ran out of memory while generating."""

    def __init__(self, message: str, needed_bytes: int | None = None, free_bytes: int | None = None) -> None:
        super().__init__(message)
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes


class IPEXModel(Protocol):
    """A model stage as the ipex engine runs it: the shared definition, possibly IPEX-optimised or compiled."""

    def __call__(
        self, x: torch.Tensor, cache: StaticKVCache, start: int, last_logits_only: bool = False
    ) -> torch.Tensor: ...

    def make_cache(self, batch_size: int, max_seq_len: int) -> StaticKVCache: ...


@dataclass
class IpexLoadedModel:
    """A model loaded for the ipex engine (`utils_ipex.load_ipex_model`), ready to become an `IpexEngine`."""

    stage: LoadedStage
    model: IPEXModel
    precision: str
    context_length: int
    optimization: str  # what was applied, e.g. "ipex.optimize (bf16): 211 of 211 linear layers prepacked"
    ipex_version: str | None


class IPEXTokenizerWrapper(Tokenizer):
    """The torch engines' tokenizer, plus a bounds check on every encoded id.

    On an XPU an embedding lookup past the table is a device fault that loses the whole context (every
    later call fails), not the IndexError the CPU raises; so ids beyond the model's embedding rows (a
    tokenizer with added tokens the checkpoint lacks) are refused here, before they reach the device.
    """

    def __init__(self, tokenizer: Tokenizer, embedding_rows: int) -> None:
        super().__init__(
            tokenizer.backend, chat_template=tokenizer.chat_template, bos_token_id=tokenizer.bos_token_id,
            eos_token_ids=tokenizer.eos_token_ids, template_tokens=tokenizer.template_tokens,
        )
        self.embedding_rows = embedding_rows

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = super().encode(text, add_special_tokens=add_special_tokens)
        outside = sorted({i for i in ids if i >= self.embedding_rows})
        if outside:
            raise ValueError(
                f"the text encodes to token ids {outside[:5]} beyond the model's {self.embedding_rows} embedding "
                "rows: the tokenizer does not match the model's weights; use the tokenizer shipped with the model"
            )
        return ids


__all__ = ["IPEXDriverError", "IPEXEngineError", "IPEXMemoryError", "IPEXModel", "IPEXTokenizerWrapper",
           "IpexLoadedModel", "IpexMode"]
