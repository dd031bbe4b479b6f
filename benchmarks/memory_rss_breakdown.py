"""Where a serving process's RSS goes, step by step, for issue 21's workload, in one process (no HTTP).

Imports, base loaded into the engine, 16 rank-16 adapters loaded, one prefill of 8 x 701-token prompts on
8 of them, 63 decode steps; after each step the RSS and the peak RSS so far, and the engine's memory
report (`Engine.memory_report`) at the end. Comparing with the server's peak RSS under the same load
(`serve_bench`) separates what the engine holds from what the HTTP process adds. Boundary: imports server
internals on purpose; changes nothing in them.

Run:
    python -m benchmarks.memory_rss_breakdown --out benchmarks/results/memory_rss_breakdown.json
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
from pathlib import Path

from server.memory_budget import process_rss


def reading(step: str) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step": step, "rss_mib": round(process_rss() / 2**20, 1), "peak_mib": round(peak / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quantize", default="nf4")
    parser.add_argument("--prompt-tokens", type=int, default=701)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    steps = [reading("python and server.memory_budget imported (torch not yet)")]
    from benchmarks.memory_budget_probe import emit
    from benchmarks.serve_bench import make_adapters
    from hub.bases import resolve_base
    from hub.store import LocalStore
    from server.engine import Engine

    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="rss-breakdown-"))
    store = LocalStore(work / "registry")
    names = [f"a{i}" for i in range(4)]
    make_adapters(base, names, work / "peft", store, rank=16, seed=0)
    steps.append(reading("4 PEFT adapters made (a PEFT model built, then dropped)"))
    engine = Engine(base.path, base_name=args.base, quantize=args.quantize)
    steps.append(reading("engine ready (base loaded, warmed up)"))
    slots = []
    for i in range(16):
        stored = store.get(names[i % len(names)])
        slots.append(engine.load_adapter(f"k{i}@1", stored.path, stored.manifest).slot)
    steps.append(reading("16 rank-16 adapters loaded"))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(8)]
    logits = engine.prefill(list(range(8)), prompts, slots[:8])
    steps.append(reading(f"prefill of 8 x {args.prompt_tokens} tokens"))
    for _ in range(63):
        logits = engine.decode(logits.argmax(-1).tolist())
    steps.append(reading("63 decode steps (64 tokens each)"))
    report = {k: round(v / 2**20, 1) for k, v in engine.memory_report().items()}
    result = {"base": args.base, "quantize": args.quantize, "dtype": str(engine.dtype), "steps": steps,
              "memory_report_mib": report}  # fmt: skip
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
