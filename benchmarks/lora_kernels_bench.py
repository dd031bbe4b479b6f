"""Micro-benchmark of per-row LoRA strategies for one decode step, in isolation from the server.

Measures, for the `small` base's linear shapes (hidden 512, intermediate 1408, rank 16), the time of
y = x W^T + per-row LoRA delta over a batch of rows that use `n` distinct adapters, for:
- `gather_bmm`: gather each row's A and B, two batched matmuls (server/lora_batch.py today; the gather is
  cached across decode steps there, so `bmm_cached` times it without the gather);
- `segmented`: one pair of matmuls per distinct adapter over its rows (loop over adapters present);
- `concat_mask`: concatenate the distinct adapters' A along the rank, one matmul, zero the other adapters'
  columns per row with a mask, one matmul with the stacked B (dense, reads each adapter once);
- `base_only`: the base matmul alone, the floor.
Boundary: torch only; it imports nothing from `server/`, so the numbers say which kernel shape to use.

Run:
    python -m benchmarks.lora_kernels_bench --rows 16 --adapters 1 8 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {"q_proj": (512, 512), "k_proj": (512, 256), "gate_proj": (512, 1408), "down_proj": (1408, 512)}


def timed(fn: Callable[[], torch.Tensor], repeats: int, warmup: int = 3) -> float:
    """Median microseconds of `fn` over `repeats` runs (after `warmup` untimed runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e6 * statistics.median(times), 1)


def strategies(
    rows: int, n: int, fan_in: int, fan_out: int, rank: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """The candidate kernels over the same inputs: `rows` decode rows spread over `n` adapters."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(fan_out, fan_in, generator=gen) * 0.02
    a_bank = torch.randn(16, fan_in, rank, generator=gen) * 0.02
    b_bank = torch.randn(16, rank, fan_out, generator=gen) * 0.02
    x = torch.randn(rows, 1, fan_in, generator=gen)
    slots = torch.arange(rows) % n
    a_rows, b_rows = a_bank.index_select(0, slots), b_bank.index_select(0, slots)
    present = sorted(set(slots.tolist()))
    groups = [(s, (slots == s).nonzero().flatten()) for s in present]
    a_cat = torch.cat([a_bank[s] for s in present], dim=1)  # [in, n*r]
    b_cat = torch.cat([b_bank[s] for s in present], dim=0)  # [n*r, out]
    mask = torch.zeros(rows, len(present) * rank)
    for i, s in enumerate(slots.tolist()):
        j = present.index(s)
        mask[i, j * rank : (j + 1) * rank] = 1.0
    x2 = x.view(rows, fan_in)

    def base_only() -> torch.Tensor:
        return x2 @ w.t()

    def gather_bmm() -> torch.Tensor:
        a, b = a_bank.index_select(0, slots), b_bank.index_select(0, slots)
        return torch.baddbmm((x2 @ w.t()).view(rows, 1, -1), torch.bmm(x, a), b)

    def bmm_cached() -> torch.Tensor:
        return torch.baddbmm((x2 @ w.t()).view(rows, 1, -1), torch.bmm(x, a_rows), b_rows)

    def segmented() -> torch.Tensor:
        y = x2 @ w.t()
        for s, index in groups:
            y.index_add_(0, index, (x2.index_select(0, index) @ a_bank[s]) @ b_bank[s])
        return y

    def concat_mask() -> torch.Tensor:
        return torch.addmm(x2 @ w.t(), (x2 @ a_cat) * mask, b_cat)

    return {
        "base_only": base_only,
        "gather_bmm": gather_bmm,
        "bmm_cached": bmm_cached,
        "segmented": segmented,
        "concat_mask": concat_mask,
    }


def check_equal(kernels: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Every LoRA strategy computes the same y."""
    ref = kernels["gather_bmm"]().reshape(-1)
    for name in ("bmm_cached", "segmented", "concat_mask"):
        torch.testing.assert_close(kernels[name]().reshape(-1), ref, rtol=1e-4, atol=1e-4, msg=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with torch.inference_mode():
        for n in args.adapters:
            for layer, (fan_in, fan_out) in SHAPES.items():
                kernels = strategies(args.rows, n, fan_in, fan_out, args.rank)
                check_equal(kernels)
                row = {"adapters": n, "layer": layer, "rows": args.rows}
                row |= {name: timed(fn, args.repeats) for name, fn in kernels.items()}
                results.append(row)
                print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
