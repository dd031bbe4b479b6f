"""Where a decode step's time goes in the engine: ms per step by batch size, kernels and top ops.

Runs the engine in-process (no HTTP) on a built-in base with random rank-16 LoRA adapters, one per
row, and reports: engine start (load + warm-up), the first prefill after it, ms per decode step at
each batch size, and a torch.profiler view of a few decode steps (ops by self CPU time; GPU kernels
per step on CUDA). Run from the repository root, on CPU or GPU:
    python -m benchmarks.decode_step_profile --base small --quantize none --batch 1 16
Writes `<out>/decode_step_profile.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_decode(engine: Any, batch: int, slots: list[int], prompt_len: int, steps: int) -> dict[str, Any]:
    """Prefill `batch` rows, then time `steps` decode steps and profile a few more."""
    from torch.profiler import ProfilerActivity, profile

    prompts = [[5 + (i + j) % 200 for j in range(prompt_len)] for i in range(batch)]
    ids = list(range(batch))
    started = time.perf_counter()
    logits = engine.prefill(ids, prompts, [slots[i % len(slots)] for i in range(batch)])
    tokens = logits.argmax(-1).tolist()
    prefill_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    tokens = engine.decode(tokens).argmax(-1).tolist()  # first decode at this batch size
    first_decode_ms = (time.perf_counter() - started) * 1000
    for _ in range(2):
        tokens = engine.decode(tokens).argmax(-1).tolist()
    sync(engine.device)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = engine.decode(tokens).argmax(-1).tolist()
    sync(engine.device)
    ms = (time.perf_counter() - started) * 1000 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    profiled = 5
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            tokens = engine.decode(tokens).argmax(-1).tolist()
        sync(engine.device)
    for seq_id in ids:
        engine.release(seq_id)
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    kernels = sum(
        e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    return {
        "batch": batch,
        "prefill_ms": round(prefill_ms, 2),
        "first_decode_ms": round(first_decode_ms, 2),
        "ms_per_step": round(ms, 3),
        "tokens_per_s": round(batch * 1000 / ms, 1),
        "gpu_kernels_per_step": kernels / profiled if kernels else None,
        "top_ops_self_cpu_ms_per_step": [
            {
                "op": e.key,
                "calls": e.count // profiled,
                "ms": round(e.self_cpu_time_total / 1000 / profiled, 3),
            }
            for e in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="small")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--adapters", type=int, default=8, help="random LoRA adapters, one per row in turn")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from server.engine import Engine

    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as tmp:
        store = LocalStore(Path(tmp) / "registry")
        names = [f"p{i:02d}" for i in range(args.adapters)]
        make_adapters(base, names, Path(tmp) / "peft", store, rank=16, seed=0)
        started = time.perf_counter()
        engine = Engine(
            base.path, base_name=args.base, quantize=args.quantize, max_adapters=max(args.adapters, 1),
            max_rank=16, max_batch_size=max(args.batch), max_seq_len=args.prompt_len + args.steps + 16,
        )  # fmt: skip
        start_s = time.perf_counter() - started
        slots = [engine.load_adapter(n, *_stored(store, n)).slot for n in names] or [0]
    sync(engine.device)
    started = time.perf_counter()
    engine.prefill([10_000], [[5] * args.prompt_len], [slots[0]])
    sync(engine.device)
    first_prefill_ms = (time.perf_counter() - started) * 1000
    engine.release(10_000)
    runs = [timed_decode(engine, b, slots, args.prompt_len, args.steps) for b in args.batch]
    result = {
        "base": args.base,
        "quantize": args.quantize,
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(0)
        if engine.device.type == "cuda"
        else platform.processor(),
        "torch": torch.__version__,
        "engine_start_s": round(start_s, 2),
        "first_prefill_ms": round(first_prefill_ms, 2),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decode_step_profile.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    for run in runs:
        print(f"batch {run['batch']}: prefill {run['prefill_ms']} ms, "
              f"first decode {run['first_decode_ms']} ms, "
              f"{run['ms_per_step']} ms/step, {run['tokens_per_s']} tok/s, "
              f"{run['gpu_kernels_per_step']} GPU kernels/step")  # fmt: skip
        for op in run["top_ops_self_cpu_ms_per_step"][:6]:
            print(f"   {op['ms']:8.3f} ms  x{op['calls']:<4} {op['op']}")


def _stored(store: LocalStore, name: str) -> tuple[Path, Any]:
    stored = store.get(name)
    return stored.path, stored.manifest


if __name__ == "__main__":
    main()
