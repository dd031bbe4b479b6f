"""Prometheus metrics of one server app, in its own `CollectorRegistry` (two apps in one process never clash).

Boundary: counters and histograms that the HTTP edge updates (requests, latency, tokens), plus a collector
that reads the live state of the adapter cache, the scheduler and the engine at scrape time. Label values
are route templates, resolved `name@version` keys and scoped key names (`--keys-file`, never a secret)
only, never raw client strings, so cardinality stays bounded.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from server.adapter_cache import LOAD_SECONDS_BUCKETS
from server.quotas import charge_tokens

PREFIX = "adapterdock"
NO_ADAPTER = "-"
"""Adapter label of requests that use the bare base or that failed before resolving one."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metrics of one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests served, by endpoint, adapter and status.",
            ["endpoint", "adapter", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to the last byte of the response, by endpoint and adapter.",
            ["endpoint", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_in = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt (input) tokens processed, by adapter.",
            ["adapter"],
            registry=self.registry,
        )
        self.tokens_out = Counter(
            f"{PREFIX}_generated_tokens",
            "Tokens generated, by adapter.",
            ["adapter"],
            registry=self.registry,
        )
        self.key_requests = Counter(
            f"{PREFIX}_key_requests",
            "HTTP requests made with a scoped key (--keys-file), by key name and status.",
            ["key", "status"],
            registry=self.registry,
        )
        self.key_tokens = Counter(
            f"{PREFIX}_key_tokens",
            "Prompt + generated tokens used by a scoped key, by key name.",
            ["key"],
            registry=self.registry,
        )
        self._live = _LiveCollector()
        self.registry.register(self._live)

    def bind(self, *, cache: Any = None, scheduler: Any = None, engine: Any = None) -> None:
        """Point the scrape-time collector at the running cache, scheduler and engine."""
        self._live.cache, self._live.scheduler, self._live.engine = cache, scheduler, engine

    def observe_request(self, endpoint: str, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, adapter, str(status)).inc()
        self.latency.labels(endpoint, adapter).observe(seconds)

    def observe_tokens(self, adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        """Count one request's tokens, and charge them to its scoped key's quota (if any)."""
        if prompt_tokens:
            self.tokens_in.labels(adapter).inc(prompt_tokens)
        if generated_tokens:
            self.tokens_out.labels(adapter).inc(generated_tokens)
        charge_tokens(prompt_tokens + generated_tokens)

    def observe_key_request(self, key: str, status: int) -> None:
        self.key_requests.labels(key, str(status)).inc()

    def observe_key_tokens(self, key: str, tokens: int) -> None:
        self.key_tokens.labels(key).inc(tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Reads cache, scheduler and engine state when Prometheus scrapes."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.scheduler: Any = None
        self.engine: Any = None

    def describe(self) -> list:
        return []  # dynamic: nothing to check at registration

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        if self.cache is not None:
            yield from _cache_metrics(self.cache.stats)
        if self.scheduler is not None:
            yield from _scheduler_metrics(dict(self.scheduler.stats))
        if self.engine is not None:
            footprint = getattr(self.engine, "memory_footprint", None)
            if footprint is not None:
                yield GaugeMetricFamily(
                    f"{PREFIX}_base_memory_bytes",
                    "Bytes the loaded base model's weights occupy.",
                    value=footprint,
                )
            report = getattr(self.engine, "memory_report", None)
            if report is not None:
                yield _memory_metric(report())


def _memory_metric(report: dict[str, int]) -> GaugeMetricFamily:
    """`Engine.memory_report()` as one gauge labelled by part (base, adapter_in_use, kv_free, rss, ...)."""
    family = GaugeMetricFamily(
        f"{PREFIX}_memory_bytes",
        "Resident memory by part: base weights, adapter pages and KV cache (in use, allocated, free within "
        "the memory budget), adapter factors gathered for recent batches, the budget, and the process RSS.",
        labels=["part"],
    )
    for name, value in report.items():
        family.add_metric([name.replace("_bytes", "")], value)
    return family


def _cache_metrics(stats: dict[str, Any]):
    counters = {
        "hits": "Adapter requests served by a resident adapter.",
        "misses": "Adapter requests that started a load.",
        "coalesced": "Adapter requests that joined a load already in progress.",
        "evictions": "Adapters evicted to make room.",
        "loads": "Adapters loaded.",
        "load_failures": "Adapter loads that failed (corrupt adapters, no slot in time).",
    }
    for key, text in counters.items():
        yield CounterMetricFamily(f"{PREFIX}_adapter_cache_{key}", text, value=stats.get(key, 0))
    yield CounterMetricFamily(
        f"{PREFIX}_adapter_load_seconds",
        "Seconds spent loading adapters (sum over loads).",
        value=stats.get("load_seconds_total", 0.0),
    )
    counts = stats.get("load_seconds_buckets")
    if counts is not None:
        yield HistogramMetricFamily(
            f"{PREFIX}_adapter_load_latency_seconds",
            "Seconds from asking for a cold adapter to having it ready (queueing for the load worker, "
            "reading, checking, copying into pages).",
            buckets=[(_bound(b), c) for b, c in zip(LOAD_SECONDS_BUCKETS, counts, strict=True)],
            sum_value=stats.get("load_seconds_total", 0.0),
        )
    gauges = {
        "resident": "Adapters resident in engine slots.",
        "resident_bytes": "Bytes of resident adapter weights.",
        "pinned": "Pinned adapters.",
        "in_use": "Adapters leased by in-flight requests.",
        "waiting": "Adapter loads waiting for a free slot.",
    }
    for key, text in gauges.items():
        yield GaugeMetricFamily(f"{PREFIX}_adapter_cache_{key}", text, value=stats.get(key, 0))


def _bound(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else repr(seconds)


def _scheduler_metrics(stats: dict[str, Any]):
    """Queue depth and batch size under their own names, then every statistic the scheduler keeps."""
    if "queue_depth" in stats:
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for the scheduler.", value=stats["queue_depth"]
        )
    if "last_batch_size" in stats:
        yield GaugeMetricFamily(
            f"{PREFIX}_batch_size", "Sequences in the current forward batch.", value=stats["last_batch_size"]
        )
    for key, value in sorted(stats.items()):
        if isinstance(value, int | float) and not isinstance(value, bool) and key.isidentifier():
            yield GaugeMetricFamily(f"{PREFIX}_scheduler_{key}", f"Scheduler statistic {key}.", value=value)
