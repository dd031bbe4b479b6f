"""CPU time of an engine's prefill and decode steps: the timing loop the engine-level A/B benchmarks share.

CPU time (`time.process_time`) rather than wall time: on a shared machine other processes' load barely
moves it, so engines compared in one process, in alternating blocks, see comparable numbers.
"""

from __future__ import annotations

import time
from typing import Any


def time_block(
    engine: Any, slots: list[int], prompts: list[list[int]], steps: int
) -> tuple[float, list[float]]:
    """CPU seconds of one prefill and of each of `steps` decode steps of a batch whose rows use `slots`."""
    rows = list(range(len(slots)))
    started = time.process_time()
    tokens = engine.prefill(rows, prompts, slots).argmax(-1).tolist()
    prefill = time.process_time() - started
    decode = []
    for _ in range(steps):
        started = time.process_time()
        tokens = engine.decode(tokens).argmax(-1).tolist()
        decode.append(time.process_time() - started)
    for row in rows:
        engine.release(row)
    return prefill, decode
