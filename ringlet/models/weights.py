"""Weights read tensor by tensor: a stage is built one layer at a time, so a load never holds the whole stage twice
(nor in fp32 when it computes in bf16 or runs int4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch


class RowReader(NamedTuple):
    """A 2-d tensor's rows [first, end), read in the dtype the weights give, a slice at a time."""

    rows: int
    columns: int
    read: Callable[[int, int], torch.Tensor]


class LazyWeights(Mapping[str, torch.Tensor]):
    """Hugging Face-named tensors, each read from its file (and converted) only when it is looked up; those with a
    `RowReader` can also be read a slice of rows at a time (`row_reader`)."""

    def __init__(self, readers: Mapping[str, Callable[[], torch.Tensor]],
                 row_readers: Mapping[str, RowReader] | None = None) -> None:
        self._readers = dict(readers)
        self._row_readers = dict(row_readers or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def row_reader(weights: Mapping[str, torch.Tensor], name: str) -> RowReader:
    """The rows of weight `name`, read from its file a slice at a time where `weights` can, else sliced from the
    whole tensor."""
    if isinstance(weights, LazyWeights) and name in weights._row_readers:
        return weights._row_readers[name]
    tensor = weights[name]
    return RowReader(tensor.shape[0], tensor.shape[1], lambda first, end: tensor[first:end])
