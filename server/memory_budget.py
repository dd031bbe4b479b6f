"""The memory budget for what the engine allocates beside the base: adapter pages and the KV cache.

`--memory-budget MIB` (default: `DEFAULT_FRACTION` of the memory available once the base is loaded: free
RAM on a CPU, free device memory on a GPU) is ONE budget shared by adapter weights and the KV cache, with
no fixed split: `server.memory_ledger` holds what each has charged, and either may take what the other has
not. The KV cache has a hard ceiling of its own, fixed here: as many rows of `max_seq_len` tokens as the
whole budget holds, up to `--max-batch-size` (the cache grows by use up to it, `server.kv_cache`). A budget
that cannot hold one row of KV stops the start with a `ServerConfigError` naming the remedy.

Also the memory report by part (base, adapters, KV, process RSS) that the start-up log, `GET /v1/adapters`
and `/metrics` show. Boundary: arithmetic and OS readings; no tensors are allocated here.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from server.errors import ServerConfigError

DEFAULT_FRACTION = 0.5
"""Share of the memory available after the base loads that the default budget takes (the rest is left
for activations, the Python heap and other processes)."""


@dataclass(frozen=True)
class MemoryPlan:
    """The budget and the KV cache's ceiling within it."""

    budget: int
    """Bytes for adapters + KV cache."""
    derived: bool
    """True when the budget was derived from the machine (no --memory-budget)."""
    kv_rows: int
    """Rows (sequences at once) the KV cache may grow to: min(--max-batch-size, what the budget holds)."""
    kv_max_bytes: int
    """Bytes of the KV cache at its ceiling (kv_rows x max_seq_len tokens); it reaches them only when
    adapters leave that much of the budget free."""


def available_bytes(device_type: str) -> int:
    """Memory free now: device memory on CUDA, else MemAvailable (Linux), else physical pages."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_memory(
    budget_mb: float | None,
    *,
    row_bytes: int,
    max_batch_size: int,
    device_type: str,
) -> MemoryPlan:
    """Size the budget and the KV cache's ceiling within it (adapters share the same bytes).

    Args:
        budget_mb: --memory-budget in MiB; None derives it from the machine.
        row_bytes: KV bytes of one row at max_seq_len tokens.
        max_batch_size: the most rows asked for.
        device_type: "cpu" or "cuda" (where the default budget is measured).

    Raises:
        ServerConfigError: the budget cannot hold one row of KV cache.
    """
    derived = budget_mb is None
    budget = int(DEFAULT_FRACTION * available_bytes(device_type)) if derived else int(budget_mb * 2**20)
    rows = min(max_batch_size, budget // max(row_bytes, 1))
    if rows < 1:
        source = "derived from the free memory" if derived else "given by --memory-budget"
        raise ServerConfigError(
            f"The memory budget ({budget / 2**20:.0f} MiB, {source}) cannot hold the KV cache of one "
            f"sequence ({row_bytes / 2**20:.1f} MiB at the full context).",
            f"Raise --memory-budget above {row_bytes / 2**20:.0f} MiB (plus what adapters need), or lower "
            "--max-input-tokens / --max-new-tokens.",
        )
    return MemoryPlan(budget=budget, derived=derived, kv_rows=rows, kv_max_bytes=rows * row_bytes)


def process_rss() -> int:
    """Resident bytes of this process now (Linux /proc), else its peak so far (getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_report(report: dict[str, int]) -> str:
    """One log line of `Engine.memory_report()` in MiB."""
    return ", ".join(
        f"{name.removesuffix('_bytes')} {value / 2**20:.1f} MiB" for name, value in report.items()
    )
