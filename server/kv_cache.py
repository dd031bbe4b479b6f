"""The engine's KV cache, allocated as sequences need it rather than max rows x max tokens up front.

Two tensors `[layers, rows, kv_heads, length, head_dim]` in the compute dtype. Both the rows and the
length start small and grow (by half again, rounded up to `LENGTH_STEP` tokens) when a prefill or decode
step needs more, up to the ceiling the memory budget allows (`server.memory_budget`). Growth copies the
live part into a larger tensor (both exist for the copy; the budget bounds what stays allocated); only the
engine's worker thread touches the cache, so nothing else can be reading it meanwhile. The engine charges
what is allocated to the shared budget (`server.memory_ledger`) and may ask for a `tight` shape (no growth
slack) when the budget is short, or `clear` the cache when no sequence runs, so idle KV memory is given
back to adapters. Rows stay packed at the front (`server.kv_rows` moves the last row into a freed one),
so `server.attention` reads plain views `[:rows, :, :length]` whatever the allocation.

Boundary: tensors only; which sequence owns which row is the engine's business.
"""

from __future__ import annotations

import torch

LENGTH_STEP = 64
"""Allocated lengths are multiples of this many tokens (fewer, larger growth steps)."""
GROWTH = 1.5
"""A full dimension grows to at least this factor of its allocation."""
MIN_ROWS = 4
"""Rows allocated at least (the first few requests do not each reallocate the cache)."""


class KVCache:
    """Keys and values of every layer for the rows in flight, grown on demand up to `max_rows` x `max_len`."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        max_rows: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_rows, self.max_len = max_rows, max_len
        self.dtype, self.device = dtype, device
        self.clear()

    @staticmethod
    def token_bytes(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token of one row takes in the cache (keys and values of every layer)."""
        return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.token_bytes(self.layers, self.kv_heads, self.head_dim, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return self.k.nbytes + self.v.nbytes

    @property
    def max_nbytes(self) -> int:
        """Bytes at the ceiling (every row at full length)."""
        return self.max_rows * self.max_len * self.bytes_per_token

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, length) allocated now."""
        return self.k.shape[1], self.k.shape[3]

    def shape_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes of an allocation of `shape` (rows, length)."""
        return shape[0] * shape[1] * self.bytes_per_token

    def shape_for(self, rows: int, length: int, *, tight: bool = False) -> tuple[int, int]:
        """The allocation that holds `rows` rows of `length` tokens: the current one if it does, else grown
        by `GROWTH`; `tight`: exactly what is asked (length rounded up to `LENGTH_STEP`), even if smaller.

        Raises:
            ValueError: beyond the ceiling (the engine checks rows and lengths before asking).
        """
        if rows > self.max_rows or length > self.max_len:
            raise ValueError(f"KV cache asked for {rows} x {length}, above {self.max_rows} x {self.max_len}")
        if tight:
            return rows, min(self.max_len, -(-length // LENGTH_STEP) * LENGTH_STEP)
        have_rows, have_len = self.shape
        new_rows = have_rows
        if rows > have_rows:
            new_rows = min(self.max_rows, max(rows, int(have_rows * GROWTH), MIN_ROWS))
        new_len = have_len
        if length > have_len:
            wanted = max(length, int(have_len * GROWTH))
            new_len = min(self.max_len, -(-wanted // LENGTH_STEP) * LENGTH_STEP)
        return new_rows, new_len

    @torch.inference_mode()
    def ensure(self, rows: int, length: int, live_rows: int, live_len: int) -> None:
        """Make room for `rows` rows of `length` tokens, keeping the first `live_rows` x `live_len`.

        Raises:
            ValueError: beyond the ceiling.
        """
        self.resize(self.shape_for(rows, length), live_rows, live_len)

    @torch.inference_mode()
    def resize(self, shape: tuple[int, int], live_rows: int, live_len: int) -> None:
        """Reallocate as `shape`, keeping the first `live_rows` x `live_len` (which must fit it)."""
        if shape == self.shape:
            return
        if not (live_rows and live_len):
            self.clear()  # nothing to copy: free the old tensors before allocating the new ones
        k, v = self._empty(*shape), self._empty(*shape)
        if live_rows and live_len:
            k[:, :live_rows, :, :live_len] = self.k[:, :live_rows, :, :live_len]
            v[:, :live_rows, :, :live_len] = self.v[:, :live_rows, :, :live_len]
        self.k, self.v = k, v

    def clear(self) -> None:
        """Free the allocation (the engine calls it when no row is live)."""
        self.k = self._empty(0, 0)
        self.v = self._empty(0, 0)

    @torch.inference_mode()  # the tensors are inference tensors (made during a forward)
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` tokens into row `dst` (keeps the live rows packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        shape = (self.layers, rows, self.kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)
