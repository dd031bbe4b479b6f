"""Engine cost by compute dtype: fp32 against bf16 (NF4 too), base rows and mixed adapters, in one process.

Why an engine-level A/B: the serving benchmark runs its systems one after another, so on a shared machine
each sees different contention. Here every engine lives in one process with one torch thread, blocks of
one prefill plus N decode steps alternate between them, and each call is timed in CPU time
(`time.process_time`), which other processes' load barely moves. Each block runs the batch twice: every
row on the base, then every row on its own adapter (8 random rank-16 LoRAs on all seven projections,
registered like the serving benchmark's). Reported per engine: median decode step and prefill in ms, and
what follows: mixed/base cost, and each engine's speed against fp32's (throughput ratio = time ratio
inverted). Writes benchmarks/results/engine_dtype_ab_<base>.{json,md}.

Run (from the repository root; ~6 minutes on smollm2-135m with 2 cores):
    python -m benchmarks.engine_dtype_ab --base smollm2-135m --quantize none nf4
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_report
from benchmarks.engine_timing import time_block
from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DTYPES = ("fp32", "bf16")


def median_ms(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2] * 1e3, 2)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.engine import Engine

    torch.set_num_threads(1)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="engine-dtype-ab-"))
    store = LocalStore(work / "registry")
    names = [f"a{i:03d}" for i in range(args.batch)]
    make_adapters(base, names, work / "src", store, args.rank, seed=0)
    engines, slots = {}, {}
    for quantize in args.quantize:
        for dtype in DTYPES:
            name = f"{quantize}/{dtype}"
            engine = Engine(base.path, base_name=args.base, quantize=quantize, dtype=dtype,
                            max_adapters=args.batch, max_rank=args.rank, max_batch_size=args.batch,
                            max_seq_len=args.prompt_len + args.steps + 8)  # fmt: skip
            loaded = [engine.load_adapter(n, store.get(n).path, store.get(n).manifest) for n in names]
            engines[name], slots[name] = engine, [a.slot for a in loaded]
    prompts = [[5 + (7 * i + j) % 500 for j in range(args.prompt_len)] for i in range(args.batch)]
    times: dict[str, dict[str, list[float]]] = {
        f"{name} {kind}": {"prefill": [], "decode": []} for name in engines for kind in ("base", "mixed")
    }
    for block in range(args.blocks):
        for name, engine in engines.items():
            for kind, row_slots in (("base", [0] * args.batch), ("mixed", slots[name])):
                prefill, decode = time_block(engine, row_slots, prompts, args.steps)
                times[f"{name} {kind}"]["prefill"].append(prefill)
                times[f"{name} {kind}"]["decode"].extend(decode)
        print(f"block {block + 1}/{args.blocks} done", file=sys.stderr, flush=True)
    return {
        k: {"decode_ms": median_ms(v["decode"]), "prefill_ms": median_ms(v["prefill"])}
        for k, v in times.items()
    }


def derived(rows: dict[str, dict[str, float]], quantizes: list[str]) -> list[dict[str, Any]]:
    """Per engine: mixed/base throughput, and decode/prefill throughput against fp32 of the same quantize."""
    out = []
    for quantize in quantizes:
        for dtype in DTYPES:
            name = f"{quantize}/{dtype}"
            base, mixed = rows[f"{name} base"], rows[f"{name} mixed"]
            ref_base, ref_mixed = rows[f"{quantize}/fp32 base"], rows[f"{quantize}/fp32 mixed"]
            out.append({
                "engine": name,
                "decode_ms_base": base["decode_ms"], "decode_ms_mixed": mixed["decode_ms"],
                "prefill_ms_base": base["prefill_ms"], "prefill_ms_mixed": mixed["prefill_ms"],
                "mixed_over_base": round(base["decode_ms"] / mixed["decode_ms"], 3),
                "decode_speed_vs_fp32_base": round(ref_base["decode_ms"] / base["decode_ms"], 3),
                "decode_speed_vs_fp32_mixed": round(ref_mixed["decode_ms"] / mixed["decode_ms"], 3),
                "prefill_speed_vs_fp32_base": round(ref_base["prefill_ms"] / base["prefill_ms"], 3),
            })  # fmt: skip
    return out


def write(args: argparse.Namespace, rows: dict[str, Any], table: list[dict[str, Any]], wall: float) -> None:
    stem = args.out / f"engine_dtype_ab_{args.base}"
    meta = {
        **bench_report.invocation("benchmarks.engine_dtype_ab"),
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "wall_s": round(wall), "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
        "blocks": args.blocks, "rank": args.rank,
    }  # fmt: skip
    payload = {"meta": meta, "medians": rows, "table": table}
    intro = (
        f"`{meta['command']}` at {meta['date']}: batch {args.batch}, prompts of {args.prompt_len} tokens, "
        f"{args.steps} decode steps a block, {args.blocks} blocks alternating between engines, one torch "
        f"thread, CPU time per call (medians). 'mixed' = every row on its own rank-{args.rank} LoRA (all "
        "seven projections). Speeds are time ratios inverted (higher is faster)."
    )
    title = f"Engine cost by compute dtype ({args.base})"
    print(bench_report.write_results(stem, payload, title, intro, table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "nf4", "int8"])
    parser.add_argument("--batch", type=int, default=8, help="rows, and adapters in the mixed batch")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per block")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = measure(args)
    write(args, rows, derived(rows, args.quantize), time.monotonic() - started)


if __name__ == "__main__":
    main()
