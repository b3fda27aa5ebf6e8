"""Static (preallocated) key/value cache handed to the model.

One buffer per local layer, shaped [batch, kv_heads, max_seq_len, head_dim], written in place. Where a
sequence stands is the caller's to know: each write says its start (`TextGenerator.cached` for the engines).
"""

from __future__ import annotations

import torch

from ringlet.shared.errors import ContextWindowError


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len

    def update_and_fetch(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v at positions [start, start+len) and return the cache up to that end.

        With a tensor `start` (a decode step with static shapes) the first `kv_len` positions come back,
        and the caller masks those past `start`.
        """
        if isinstance(start, torch.Tensor):
            assert kv_len is not None
            self.keys[layer].index_copy_(2, start, k)
            self.values[layer].index_copy_(2, start, v)
            return self.keys[layer][:, :, :kv_len], self.values[layer][:, :, :kv_len]
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ContextWindowError(f"sequence of {end} tokens exceeds the cache of {self.max_seq_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
