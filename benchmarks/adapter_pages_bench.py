"""Micro-benchmark: per-row LoRA over rank-sized pages vs the former [slots, in, r_max] slot banks.

For smollm2-135m's linear shapes (hidden 576, intermediate 1536) and a batch of rows using adapters of
mixed ranks, it times (median microseconds per linear):
- `gather`: collecting the rows' factors once per batch composition (a prefill, or a decode batch that
  changed): `index_select` over slot banks sliced to the batch's rank, vs page table -> page gather;
- `step`: one decode step's delta over the gathered factors (identical shapes for both layouts, so this
  checks that nothing else changed);
and the bytes each layout holds for the adapters resident. Boundary: imports `server.adapter_pages` (the
new layout) and rebuilds the old one inline with torch.

Run:
    python -m benchmarks.adapter_pages_bench --rows 8 --ranks 8 16 64 --adapters 16
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from benchmarks.lora_kernels_bench import timed
from server.adapter_pages import LoraBank

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "gate_proj": (576, 1536), "down_proj": (1536, 576)}


def run(rows: int, ranks: list[int], adapters: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    results = []
    for name, (d_in, d_out) in SHAPES.items():
        slot_ranks = [ranks[i % len(ranks)] for i in range(adapters)]
        old_a = torch.zeros(adapters + 1, d_in, max(64, *ranks), dtype=dtype)
        old_b = torch.zeros(adapters + 1, max(64, *ranks), d_out, dtype=dtype)
        bank = LoraBank(adapters + 1, d_in, d_out, max(64, *ranks), dtype, "cpu")
        for slot, r in enumerate(slot_ranks, start=1):
            a, b = torch.randn(r, d_in), torch.randn(d_out, r)
            old_a[slot, :, :r] = a.t()
            old_b[slot, :r] = b.t()
            bank.write(slot, a, b, 1.0)
        slots = torch.tensor([1 + i % adapters for i in range(rows)])
        rank = max(slot_ranks[int(s) - 1] for s in slots)
        x, y = torch.randn(rows, 1, d_in, dtype=dtype), torch.randn(rows, 1, d_out, dtype=dtype)

        def old_gather(slots=slots, rank=rank, old_a=old_a, old_b=old_b):
            return old_a[:, :, :rank].index_select(0, slots), old_b[:, :rank].index_select(0, slots)

        def new_gather(slots=slots, rank=rank, bank=bank):
            bank._gathered = {}
            ctx = SimpleNamespace(
                key=(tuple(slots.tolist()), rank), rank=rank, slots=slots, uniform_slot=None
            )
            return bank._factors(ctx)

        a, b = new_gather()
        oa, ob = old_gather()
        torch.testing.assert_close(a, oa)
        results.append(
            {
                "linear": name,
                "rows": rows,
                "batch_rank": rank,
                "gather_old_us": timed(old_gather, repeats),
                "gather_pages_us": timed(new_gather, repeats),
                "step_old_us": timed(
                    lambda y=y, x=x, oa=oa, ob=ob: torch.baddbmm(y, torch.bmm(x, oa), ob), repeats
                ),
                "step_pages_us": timed(
                    lambda y=y, x=x, a=a, b=b: torch.baddbmm(y, torch.bmm(x, a), b), repeats
                ),
                "bytes_old": old_a.nbytes + old_b.nbytes,
                "bytes_pages": bank.nbytes,
                "bytes_pages_used": bank.used_bytes,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for row in run(args.rows, args.ranks, args.adapters, dtype, args.repeats):
        print(json.dumps(row))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
