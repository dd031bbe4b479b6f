"""Where a cold adapter load spends its time, step by step, inside one process (no HTTP, no threads).

Times the steps the server runs for `POST /v1/adapters/load` on the `small` base:
1. `LocalStore.get` (manifest);
2. `verify_files` (sha256 of every file);
3. `read_adapter` (safetensors parse, shape checks);
4. `AdapterBanks.write` (copy into a slot).
It runs the last step at the server's default `--max-rank 64` and at 16. Boundary: unlike
`serve_bench.py`, this probe imports server internals (`server.adapter_weights`,
`server.lora_batch`) on purpose, to split the load path; it changes nothing in them.

Run:
    python -m benchmarks.load_path_probe --adapters 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore
from hub.version_folder import verify_files
from server.adapter_weights import BaseLayout, read_adapter
from server.lora_batch import AdapterBanks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="small")
    parser.add_argument("--adapters", type=int, default=12, help="loads timed (the first 2 are warm-up)")
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args(argv)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="load-probe-"))
    store = LocalStore(work / "registry")
    names = [f"probe{i:03d}" for i in range(args.adapters)]
    make_adapters(base, names, work / "peft", store, rank=16, seed=0)
    for max_rank in (64, 16):
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        layout = BaseLayout.from_config(model.config)
        banks = AdapterBanks(
            model,
            layout,
            num_slots=args.slots + 1,
            max_rank=max_rank,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        times: dict[str, list[float]] = {"get": [], "verify": [], "read": [], "write": []}
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            stored = store.get(name, verify=False)
            t1 = time.perf_counter()
            verify_files(stored.path, stored.manifest)
            t2 = time.perf_counter()
            weights = read_adapter(stored.path, stored.manifest, layout, max_rank=max_rank)
            t3 = time.perf_counter()
            banks.write(1 + i % args.slots, weights)
            t4 = time.perf_counter()
            for key, start, end in (("get", t0, t1), ("verify", t1, t2), ("read", t2, t3), ("write", t3, t4)):
                times[key].append(1000 * (end - start))
        medians = {key: round(statistics.median(values[2:]), 2) for key, values in times.items()}
        row = {"max_rank": max_rank, "bank_mib": round(banks.nbytes / 2**20, 1), "median_ms": medians}
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
