"""Issue 21's in-process memory targets: many small adapters in the budget of a few large slots, and a
cycle of mixed ranks through it.

In one process, on the real engine (default: `smollm2-135m`, NF4, compute dtype auto), with the real load
path (`Engine.load_adapter`: read, check, copy into pages) and the real residency cache
(`server.adapter_cache.AdapterCache`, bounded by bytes):
1. `resident`: `--resident` rank-8 adapters loaded at once into the bytes the former engine preallocated
   for 17 slots (16 + the empty slot 0) at rank 64 in the same dtype; reports how many stay resident and
   the engine's memory report.
2. `cycle`: `--cycle` distinct adapters of ranks 8, 16 and 64 (shuffled), each acquired, used for one
   short prefill and released, through that same budget; RSS after the first quarter vs at the end,
   evictions and failures.
Each load's size hint is its exact rank-sized bytes (the server hints with the file size, which is more for
fp32 files served in bf16, so it makes at least as much room). Distinct keys share a few PEFT folders
per rank (made once; file contents do not change what memory does). Boundary: imports server internals
on purpose; changes nothing in them.

Run:
    python -m benchmarks.memory_budget_probe --out benchmarks/results/memory_budget_probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore
from server.adapter_cache import AdapterCache
from server.engine import Engine
from server.memory_budget import process_rss

RANKS = (8, 16, 64)


def old_slot_bytes(engine: Engine, rank: int) -> int:
    """Bytes one former [in, r_max] + [r_max, out] slot took over every target linear."""
    size = torch.empty(0, dtype=engine.dtype).element_size()
    return sum(rank * (i + o) * size for i, o in engine.layout.linears.values())


async def resident(engine: Engine, budget: int, folders: dict[int, list], count: int) -> dict:
    cache = AdapterCache(engine.unload_adapter, max_adapters=count, max_bytes=budget)
    for i in range(count):
        folder, manifest = folders[8][i % len(folders[8])]
        key = f"r8-{i:03d}@1"
        load = lambda k=key, f=folder, m=manifest: engine.load_adapter(k, f, m)  # noqa: E731
        await cache.acquire(key, load, nbytes_hint=old_slot_bytes(engine, 8))
        cache.release(key)
    stats = cache.stats
    report = engine.memory_report()
    for entry in cache.entries():
        await cache.unload(entry.key)
    return {"count": count, "resident": stats["resident"], "evictions": stats["evictions"],
            "resident_mib": round(stats["resident_bytes"] / 2**20, 1), "budget_mib": round(budget / 2**20, 1),
            "report_mib": {k: round(v / 2**20, 1) for k, v in report.items()}}  # fmt: skip


async def cycle(engine: Engine, budget: int, folders: dict[int, list], count: int, seed: int) -> dict:
    cache = AdapterCache(engine.unload_adapter, max_adapters=count, max_bytes=budget)
    ranks = [RANKS[i % len(RANKS)] for i in range(count)]
    random.Random(seed).shuffle(ranks)
    prompt = [engine.tokenizer.bos_token_id or 1] * 8
    failures, rss_warm, start = [], 0, time.perf_counter()
    for i, rank in enumerate(ranks):
        folder, manifest = folders[rank][i % len(folders[rank])]
        key = f"c{i:03d}-r{rank}@1"
        load = lambda k=key, f=folder, m=manifest: engine.load_adapter(k, f, m)  # noqa: E731
        try:
            adapter = await cache.acquire(key, load, nbytes_hint=old_slot_bytes(engine, rank))
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        engine.prefill([i], [prompt], [adapter.slot])
        engine.release(i)
        cache.release(key)
        if i + 1 == count // 4:
            rss_warm = process_rss()
    rss_end = process_rss()
    stats, report = cache.stats, engine.memory_report()
    for entry in cache.entries():
        await cache.unload(entry.key)
    return {"count": count, "ranks": list(RANKS), "seconds": round(time.perf_counter() - start, 1),
            "rss_after_quarter_mib": round(rss_warm / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth": round((rss_end - rss_warm) / rss_warm, 4), "loads": stats["loads"],
            "evictions": stats["evictions"], "failures": len(failures), "first_failures": failures[:3],
            "adapter_allocated_mib": round(report["adapter_bytes_allocated"] / 2**20, 1),
            "budget_mib": round(budget / 2**20, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quantize", default="nf4")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--resident", type=int, default=100)
    parser.add_argument("--cycle", type=int, default=200)
    parser.add_argument("--folders-per-rank", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="memory-probe-"))
    store = LocalStore(work / "registry")
    folders: dict[int, list] = {}
    for rank in RANKS:
        names = [f"r{rank}-{i}" for i in range(args.folders_per_rank)]
        make_adapters(base, names, work / "peft", store, rank=rank, seed=rank)
        folders[rank] = [(s.path, s.manifest) for s in (store.get(n) for n in names)]
    engine = Engine(base.path, base_name=args.base, quantize=args.quantize, dtype=args.dtype,
                    max_adapters=max(args.resident, args.cycle), max_rank=64)  # fmt: skip
    budget = 17 * old_slot_bytes(engine, 64)
    engine.banks.byte_limit = budget  # as the engine does for its own share, so the pools respect this one
    results = {
        "base": args.base, "quantize": args.quantize, "dtype": str(engine.dtype).removeprefix("torch."),
        "rss_start_mib": round(process_rss() / 2**20, 1),
        "adapter_mib_by_rank": {r: round(old_slot_bytes(engine, r) / 2**20, 2) for r in RANKS},
        "resident": asyncio.run(resident(engine, budget, folders, args.resident)),
        "cycle": asyncio.run(cycle(engine, budget, folders, args.cycle, args.seed)),
    }  # fmt: skip
    emit(results, args.out)
    return 0


def emit(result: dict, out: Path | None) -> None:
    """Print `result` as JSON, and write it to `out` if given."""
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 - a script's output
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
