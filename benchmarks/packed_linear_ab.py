"""oneDNN-packed bf16 weights (`server.packed_linear`) against plain `F.linear`: per matmul and per step.

1. Each smollm2-135m linear shape (and lm_head) at decode and prefill row counts: median us of `F.linear`
   and of the packed call, and whether the outputs are bit-identical.
2. Two engines on smollm2-135m in one process, bf16, one plain (packing switched off for the base and the
   adapter factors) and one packed, blocks alternating: median CPU ms of a decode step at 16 rows,
   base-only and on 8 rank-16 adapters, and of the 16 x 64-token prefill; and whether both engines chose
   the same greedy tokens throughout.
Run from the root: python -m benchmarks.packed_linear_ab --out benchmarks/results/packed_linear_ab
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.bench_report import invocation, write_results
from benchmarks.lora_kernels_bench import timed
from server.packed_linear import pack_weight, packed_linear

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536),
          "down_proj": (1536, 576), "lm_head": (576, 49152)}  # fmt: skip


def matmuls(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, (fan_in, fan_out) in SHAPES.items():
        weight = torch.randn(fan_out, fan_in).bfloat16()
        packed = pack_weight(weight)
        for tokens in (16, 16 * 64):
            x = torch.randn(tokens, fan_in).bfloat16()
            plain_us = timed(lambda: F.linear(x, weight), repeats, warmup=5)  # noqa: B023
            packed_us = timed(lambda: packed_linear(x, packed), repeats, warmup=5)  # noqa: B023
            same = torch.equal(F.linear(x, weight), packed_linear(x, packed))
            rows.append({"linear": name, "rows": tokens, "plain us": plain_us, "packed us": packed_us,
                         "speed-up": round(plain_us / packed_us, 2), "same bits": same})  # fmt: skip
    return rows


def engines(blocks: int, steps: int) -> list[dict[str, Any]]:
    from benchmarks.serve_bench import make_adapters
    from hub.bases import resolve_base
    from hub.store import LocalStore
    from server import adapter_pages, model_loader
    from server.engine import Engine

    base = resolve_base("smollm2-135m")
    kwargs = dict(base_name="smollm2-135m", quantize="none", dtype="bf16", max_adapters=8, max_rank=16,
                  max_batch_size=16, max_seq_len=64 + steps + 16)  # fmt: skip
    original = model_loader.can_pack  # the one decision both the base and the adapter factors consult

    def packing(on: bool) -> None:
        """Switch packing for what is built next: the base at load, adapter factors at a first decode."""
        choice = original if on else (lambda *args, **kwargs: False)
        model_loader.can_pack = adapter_pages.can_pack = choice

    packing(False)
    plain = Engine(base.path, **kwargs)
    packing(True)
    packed = Engine(base.path, **kwargs)
    work = Path(tempfile.mkdtemp(prefix="packed-ab-"))
    store = LocalStore(work / "registry")
    names = [f"ab{i}" for i in range(8)]
    make_adapters(base, names, work / "peft", store, rank=16, seed=0)
    pair = {"plain": plain, "packed": packed}
    slots = {}
    for label, engine in pair.items():
        slots[label] = [engine.load_adapter(f"{n}@1", store.get(n).path, store.get(n).manifest).slot
                        for n in names]  # fmt: skip
    rows_ids = list(range(16))
    prompts = [[5 + (i + j) % 200 for j in range(64)] for i in rows_ids]
    times: dict[str, dict[str, list[float]]] = {k: {"base": [], "mixed": [], "prefill": []} for k in pair}
    tokens_seen: dict[tuple, list] = {}
    for block in range(blocks):
        for mode in ("base", "mixed"):
            for label, engine in pair.items():
                packing(label == "packed")  # the plain engine's adapter factors stay plain too
                row_slots = [0] * 16 if mode == "base" else [slots[label][i % 8] for i in rows_ids]
                start = time.process_time()
                tokens = engine.prefill(rows_ids, prompts, row_slots).argmax(-1).tolist()
                times[label]["prefill"].append(time.process_time() - start)
                seen = [tokens]
                for _ in range(steps):
                    start = time.process_time()
                    tokens = engine.decode(tokens).argmax(-1).tolist()
                    times[label][mode].append(time.process_time() - start)
                    seen.append(tokens)
                tokens_seen[(label, mode, block)] = seen
                for row in rows_ids:
                    engine.release(row)
    packing(True)
    same = all(tokens_seen[("plain", m, b)] == tokens_seen[("packed", m, b)]
               for m in ("base", "mixed") for b in range(blocks))  # fmt: skip
    med = {k: {part: round(1e3 * statistics.median(v), 1) for part, v in d.items()} for k, d in times.items()}
    return [
        {"engine": k, "decode ms, base rows": d["base"], "decode ms, 8 mixed adapters": d["mixed"],
         "prefill ms, 16 x 64": d["prefill"], "same greedy tokens": same}
        for k, d in med.items()
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per matmul")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per block")
    parser.add_argument("--out", type=Path, help="also write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = matmuls(args.repeats)
    for row in table:
        print(row, flush=True)
    steps = engines(args.blocks, args.steps)
    for row in steps:
        print(row, flush=True)
    if args.out:
        run = invocation("benchmarks.packed_linear_ab", argv)
        intro = (
            f"`{run['command']}` at {run['date']}: one torch thread, bf16. First the matmuls of smollm2-135m "
            "(median us), then the engine (median CPU ms, 16 rows, 8 rank-16 adapters on all seven "
            "projections for the mixed rows, blocks alternating between the two engines).\n\n"
            + "\n".join(f"- {row}" for row in steps)
        )
        write_results(args.out, run | {"matmuls": table, "engines": steps}, "oneDNN-packed bf16 weights",
                      intro, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
