"""Engine prefill and decode-step cost, this tree's engine against an older one, in one process.

Loads `server/engine.py` of an older tree (a `git archive` of the commit before a change) beside this
tree's engine, on the same base, and alternates blocks of one prefill + N decode steps between them, so
both see the same contention on a shared machine. Reports CPU time (`time.process_time`) per call:
minimum, 20th percentile and median of decode steps, median of prefills. The older engine imports this
tree's other `server` modules, so it suits changes confined to the engine's forward. Run from the root:
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


def load_old_engine(tree: Path) -> Any:
    """The `Engine` class of `tree/server/engine.py`, imported as module `old_engine`."""
    spec = importlib.util.spec_from_file_location("old_engine", tree / "server" / "engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_engine"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.Engine


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
    args = parser.parse_args()

    from server.engine import Engine

    base = resolve_base(args.base)
    kwargs = dict(base_name=args.base, quantize="none", max_adapters=2, max_rank=16,
                  max_batch_size=args.batch, max_seq_len=args.prompt_len + args.steps + 8)  # fmt: skip
    engines = {
        "before": load_old_engine(args.before)(base.path, **kwargs),
        "after": Engine(base.path, **kwargs),
    }
    rows = list(range(args.batch))
    prompts = [[5 + (i + j) % 200 for j in range(args.prompt_len)] for i in rows]
    decode: dict[str, list[float]] = {name: [] for name in engines}
    prefill: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.blocks):
        for name, engine in engines.items():
            started = time.process_time()
            tokens = engine.prefill(rows, prompts, [0] * len(rows)).argmax(-1).tolist()
            prefill[name].append(time.process_time() - started)
            for _ in range(args.steps):
                started = time.process_time()
                tokens = engine.decode(tokens).argmax(-1).tolist()
                decode[name].append(time.process_time() - started)
            for row in rows:
                engine.release(row)
    result = {"base": args.base, "batch": args.batch}
    result |= {name: summary(decode[name], prefill[name]) for name in engines}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
