"""Measurements of one running adapterdock server beyond throughput: cold adapter loads, cycling many
adapters through the cache (bounded memory), and a py-spy profile under mixed-adapter load.

Boundary: drives a `ServerProcess` over HTTP and reads its /metrics; imports nothing from `server/`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import loadgen
from benchmarks.bench_servers import ServerProcess, cache_delta, scrape

logger = logging.getLogger("serve_bench")


# ---- extra measurements -------------------------------------------------------------------------------
def cold_loads(url: str, names: list[str]) -> dict[str, Any]:
    """POST /v1/adapters/load for adapters never loaded: client wall time and server-side load time."""
    client_ms, server_ms, failures = [], [], []
    with httpx.Client(timeout=60) as client:  # one client: a new one per call costs an SSL context (~50 ms)
        for name in names:
            before = scrape(url, client)
            start = time.perf_counter()
            response = client.post(url + "/v1/adapters/load", json={"adapter": name})
            elapsed = 1000 * (time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"{name}: HTTP {response.status_code} {response.text[:200]}")
                continue
            client_ms.append(elapsed)
            delta = cache_delta(before, scrape(url, client))
            if delta.get("mean_load_ms") is not None:
                server_ms.append(delta["mean_load_ms"])
    return {
        "adapters": len(names),
        "median_ms": _r(statistics.median(client_ms)) if client_ms else None,
        "p95_ms": _r(loadgen.percentile(client_ms, 95)),
        "server_median_ms": _r(statistics.median(server_ms)) if server_ms else None,
        "all_client_ms": [_r(v) for v in client_ms],
        "failures": failures,
        "note": "client time: HTTP round trip of POST /v1/adapters/load (registry -> checksums -> ready)",
    }


def cycle_adapters(
    server: ServerProcess, names: list[str], cache_size: int, prompt: list[int]
) -> dict[str, Any]:
    """Request each of `names` once (1-token completion); RSS after the first `cache_size` vs at the end."""
    rss_after_first = None
    failures: list[str] = []
    start = time.perf_counter()
    before = scrape(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i, name in enumerate(names, 1):
            body = {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
            response = client.post("/v1/completions", json=body)
            if response.status_code != 200:
                failures.append(f"{name}: HTTP {response.status_code} {response.text[:200]}")
            if i == cache_size:
                time.sleep(1.0)
                rss_after_first = server.rss.current()
    time.sleep(1.0)
    rss_end = server.rss.current()
    growth = (rss_end - rss_after_first) / rss_after_first if rss_after_first else None
    return {
        "adapters": len(names),
        "cache_size": cache_size,
        "rss_after_first_mib": round((rss_after_first or 0) / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth": None if growth is None else round(growth, 4),
        "seconds": round(time.perf_counter() - start, 1),
        **cache_delta(before, scrape(server.url)),
        "failures": failures[:5],
        "failed": len(failures),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def profile_server(
    server: ServerProcess,
    py_spy: str,
    names: list[str],
    prompts: list[list[int]],
    out: Path,
    *,
    requests: int,
    concurrency: int,
    new_tokens: int,
    duration_s: float,
    request_timeout_s: float,
) -> dict[str, Any]:
    """Sample the server with py-spy while it serves `names` mixed at `concurrency`; top functions by time."""
    raw = out.with_suffix(".collapsed.txt")
    loadgen.warm_up(server.url, names, prompts[0], request_timeout_s)
    pid = str(server.proc.pid)
    cmd = [py_spy, "record", "--pid", pid, "--rate", "50", "--nonblocking", "--format", "raw",
           "--output", str(raw), "--duration", str(int(duration_s))]  # fmt: skip
    sampler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2)  # py-spy attaches
    models = loadgen.sample_adapters(names, requests, "uniform", seed=1)
    result = asyncio.run(
        loadgen.run_load(
            server.url,
            models,
            prompts,
            concurrency=concurrency,
            max_tokens=new_tokens,
            time_limit_s=duration_s,
            request_timeout_s=request_timeout_s,
        )
    )
    sampler.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
    try:
        _, err = sampler.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        sampler.kill()
        _, err = sampler.communicate()
    summary = summarise_collapsed(raw) if raw.is_file() else {"error": err.decode(errors="replace")[-1000:]}
    return {"load": result.to_dict(), "collapsed_stacks": str(raw), **summary}


def summarise_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks (`a;b;c count`)."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    by_thread: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        by_thread[frames[0]] = by_thread.get(frames[0], 0) + count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames[1:]):
            incl_counts[frame] = incl_counts.get(frame, 0) + count

    def share(counts: dict[str, int]) -> list[list[Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(n / total, 3)] for name, n in ranked]

    return {
        "samples": total,
        "threads": share(by_thread),
        "self": share(self_counts),
        "inclusive": share(incl_counts),
    }
