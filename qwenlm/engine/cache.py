"""KV caches of the engines: preallocated (L, B, H_kv, S, D) tensors written by index, never
reallocated, so a decode step has fixed shapes and can be captured in a CUDA graph.

Keys and values are kept in the model's dtype, or in 8 bits (`int8=True`, the format and why it
differs from the original's: quant/kv.py).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..quant.kv import dequantize_kv, key_center, quantize_kv


class KVStore:
    """Keys and values of every layer. Writers and readers address a layer's (B, H_kv, S[, D])
    tensors through a `put(dst, x)` / `take(t)` function, the same for the codes and their scales."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device, int8: bool = False):
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.dtype, self.int8 = dtype, int8
        store = torch.uint8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        # per (layer, row, head, slot): scale and low of keys, then of values (empty when not int8)
        meta = shape[:-1] if int8 else (num_layers, 0)
        self.k_scale, self.k_low, self.v_scale, self.v_low = (
            torch.zeros(meta, dtype=torch.float16, device=device) for _ in range(4))
        # per (layer, row, head): the vector subtracted from every key of the row (quant/kv.py)
        self.k_center = torch.zeros((num_layers, batch, kv_heads, head_dim) if int8 else (num_layers, 0),
                                    dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool) -> int:
        per_head = head_dim + 4 if int8 else head_dim * dtype.itemsize
        return 2 * num_layers * kv_heads * per_head

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v, self.k_scale, self.k_low, self.v_scale, self.v_low, self.k_center)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape)

    def store(self, i: int, k: torch.Tensor, v: torch.Tensor, put: Callable, rows: slice = slice(None),
              first: bool = False, mask: torch.Tensor | None = None) -> None:
        """Write layer i's new keys/values (B', H_kv, T, D) of cache rows `rows` with
        `put(layer_tensor, value)`; `first`: the rows' first chunk, which sets their key centers
        (over the chunk's real tokens, `mask` (B', T))."""
        if not self.int8:
            put(self.k[i], k)
            put(self.v[i], v)
            return
        if first:
            self.k_center[i, rows] = key_center(k, mask)
        k = k.float() - self.k_center[i, rows][:, :, None]
        for x, codes, scale, low in ((k, self.k, self.k_scale, self.k_low), (v, self.v, self.v_scale, self.v_low)):
            q, s, lo = quantize_kv(x)
            put(codes[i], q)
            put(scale[i], s)
            put(low[i], lo)

    def load(self, i: int, take: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys/values `take(layer_tensor)` (a slice of rows and slots), in the model dtype."""
        if not self.int8:
            return take(self.k[i]), take(self.v[i])
        return (dequantize_kv(take(self.k[i]), take(self.k_scale[i]), take(self.k_low[i]), self.dtype),
                dequantize_kv(take(self.v[i]), take(self.v_scale[i]), take(self.v_low[i]), self.dtype))

    def move_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first n slots of row src into row dst, in every layer."""
        if not self.int8:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
            return
        for t in self.tensors[:-1]:
            t[:, dst, :, :n] = t[:, src, :, :n]
        self.k_center[:, dst] = self.k_center[:, src]

    # swap_rows sets aside at most this much at a time, per device type (others: one layer at a time)
    SWAP_BYTES = {"cuda": 32 << 20}

    def swap_rows(self, a: int, b: int, na: int, nb: int) -> None:
        """Row a's first na slots go to row b and row b's first nb slots to row a, in every layer.
        A finished stream's swap runs between decode steps, three copies per tensor and group of
        layers. On a GPU, as many layers at a time as keep the copy set aside under SWAP_BYTES (one
        layer at a time was 192 launches for a 32-layer float cache, about a millisecond of launching);
        on a CPU one layer at a time, whose copy stays in the processor's cache for its write-back
        (grouping 32 layers of 384 slots took 2.5-3x as long there)."""
        budget = self.SWAP_BYTES.get(self.k.device.type, 0)
        for t in self.tensors[:-1] if self.int8 else self.tensors[:2]:
            per_layer = max(1, t[0, a, :, :na].numel() * t.element_size())
            step = max(1, budget // per_layer)
            for i in range(0, t.shape[0], step):
                part = t[i:i + step]
                keep = part[:, a, :, :na].clone()
                part[:, a, :, :nb] = part[:, b, :, :nb]
                part[:, b, :, :na] = keep
        if self.int8:
            keep = self.k_center[:, a].clone()  # (not indexed by a list: that would wait for the device)
            self.k_center[:, a] = self.k_center[:, b]
            self.k_center[:, b] = keep

    def copy_prefix(self, src: "KVStore", n: int) -> None:
        """Copy slots [0, n) of every row and layer from `src`, a store of the same rows and format."""
        self.k[:, :, :, :n] = src.k[:, :, :, :n]
        self.v[:, :, :, :n] = src.v[:, :, :, :n]
        if self.int8:
            for dst, t in zip(self.tensors[2:-1], src.tensors[2:-1]):
                dst[:, :, :, :n] = t[:, :, :, :n]
            self.k_center.copy_(src.k_center)

    def kernel_layer(self, i: int, b: int) -> tuple[torch.Tensor, ...]:
        """Layer i's rows [0, b) for the decode kernels (fused CPU step, Triton attention): k, v, the four
        scale tensors and the key centers (all but k and v empty for a float cache). Views, made once per
        (i, b): the store's tensors are never reallocated."""
        views = self.__dict__.setdefault("_kernel_views", {})
        key = (i, b)
        if key not in views:
            views[key] = tuple(t[i, :b] if self.int8 or j < 2 else t[i] for j, t in enumerate(self.tensors))
        return views[key]


class StaticKVCache(KVStore):
    """Layer `i` writes its new keys/values at slots `write_pos` (the same for every row) and reads
    slots [0, read_len). `read_len=None` means "attend to the new chunk only" (a prefill into an
    empty cache): the chunk's own exact values, whatever the storage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_pos: torch.Tensor | None = None  # (T,) slots of the current chunk
        self.read_len: int | None = None
        self.chunk_mask: torch.Tensor | None = None  # (B, T) real tokens of a prefill chunk (None: all)

    def put_at_write_pos(self, dst: torch.Tensor, x: torch.Tensor) -> None:
        dst.index_copy_(2, self.write_pos, x)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store(i, k, v, self.put_at_write_pos, first=self.read_len is None, mask=self.chunk_mask)
        if self.read_len is None:
            return k, v
        n = self.read_len
        return self.load(i, lambda t: t[:, :, :n])


class KernelAttention:
    """A decode step's attention through the Triton kernel (kernels/attention.py): layer i writes the
    new token's key/value with `write(i, k, v)`, then its rows [0, B) attend to their slots
    [start, end) read straight from the store (8-bit codes included). Set as `ForwardContext.decode`."""

    def __init__(self, kv: KVStore, write: Callable, start: torch.Tensor, end: torch.Tensor, length: int,
                 slots: torch.Tensor | None = None):
        self.kv, self.write, self.length = kv, write, length
        self.start, self.end = start.to(torch.int32), end.to(torch.int32)
        # `slots` (B,): where each row's new key/value goes. Given (the engines give it where
        # `fused_rotary_on`), the rotary embedding and the write (8-bit: the quantization too) are one kernel
        self.slots = slots

    @property
    def rotates(self) -> bool:
        """Whether `attend_rotating` takes the un-rotated q/k (attend() then skips its own rotary)."""
        return self.slots is not None

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from ..kernels.attention import decode_attention

        self.write(i, k, v)
        layer = self.kv.kernel_layer(i, q.shape[0])[:6]  # k, v and their scales (not the key centers)
        return decode_attention(q[:, :, 0], layer, self.start, self.end, self.length)[:, :, None]

    def attend_rotating(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, logn: torch.Tensor | None) -> torch.Tensor:
        """`attend` for q/k not yet rotated: rotary, LogN and the cache write in one kernel first."""
        from ..kernels.attention import decode_attention
        from ..kernels.rotary import rotary_store

        layer = self.kv.kernel_layer(i, q.shape[0])
        q = rotary_store(q, k, v, cos, sin, logn, layer[0], layer[1], self.slots,
                         int8=layer[2:7] if self.kv.int8 else None)
        return decode_attention(q, layer[:6], self.start, self.end, self.length)[:, :, None]


def fused_rotary_on(device, dtype: torch.dtype, int8: bool, head_dim: int) -> bool:
    """Whether the engines' kernel-attention decode steps rotate, quantize (8-bit caches) and write
    keys/values in one kernel (kernels/rotary.py), unless QWENLM_FUSE_ROTARY=0 or the kernel fails its
    check on this device (kernels.kernel_works). Decided when an engine starts, not inside a captured step."""
    from ..kernels import kernel_works

    if head_dim & (head_dim - 1) or os.environ.get("QWENLM_FUSE_ROTARY") == "0":
        return False
    return kernel_works("rotary", device, dtype, head_dim=head_dim, int8=int8)


def kernel_attention_on(device, dtype: torch.dtype, int8: bool, head_dim: int) -> bool:
    """Whether the engines' decode steps use the Triton attention kernel on `device` for this cache
    (checked once against plain attention: kernels.kernel_works)."""
    from ..kernels import kernel_works

    if head_dim & (head_dim - 1):  # the kernel tiles whole power-of-two heads
        return False
    return kernel_works("attention", device, dtype, int8=int8, head_dim=head_dim)


class RowWriter:
    """KV cache adapter for a prefill into rows [row, row + B) of the chunk at slots [start, start + T):
    write it, then attend to slots [0, start + T) (a first chunk, start 0, to its own exact values).
    `valid` (B, T): the real tokens of right-padded prompts (None: all)."""

    def __init__(self, kv: KVStore, row: int, valid: torch.Tensor | None = None, start: int = 0):
        self.kv, self.row, self.valid, self.start = kv, row, valid, start

    def update(self, i, k, v):
        b, t, row, s = k.shape[0], k.shape[2], self.row, self.start
        self.kv.store(i, k, v, lambda dst, x: dst[row:row + b, :, s:s + t].copy_(x), slice(row, row + b),
                      first=s == 0, mask=self.valid)
        if s == 0:
            return k, v
        return self.kv.load(i, lambda x: x[row:row + b, :, :s + t])


class ExtendWriter:
    """KV cache adapter for reading the rests of several prompts into rows [row, row + B) whose first
    slots hold their prefixes: row b's token j is written at slot slots[b, j], then every row attends
    to slots [0, span) (the mask keeps each token to its own)."""

    def __init__(self, kv: KVStore, row: int, slots: torch.Tensor, span: int):
        self.kv, self.row, self.slots, self.span = kv, row, slots, span
        self.rows = torch.arange(row, row + slots.shape[0], device=slots.device)[:, None].expand_as(slots)

    def _put(self, dst, x):
        dst[self.rows, :, self.slots] = x.movedim(2, 1)  # (B, H, T[, D]) -> (B, T, H[, D])

    def update(self, i, k, v):
        row, b, span = self.row, k.shape[0], self.span
        self.kv.store(i, k, v, self._put, slice(row, row + b))
        return self.kv.load(i, lambda t: t[row:row + b, :, :span])


class StepWriter:
    """KV cache adapter for a decode step of rows [0, n): row r writes its token at slot pos[r]
    and reads slots [0, length)."""

    def __init__(self, kv: KVStore, n: int, pos: torch.Tensor, length: int):
        self.kv, self.n, self.pos, self.length = kv, n, pos, length
        self.rows = torch.arange(n, device=pos.device)

    def _put(self, dst, x):
        dst[self.rows, :, self.pos] = x[:, :, 0]

    def write(self, i, k, v):
        self.kv.store(i, k, v, self._put, slice(0, self.n))

    def update(self, i, k, v):
        self.write(i, k, v)
        n, length = self.n, self.length
        return self.kv.load(i, lambda t: t[:n, :, :length])
