"""Benchmark servers as subprocesses on 127.0.0.1: start, wait until ready, sample RSS, read /metrics, stop.

Boundary: process and HTTP plumbing shared by `serve_bench.py` for every system it drives (adapterdock, the
naive PEFT server, vLLM); it knows each server only by its command line and URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

logger = logging.getLogger("serve_bench")
REPO = Path(__file__).resolve().parents[1]


# ---- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RssSampler:
    """Polls the RSS of a process and its children on a thread; `peak` since the last `reset`."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def current(self) -> int:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running())
        except psutil.Error:
            return 0

    def reset(self) -> None:
        self.peak = self.current()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.current())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass
class ServerProcess:
    """A server started as a subprocess on 127.0.0.1, with its log file and an RSS sampler."""

    name: str
    cmd: list[str]
    port: int
    log_path: Path
    ready_path: str = "/ready"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    rss: RssSampler | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> None:
        logger.info(
            "starting %s: %s", self.name, " ".join(self.cmd[:12]) + (" ..." if len(self.cmd) > 12 else "")
        )
        start = time.perf_counter()
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        self.rss = RssSampler(self.proc.pid)
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n"
                    + _tail(self.log_path)
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.startup_s = round(time.perf_counter() - start, 1)
                    logger.info("%s ready in %.1f s", self.name, self.startup_s)
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s} s; log: {self.log_path}\n" + _tail(self.log_path)
        )

    def stop(self) -> None:
        if self.rss:
            self.rss.stop()
        if self.proc and self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()


def _tail(path: Path, lines: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def running(server: ServerProcess, timeout_s: float) -> Iterator[ServerProcess]:
    try:
        server.start(timeout_s)
        yield server
    finally:
        server.stop()


# ---- server metrics -----------------------------------------------------------------------------------
_LE = re.compile(r'le="([^"]+)"')
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN|[+-]Inf)\s*$")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: sum over label sets}; histogram buckets keep their bound
    (`name_bucket{le="0.05"}`)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            name = match.group(1)
            bound = _LE.search(match.group(2) or "") if name.endswith("_bucket") else None
            if bound is not None:
                name += f'{{le="{bound.group(1)}"}}'
            totals[name] = totals.get(name, 0.0) + float(match.group(3))
    return totals


def histogram_median(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Median of the observations a histogram got between two scrapes, interpolated linearly inside its
    bucket (Prometheus' histogram_quantile); the lower bound when it falls in +Inf; None without any."""
    prefix = f"{name}_bucket{{"
    counts = sorted(
        (float(_LE.search(key).group(1)), value - before.get(key, 0.0))
        for key, value in after.items()
        if key.startswith(prefix)
    )
    if not counts or counts[-1][1] <= 0:
        return None
    half, lower, below = counts[-1][1] / 2, 0.0, 0.0
    for bound, count in counts:
        if count >= half:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (half - below) / (count - below)
        lower, below = bound, count
    return lower


def scrape(url: str, client: httpx.Client | None = None) -> dict[str, float]:
    """adapterdock's /metrics as {name: value}; {} for servers without it."""
    try:
        response = (client or httpx).get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    return parse_prometheus(response.text) if response.status_code == 200 else {}


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Adapter cache hit rate and mean load time between two scrapes of adapterdock's /metrics."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prefix = "adapterdock_adapter_cache_"
    if prefix + "hits_total" not in after:
        return {"cache_hit_rate": None, "mean_load_ms": None, "median_load_ms": None, "loads": None}
    hits, misses = delta(prefix + "hits_total"), delta(prefix + "misses_total")
    coalesced, loads = delta(prefix + "coalesced_total"), delta(prefix + "loads_total")
    lookups = hits + misses + coalesced
    seconds = delta("adapterdock_adapter_load_seconds_total")
    return {
        "cache_hit_rate": round(hits / lookups, 3) if lookups else None,
        "mean_load_ms": round(1000 * seconds / loads, 1) if loads else None,
        "median_load_ms": _ms(histogram_median(before, after, "adapterdock_adapter_load_latency_seconds")),
        "loads": int(loads),
        "evictions": int(delta(prefix + "evictions_total")),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)
