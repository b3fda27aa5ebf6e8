"""Weights read tensor by tensor: a stage is built one layer at a time, so a load never holds the whole stage twice
(nor in fp32 when it computes in bf16 or runs int4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch


class LazyWeights(Mapping[str, torch.Tensor]):
    """Hugging Face-named tensors, each read from its file (and converted) only when it is looked up."""

    def __init__(self, readers: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)
