"""Static KV cache: preallocated (L, B, H_kv, S, D) tensors written by index, never reallocated,
so a decode step has fixed shapes and can be captured in a CUDA graph."""

from __future__ import annotations

import torch


class StaticKVCache:
    """Layer `i` writes its new keys/values at slots `write_pos` and reads slots [0, read_len).

    `read_len=None` means "attend to the new chunk only" (a prefill into an empty cache)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.write_pos: torch.Tensor | None = None  # (T,) slots of the current chunk
        self.read_len: int | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[i].index_copy_(2, self.write_pos, k)
        self.v[i].index_copy_(2, self.write_pos, v)
        if self.read_len is None:
            return k, v
        return self.k[i, :, :, :self.read_len], self.v[i, :, :, :self.read_len]
