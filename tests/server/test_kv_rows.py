"""The KV cache's row bookkeeping (`server.kv_rows`) on a small real cache and ledger, without a model."""

from __future__ import annotations

import torch

from server.kv_cache import LENGTH_STEP, KVCache
from server.kv_rows import KVRows
from server.memory_ledger import ADAPTERS, KV, MemoryLedger

LAYERS, HEADS, DIM, MAX_ROWS, MAX_LEN = 2, 1, 4, 8, 256


def _rows(budget_tokens: int) -> tuple[KVRows, MemoryLedger, list[int]]:
    kv = KVCache(
        layers=LAYERS, kv_heads=HEADS, head_dim=DIM, max_rows=MAX_ROWS, max_len=MAX_LEN,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    budget = budget_tokens * kv.bytes_per_token
    ledger = MemoryLedger(budget)
    limits: list[int] = []
    return KVRows(kv, ledger, budget, limits.append), ledger, limits


@torch.inference_mode()
def _fill(rows: KVRows, index: int, value: float) -> None:
    rows.kv.k[:, index] = value
    rows.kv.v[:, index] = -value


def test_make_room_grows_and_charges_and_the_last_release_frees_everything() -> None:
    rows, ledger, limits = _rows(budget_tokens=MAX_ROWS * MAX_LEN)
    assert rows.make_room([10, 20]) == 0
    assert rows.kv.shape[0] >= 2 and rows.kv.shape[1] >= 20
    assert ledger.charged(KV) == rows.kv.nbytes > 0
    assert limits[-1] == rows.budget - rows.kv.nbytes  # what the cache leaves the adapters
    rows.add([7, 8], [1, 2], lengths=[5, 6], reserves=[10, 20])
    rows.advance()
    assert [(r.seq_id, r.length, r.reserve) for r in rows.rows] == [(7, 6, 10), (8, 7, 20)]
    assert rows.used_bytes == 13 * rows.kv.bytes_per_token
    rows.release(7)
    rows.release(8)
    assert rows.rows == [] and rows.kv.nbytes == 0 == ledger.charged(KV)
    assert limits[-1] == rows.budget


def test_a_released_row_is_replaced_by_the_last_one_with_its_keys_and_values() -> None:
    rows, _, _ = _rows(budget_tokens=MAX_ROWS * MAX_LEN)
    rows.make_room([8, 8, 8])
    rows.add([1, 2, 3], [0, 0, 0], lengths=[4, 4, 4], reserves=[8, 8, 8])
    for index in range(3):
        _fill(rows, index, float(index + 1))
    rows.release(1)
    rows.release(99)  # unknown: a no-op
    assert rows.active_ids == [3, 2]
    assert torch.equal(rows.kv.k[:, 0, :, :4], torch.full_like(rows.kv.k[:, 0, :, :4], 3.0))
    assert torch.equal(rows.kv.v[:, 0, :, :4], torch.full_like(rows.kv.v[:, 0, :, :4], -3.0))


def test_a_short_budget_changes_nothing_and_claims_the_room_from_adapters() -> None:
    rows, ledger, _ = _rows(budget_tokens=2 * LENGTH_STEP)
    ledger.set(ADAPTERS, ledger.budget - LENGTH_STEP * rows.kv.bytes_per_token)
    short = rows.make_room([LENGTH_STEP, LENGTH_STEP])
    assert short == LENGTH_STEP * rows.kv.bytes_per_token
    assert rows.kv.nbytes == 0 == ledger.charged(KV)
    assert ledger.room(ADAPTERS) == 0  # the claim keeps adapter loads off the bytes the head waits for
    ledger.set(ADAPTERS, 0)
    assert rows.make_room([LENGTH_STEP, LENGTH_STEP]) == 0
    assert ledger.room(ADAPTERS) == ledger.budget - rows.kv.nbytes  # the claim is withdrawn once it fits
