"""Where a cold adapter load spends its time, step by step, inside one process (no HTTP, no threads).

Times the steps the server runs for `POST /v1/adapters/load` (on the `small` base unless `--base`):
1. `LocalStore.get` (manifest);
2. `verify_files` (sha256 of every file);
3. `read_adapter` (safetensors parse, shape checks);
4. `AdapterBanks.write` (copy into a slot).
The pages are in the serving compute dtype (`--dtype auto`: bf16 on CPUs with avx512_bf16/AMX); the
slots hold rank 16 at most (the adapters' rank), and the first loads also grow the page pools. With
`--out`, the medians go to OUT.json/.md. Boundary: unlike
`serve_bench.py`, this probe imports server internals (`server.adapter_weights`,
`server.lora_batch`) on purpose, to split the load path; it changes nothing in them.

Run:
    python -m benchmarks.load_path_probe --adapters 12
    python -m benchmarks.load_path_probe --base smollm2-135m --out benchmarks/results/load_path_smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.bench_report import invocation, write_results
from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore
from hub.version_folder import verify_files
from server.adapter_weights import BaseLayout, read_adapter
from server.lora_batch import AdapterBanks
from server.model_loader import compute_dtype


class _BusyThread:
    """A thread of small bf16 matmuls, as the engine's decode loop runs beside a load (GIL hand-overs)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x, w = torch.randn(16, 576).bfloat16(), torch.randn(576, 576).bfloat16()
        while not self._stop.is_set():
            x = torch.nn.functional.linear(x, w).mul_(0.01)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="small")
    parser.add_argument("--adapters", type=int, default=12, help="loads timed (the first 2 are warm-up)")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", type=Path, help="also write OUT.json and OUT.md")
    parser.add_argument(
        "--beside-busy-thread", action="store_true",
        help="time the loads beside a thread running small bf16 matmuls (a stand-in for the decode loop)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    dtype = compute_dtype(torch.device("cpu"), args.dtype)
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="load-probe-"))
    store = LocalStore(work / "registry")
    names = [f"probe{i:03d}" for i in range(args.adapters)]
    make_adapters(base, names, work / "peft", store, rank=16, seed=0)
    stored = store.get(names[0], verify=False)
    file_mib = sum((stored.path / f).stat().st_size for f in stored.manifest.files) / 2**20
    rows = []
    busy = _BusyThread() if args.beside_busy_thread else None
    for max_rank in (16,):
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
        layout = BaseLayout.from_config(model.config)
        banks = AdapterBanks(
            model,
            layout,
            num_slots=args.slots + 1,
            max_rank=max_rank,
            dtype=dtype,
            device=torch.device("cpu"),
        )
        times: dict[str, list[float]] = {"get": [], "verify": [], "read": [], "write": []}
        if busy is not None:
            busy.start()
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
        if busy is not None:
            busy.stop()
        row = {"max_rank": max_rank, "dtype": str(dtype).removeprefix("torch."), "busy_thread": bool(busy),
               "pages_mib": round(banks.nbytes / 2**20, 1), "adapter_file_mib": round(file_mib, 1),
               **{f"{key}_ms": value for key, value in medians.items()},
               "total_ms": round(sum(medians.values()), 2)}  # fmt: skip
        print(json.dumps(row))
        rows.append(row)
    if args.out:
        intro = (
            f"`{invocation('benchmarks.load_path_probe', argv)['command']}`: median ms of each "
            f"step of a cold load over {args.adapters - 2} rank-16 adapters (q/k/v/o/gate/up/down) on "
            f"{args.base}, in one process (no HTTP, no thread hops)."
        )
        write_results(args.out, {"base": args.base, "rows": rows}, "Cold-load path", intro, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
