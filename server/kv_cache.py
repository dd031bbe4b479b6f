"""The engine's KV cache, allocated as sequences need it rather than max rows x max tokens up front.

Two tensors `[layers, rows, kv_heads, length, head_dim]` in the compute dtype. Both the rows and the
length start small and grow (by half again, rounded up to `LENGTH_STEP` tokens) when a prefill or decode
step needs more, up to the ceiling the memory budget allows (`server.memory_budget`). Growth copies the
live part into a larger tensor; only the engine's worker thread touches the cache, so nothing else can be
reading it meanwhile. Rows stay packed at the front (`server.engine` moves the last row into a freed one),
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
        self.k = self._empty(0, 0)
        self.v = self._empty(0, 0)

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

    @torch.inference_mode()
    def ensure(self, rows: int, length: int, live_rows: int, live_len: int) -> None:
        """Make room for `rows` rows of `length` tokens, keeping the first `live_rows` x `live_len`.

        Raises:
            ValueError: beyond the ceiling (the engine checks rows and lengths before asking).
        """
        have_rows, have_len = self.k.shape[1], self.k.shape[3]
        if rows <= have_rows and length <= have_len:
            return
        if rows > self.max_rows or length > self.max_len:
            raise ValueError(f"KV cache asked for {rows} x {length}, above {self.max_rows} x {self.max_len}")
        new_rows = have_rows
        if rows > have_rows:
            new_rows = min(self.max_rows, max(rows, int(have_rows * GROWTH), MIN_ROWS))
        new_len = have_len
        if length > have_len:
            wanted = max(length, int(have_len * GROWTH))
            new_len = min(self.max_len, -(-wanted // LENGTH_STEP) * LENGTH_STEP)
        k, v = self._empty(new_rows, new_len), self._empty(new_rows, new_len)
        if live_rows and live_len:
            k[:, :live_rows, :, :live_len] = self.k[:, :live_rows, :, :live_len]
            v[:, :live_rows, :, :live_len] = self.v[:, :live_rows, :, :live_len]
        self.k, self.v = k, v

    @torch.inference_mode()  # the tensors are inference tensors (made during a forward)
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` tokens into row `dst` (keeps the live rows packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        shape = (self.layers, rows, self.kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)
