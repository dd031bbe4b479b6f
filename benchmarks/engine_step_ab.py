"""Engine prefill and decode-step cost, this tree's engine against an older one, in one process.

Loads `server/engine.py` of an older tree (a `git archive` of the commit before a change) beside this
tree's engine, on the same base, and alternates blocks of one prefill + N decode steps between them, so
both see the same contention on a shared machine. Reports CPU time (`time.process_time`) per call:
minimum, 20th percentile and median of decode steps, median of prefills. The older engine imports this
tree's other `server` modules, so it suits changes confined to the engine's forward; with
`--old-lora-batch` it also takes the older tree's `server/lora_batch.py` (for changes to the adapter
storage). `--adapters N` gives each row one of N rank-`--rank` LoRAs (all seven projections), round robin.
Run from the root:
    mkdir -p /tmp/before && git archive 7781ee9 | tar -x -C /tmp/before
    python -m benchmarks.engine_step_ab --before /tmp/before --base small --batch 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from hub.bases import resolve_base


def _load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load_old_engine(tree: Path, old_lora_batch: bool = False) -> Any:
    """The `Engine` class of `tree/server/engine.py`, imported as module `old_engine` (with the tree's
    own `AdapterBanks` and the page storage under it, `server/adapter_pages.py`, when `old_lora_batch`)."""
    module = _load_module("old_engine", tree / "server" / "engine.py")
    if old_lora_batch:
        current = sys.modules["server.adapter_pages"]
        sys.modules["server.adapter_pages"] = _load_module(
            "old_adapter_pages", tree / "server" / "adapter_pages.py"
        )
        try:  # the older lora_batch imports the older pages
            module.AdapterBanks = _load_module(
                "old_lora_batch", tree / "server" / "lora_batch.py"
            ).AdapterBanks
        finally:
            sys.modules["server.adapter_pages"] = current
    return module.Engine


def load_adapters(engine: Any, folders: list[tuple[Path, Any]]) -> list[int]:
    """Load each (folder, manifest) into `engine`; -> their slots."""
    return [engine.load_adapter(f"ab{i}@1", f, m).slot for i, (f, m) in enumerate(folders)]


def summary(decode: list[float], prefill: list[float]) -> dict[str, float]:
    decode, prefill = sorted(decode), sorted(prefill)
    return {
        "decode_min": round(decode[0] * 1e3, 2),
        "decode_p20": round(decode[len(decode) // 5] * 1e3, 2),
        "decode_med": round(decode[len(decode) // 2] * 1e3, 2),
        "prefill_med": round(prefill[len(prefill) // 2] * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="root of the older tree")
    parser.add_argument("--base", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="decode steps per block")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--adapters", type=int, default=0, help="distinct LoRAs over the rows (0: base rows)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--old-lora-batch", action="store_true", help="the older tree's lora_batch too")
    parser.add_argument("--out", type=Path, help="also write OUT.json and OUT.md (e.g. benchmarks/results/x)")
    args = parser.parse_args()

    from server.engine import Engine

    base = resolve_base(args.base)
    kwargs = dict(base_name=args.base, quantize=args.quantize, dtype=args.dtype,
                  max_adapters=max(2, args.adapters), max_rank=args.max_rank, max_batch_size=args.batch,
                  max_seq_len=args.prompt_len + args.steps + 8)  # fmt: skip
    engines = {
        "before": load_old_engine(args.before, args.old_lora_batch)(base.path, **kwargs),
        "after": Engine(base.path, **kwargs),
    }
    rows = list(range(args.batch))
    slots = {name: [0] * len(rows) for name in engines}
    if args.adapters:
        import tempfile

        from benchmarks.serve_bench import make_adapters
        from hub.store import LocalStore

        work = Path(tempfile.mkdtemp(prefix="engine-ab-"))
        store = LocalStore(work / "registry")
        names = [f"ab{i}" for i in range(args.adapters)]
        make_adapters(base, names, work / "peft", store, rank=args.rank, seed=0)
        folders = [(s.path, s.manifest) for s in (store.get(n) for n in names)]
        for name, engine in engines.items():
            loaded = load_adapters(engine, folders)
            slots[name] = [loaded[i % len(loaded)] for i in rows]
    prompts = [[5 + (i + j) % 200 for j in range(args.prompt_len)] for i in rows]
    decode: dict[str, list[float]] = {name: [] for name in engines}
    prefill: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.blocks):
        for name, engine in engines.items():
            started = time.process_time()
            tokens = engine.prefill(rows, prompts, slots[name]).argmax(-1).tolist()
            prefill[name].append(time.process_time() - started)
            for _ in range(args.steps):
                started = time.process_time()
                tokens = engine.decode(tokens).argmax(-1).tolist()
                decode[name].append(time.process_time() - started)
            for row in rows:
                engine.release(row)
    result = {"base": args.base, "batch": args.batch, "adapters": args.adapters, "rank": args.rank}
    result |= {name: summary(decode[name], prefill[name]) for name in engines}
    print(json.dumps(result))
    if args.out:
        from benchmarks.bench_report import invocation, write_results

        table = [{"engine": name, **result[name]} for name in engines]
        run = invocation("benchmarks.engine_step_ab")
        intro = (
            f"`{run['command']}`: CPU ms per call, blocks "
            f"alternating between the two engines ({args.blocks} blocks of one prefill of {args.batch} x "
            f"{args.prompt_len} tokens + {args.steps} decode steps), {args.adapters} rank-{args.rank} "
            f"adapters over {args.batch} rows, `--quantize {args.quantize} --dtype {args.dtype}`."
        )
        payload = result | run
        write_results(args.out, payload, f"Engine step A/B on {args.base}", intro, table)


if __name__ == "__main__":
    main()
