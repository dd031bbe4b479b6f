"""What paging the KV cache would cost the engine as it is: gathering every row's pages, per layer per step.

The engine's attention (`server.attention`) hands torch's SDPA plain `[rows, kv_heads, length, head_dim]`
views of a dense KV cache. A paged cache (pages of `--page` tokens per sequence, as vLLM and S-LoRA keep it)
would have to gather each row's pages into such a tensor for every layer of every decode step, since SDPA on
CPU reads contiguous memory and has no page-table input. This times that gather (keys and values, every
layer of smollm2-135m: 30 layers, 3 KV heads of 64, bf16) for the rows and lengths given, beside nothing
else, so the cost can be set against a decode step (about 70-110 ms at 16 rows on this machine,
`benchmarks/results/lora_decode_ab.md`).

Run: python -m benchmarks.kv_gather_cost --out benchmarks/results/kv_gather_cost
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_report import invocation, write_results

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
"""smollm2-135m's KV shape."""


def gather_ms(rows: int, length: int, page: int, repeats: int) -> float:
    """Median ms to gather `rows` sequences of `length` tokens from a shuffled pool (all layers, K, V)."""
    pages_per_row = -(-length // page)
    pool_pages = rows * pages_per_row
    pools = [torch.randn(pool_pages, KV_HEADS, page, HEAD_DIM).bfloat16() for _ in range(2 * LAYERS)]
    table = torch.randperm(pool_pages).view(rows, pages_per_row)  # scattered, as after churn
    index = table.reshape(-1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for pool in pools:
            gathered = pool.index_select(0, index).view(rows, pages_per_row, KV_HEADS, page, HEAD_DIM)
            gathered.transpose(1, 2).reshape(rows, KV_HEADS, pages_per_row * page, HEAD_DIM)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 768, 1024])
    parser.add_argument("--page", type=int, default=64, help="tokens per page")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = []
    for rows in args.rows:
        for length in args.lengths:
            ms = gather_ms(rows, length, args.page, args.repeats)
            table.append({"rows": rows, "tokens per row": length, "gather ms per decode step": ms})
            print(table[-1], flush=True)
    if args.out:
        intro = (
            f"`{invocation('benchmarks.kv_gather_cost', argv)['command']}`: median of "
            f"{args.repeats}, {args.threads} torch thread(s), pages of {args.page} tokens, smollm2-135m's "
            "KV shape (30 layers x K and V), bf16."
        )
        write_results(args.out, {"args": vars(args) | {"out": str(args.out)}, "rows": table},
                      "KV page gather per decode step", intro, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
