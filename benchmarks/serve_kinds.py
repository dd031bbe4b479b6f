"""Serving cost of DoRA rows and weighted adapter sets against plain LoRA rows, through the real server.

One `python -m server` on 127.0.0.1 (fp32 by default, so the three kinds compute alike), 8 random rank-8
LoRAs and 8 random rank-8 DoRAs on all seven projections, registered in a temporary registry. Scenarios,
each at concurrency C with requests spread uniformly over their models, run round-robin `--repeats`
times so a drifting machine load hits each alike:

- `lora`: the 8 LoRAs; `dora`: the 8 DoRAs; `set`: 8 weighted sets of two LoRAs each
  (`a000*0.5+a001*0.5`, ...), each built once into one combined LoRA of rank 16.

Reported: generated tok/s and TTFT p50 per scenario (median over repeats) and each kind's throughput over
LoRA's (issue 19's target: DoRA and set rows cost within 1.5x of a plain LoRA row, i.e. a ratio >= 0.67).
Writes benchmarks/results/serve_kinds_<base>.{json,md}. Boundary: drives the server over HTTP only.

Run (from the repository root; about 6 minutes on the `small` base with 2 cores):
    python -m benchmarks.serve_kinds --base small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_report, loadgen
from benchmarks.bench_servers import ServerProcess, free_port, running
from benchmarks.serve_bench import make_adapters
from hub.bases import resolve_base
from hub.store import LocalStore

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
KINDS = ("lora", "dora", "set")


def scenario_models(count: int) -> dict[str, list[str]]:
    """The models each scenario's requests name: `count` LoRAs, `count` DoRAs, `count` two-LoRA sets."""
    loras = [f"a{i:03d}" for i in range(count)]
    return {
        "lora": loras,
        "dora": [f"d{i:03d}" for i in range(count)],
        "set": [f"{loras[i]}*0.5+{loras[(i + 1) % count]}*0.5" for i in range(count)],
    }


def server_cmd(args: argparse.Namespace, registry: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "server", "--base", args.base, "--quantize", "none", "--dtype", args.dtype,
        "--registry", str(registry), "--host", "127.0.0.1", "--port", str(port),
        "--max-adapters", str(3 * args.adapters), "--max-rank", str(2 * args.rank),
        "--max-batch-size", str(args.concurrency), "--max-new-tokens", str(args.new_tokens),
    ]  # fmt: skip


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = resolve_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="serve-kinds-"))
    store = LocalStore(work / "registry")
    models = scenario_models(args.adapters)
    make_adapters(base, models["lora"], work / "peft", store, args.rank, seed=0)
    make_adapters(base, models["dora"], work / "peft", store, args.rank, seed=100, use_dora=True)
    vocab = json.loads((base.path / "config.json").read_text())["vocab_size"]
    prompts = loadgen.build_prompts(64, args.prompt_tokens, vocab, seed=0)
    port = free_port()
    server = ServerProcess(
        "adapterdock", server_cmd(args, work / "registry", port), port, work / "server.log"
    )
    rows: list[dict[str, Any]] = []
    with running(server, args.startup_timeout):
        for kind in KINDS:  # every adapter and set resident before the first measured run
            loadgen.warm_up(server.url, models[kind], prompts[0], args.request_timeout)
        for repeat in range(args.repeats):
            for kind in KINDS:
                picks = loadgen.sample_adapters(models[kind], args.requests, seed=repeat)
                result = asyncio.run(loadgen.run_load(
                    server.url, picks, prompts, concurrency=args.concurrency, max_tokens=args.new_tokens,
                    time_limit_s=args.time_limit, request_timeout_s=args.request_timeout,
                ))  # fmt: skip
                row = {"kind": kind, "repeat": repeat, **result.to_dict()}
                rows.append(row)
                print(f"{kind} repeat {repeat}: {row['tokens_per_s']:.1f} tok/s, {row['ok']} ok, "
                      f"{row['errors']} errors", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median tok/s and TTFT p50 per kind, and throughput against LoRA's."""
    out = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        out[kind] = {
            "kind": kind,
            "tok_s": round(statistics.median(r["tokens_per_s"] for r in mine), 1),
            "ttft_p50_ms": round(statistics.median(r["ttft_p50_ms"] for r in mine), 1),
            "errors": sum(r["errors"] for r in mine),
        }
    for row in out.values():
        row["throughput_vs_lora"] = round(row["tok_s"] / out["lora"]["tok_s"], 3)
        row["within_1_5x"] = row["throughput_vs_lora"] >= 1 / 1.5
    return list(out.values())


def write(
    args: argparse.Namespace, rows: list[dict[str, Any]], table: list[dict[str, Any]], wall: float
) -> None:
    stem = args.out / f"serve_kinds_{args.base}"
    meta = {**bench_report.invocation("benchmarks.serve_kinds"), "wall_s": round(wall),
            **{k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
    payload = {"meta": meta, "summary": table, "runs": rows}
    intro = (
        f"`{meta['command']}` at {meta['date']}: one server (`--dtype {args.dtype}`), C={args.concurrency}, "
        f"{args.requests} requests a run of {args.prompt_tokens}-token prompts and {args.new_tokens} new "
        f"tokens, {args.repeats} round-robin repeats (medians). Target: DoRA and set rows cost within 1.5x "
        "of a plain LoRA row (throughput ratio >= 0.667)."
    )
    title = f"Serving cost by adapter kind ({args.base})"
    print(bench_report.write_results(stem, payload, title, intro, table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="small")
    parser.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--adapters", type=int, default=8, help="LoRAs, DoRAs and sets each")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=180)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = measure(args)
    write(args, rows, summarize(rows), time.monotonic() - started)


if __name__ == "__main__":
    main()
