"""The scheduler: an asyncio front over ONE worker thread that owns the engine.

Requests from the event loop go into a bounded queue; the worker admits generation requests into free
KV-cache rows between decode steps (continuous batching), first in first out, each once the shared memory
budget holds its KV cache at full length (`server.kv_admission`: idle adapters are evicted for it first,
and one that can never fit gets a `MemoryBudgetError`). It runs one shared decode step for every
running sequence whatever its adapter, retires finished or cancelled ones, and batches pending
classify / NER / score inputs of any adapters into shared forward passes. Token events flow back to
each request's asyncio queue with `call_soon_threadsafe` (`server.scheduler_jobs`). Choosing tokens is
`server.sampling`'s, turning them into text and stop decisions `server.detokenize`'s, and turning hidden
states into task answers `server.heads`'; task inputs arrive tokenized (`server.prompts`).

Boundary: batching and the worker thread; no HTTP, no tokenizing. The engine is only touched from the
worker thread (adapter loads excepted, which the engine makes thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch

from server.engine import Engine, LoadedAdapter
from server.errors import (
    MemoryBudgetError,
    NonFiniteOutputError,
    QueueFullError,
    SchedulerStoppedError,
    SequenceTooLongError,
)
from server.heads import CLASSIFICATION, NER, REWARD, task_result
from server.kv_admission import KVAdmission
from server.requests import GenerationRequest, TaskInput, TokenEvent
from server.sampling import sample_tokens, suppress, token_logprobs
from server.scheduler_jobs import GenJob, TaskJob, TokenStream

logger = logging.getLogger(__name__)


MEMORY_POLL_S = 0.05
"""How often a worker waiting for memory with nothing else to do looks again (it is also woken whenever
bytes are freed)."""


class Scheduler:
    """Continuous batching of heterogeneous-adapter requests over one engine."""

    def __init__(self, engine: Engine, *, max_batch_size: int = 16, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch_size)
        self.max_queue = max_queue
        self.max_task_rows = 4 * self.max_batch_size
        self._pending: collections.deque[GenJob] = collections.deque()
        self._tasks: collections.deque[TaskJob] = collections.deque()
        self._running: dict[int, GenJob] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._halt = False
        self._memory = KVAdmission(engine, self._wake)
        self._retired = 0
        self._eos = self._eos_ids()
        self.stats: dict[str, int] = {
            "queue_depth": 0,
            "running": 0,
            "last_batch_size": 0,
            "batches": 0,
            "tokens_generated": 0,
        }

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.engine.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.engine.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker thread."""
        if self._thread is not None:
            return
        self._stopping = self._halt = False
        self.engine.ledger.on_free(self._wake)  # bytes freed: a waiting admission may fit now
        self._thread = threading.Thread(target=self._run, name="adapterdock-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Take no new work, let running work finish for up to `drain_timeout` s, then fail the rest."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._halt = True
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.engine.ledger.off_free(self._wake)
        self.engine.ledger.want_kv(0)
        self._fail_all(SchedulerStoppedError("The scheduler stopped before this request finished."))

    def _has_work(self) -> bool:
        return bool(self._pending or self._running or self._tasks)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _admit_check(self) -> None:
        if self._stopping or self._thread is None:
            raise SchedulerStoppedError("The scheduler is not running.")
        if len(self._pending) + len(self._tasks) >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting.")

    # ---- public requests -------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue a generation; iterate the result for its token events.

        Raises:
            QueueFullError: the queue is full. SequenceTooLongError: prompt + max_new_tokens do not
                fit the context. ValueError: invalid sampling parameters.
        """
        self._admit_check()
        _validate(request, self.engine.max_seq_len)
        loop = asyncio.get_running_loop()
        job = GenJob(next(self._ids), request, loop, self.engine.tokenizer, self.engine.device)
        with self._cond:
            self._pending.append(job)
            self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
            self._cond.notify_all()
        return TokenStream(job, self._wake)

    async def classify(self, adapter: LoadedAdapter, inputs: list[TaskInput]) -> list[dict]:
        """Label each input: [{"label": str, "scores": {label: probability}}]."""
        return await self._submit(CLASSIFICATION, adapter, inputs)

    async def ner(self, adapter: LoadedAdapter, inputs: list[TaskInput]) -> list[list[dict]]:
        """Entities of each input (tokenized with offsets): [[{"type", "text", "start", "end", "score"}]]."""
        return await self._submit(NER, adapter, inputs)

    async def score(self, adapter: LoadedAdapter, inputs: list[TaskInput]) -> list[float]:
        """Scalar reward of each input (a prompt/response rendered with the base's chat template)."""
        return await self._submit(REWARD, adapter, inputs)

    def _check_input(self, ids: list[int]) -> None:
        """Refuse an input here, so it cannot fail the shared forward it would join."""
        if not ids or len(ids) > self.engine.max_seq_len:
            raise SequenceTooLongError(
                f"An input of {len(ids)} tokens does not fit (1..{self.engine.max_seq_len})."
            )

    async def _submit(self, kind: str, adapter: LoadedAdapter, inputs: list[TaskInput]) -> list:
        self._admit_check()
        if not inputs:
            return []
        for item in inputs:
            self._check_input(item.ids)
        if adapter.head is None:
            raise ValueError(f"Adapter {adapter.key} ({adapter.task}) has no task head.")
        job = TaskJob(kind, adapter, inputs, asyncio.get_running_loop())
        with self._cond:
            self._tasks.append(job)
            self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
            self._cond.notify_all()
        return await job.future

    # ---- worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._halt:
                    with self._cond:
                        while not self._has_work() and not self._stopping:
                            self._cond.wait(timeout=0.5)
                        if self._stopping and not self._has_work():
                            return
                    try:
                        self._step()
                    except Exception as exc:  # noqa: BLE001 - the worker must survive a failed step
                        logger.exception("engine step failed; failing the running requests")
                        self._fail_running(exc)
        except BaseException as exc:
            # Only an error while failing the running requests (say, a device that keeps failing) gets
            # here: nothing would answer the queue any more, so refuse new work and end every request.
            logger.exception("the engine worker stopped; failing every request")
            self._stopping = True
            self._fail_all(exc)

    def _fail_running(self, exc: Exception) -> None:
        """After an unexpected error, end every running request with it, then free their rows."""
        jobs = list(self._running.values())
        for job in jobs:  # every stream gets its error first, whatever freeing the cache does next
            job.fail(exc)
        for job in jobs:
            self._retire(job)

    def _fail_all(self, exc: BaseException) -> None:
        """End every request, queued, running or a task, with `exc` (the worker is going away)."""
        error = exc if isinstance(exc, Exception) else SchedulerStoppedError("The engine worker stopped.")
        with self._cond:
            jobs = [*self._pending, *self._running.values()]
            tasks = list(self._tasks)
            self._pending.clear()
            self._tasks.clear()
        self._running.clear()
        for job in jobs:
            job.fail(error)
        for task in tasks:
            task.resolve(error=error)

    def _step(self) -> None:
        self._retire_cancelled()
        admitted = self._admit()
        ran_tasks = self._run_tasks()
        if self._running:
            self._decode()
        elif not (admitted or ran_tasks):  # waiting for memory alone: do not spin
            with self._cond:
                self._cond.wait(timeout=MEMORY_POLL_S)
        self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
        self.stats["running"] = len(self._running)

    def _retire_cancelled(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled]:
            self._retire(job)
        with self._cond:
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)

    def _retire(self, job: GenJob) -> None:
        self.engine.release(job.seq_id)
        del self._running[job.seq_id]
        self._retired += 1

    def _admit(self) -> bool:
        """Prefill the pending sequences that have rows and memory, in order; -> whether any did."""
        with self._cond:
            free = min(self.engine.free_rows, self.max_batch_size - len(self._running))
            candidates = list(itertools.islice(self._pending, free))
        if not candidates:
            self._memory.idle()
            return False
        reserves = [_reserve(j.request) for j in candidates]
        try:
            count = self._memory.admit(reserves, running=bool(self._running), retired=self._retired)
        except MemoryBudgetError as exc:
            self._refuse(exc)
            return True  # the next in the queue may fit: look again at once
        admitted, reserves = candidates[:count], reserves[:count]
        if not admitted:
            return False
        # The admitted stay in `_pending` until they are in `_running` (or failed): `stop` drains while
        # either holds work, so a prefill under way is never taken for an idle queue.
        try:
            logits = self.engine.prefill(
                [j.seq_id for j in admitted],
                [j.request.prompt_ids for j in admitted],
                [j.slot for j in admitted],
                reserves,
            )
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
            logger.exception("prefill failed")
            for job in admitted:
                job.fail(exc)
            self._dequeue(len(admitted))
            for job in admitted:
                self.engine.release(job.seq_id)  # rows a late failure (after the cache write) left behind
            return True
        for job in admitted:
            self._running[job.seq_id] = job
        self._dequeue(len(admitted))
        self._emit(admitted, logits)
        return True

    def _dequeue(self, count: int) -> None:
        """Drop the first `count` pending jobs (the worker alone removes from the left: they are still the
        ones it admitted)."""
        with self._cond:
            for _ in range(count):
                self._pending.popleft()

    def _refuse(self, exc: MemoryBudgetError) -> None:
        """Fail the head of the queue with `exc`."""
        with self._cond:
            job = self._pending.popleft()
        logger.warning("refused request %d: %s", job.seq_id, exc)
        job.fail(exc)

    def _decode(self) -> None:
        order = self.engine.active_ids
        jobs = [self._running[i] for i in order]
        logits = self.engine.decode([j.output.last_token for j in jobs])
        self.stats["last_batch_size"] = len(jobs)
        self.stats["batches"] += 1
        self._emit(jobs, logits)

    def _emit(self, jobs: list[GenJob], logits: torch.Tensor) -> None:
        """Sample one token per job, push its event, retire the finished (and rows gone non-finite)."""
        jobs, logits = self._drop_non_finite(jobs, logits)
        if not jobs:
            return
        suppress(logits, [i for i, j in enumerate(jobs) if j.output.before_min_tokens], self._eos)
        tokens = sample_tokens(logits, [j.request for j in jobs], [j.generator for j in jobs])
        logprobs = token_logprobs(logits, tokens)
        self.stats["tokens_generated"] += len(jobs)
        for job, token, logprob in zip(jobs, tokens, logprobs, strict=True):
            event = job.output.advance(token, self._eos)
            event.logprob = logprob
            job.push(event)
            if event.finish_reason is not None:
                job.finished = True
                self._retire(job)

    def _drop_non_finite(self, jobs: list[GenJob], logits: torch.Tensor) -> tuple[list[GenJob], torch.Tensor]:
        """Fail (and retire) each job whose row of `logits` holds NaN or infinity; -> the others' rows.

        A row's values never mix with another row's in the forward, so one adapter (or input) that
        overflows costs its own request only; sampling it would pick garbage or make multinomial raise
        for the whole batch.
        """
        finite = torch.isfinite(logits).all(dim=-1)
        if bool(finite.all()):
            return jobs, logits
        keep = finite.nonzero().flatten()
        for index in (~finite).nonzero().flatten().tolist():
            job = jobs[index]
            logger.warning(
                "request %d produced non-finite logits (slot %d); failing it alone", job.seq_id, job.slot
            )
            job.fail(_non_finite(job.request.adapter))
            self._retire(job)
        return [jobs[i] for i in keep.tolist()], logits[keep]

    def _run_tasks(self) -> bool:
        """One shared forward over pending task inputs of any adapters (up to max_task_rows); -> whether
        there were any."""
        batch: list[tuple[TaskJob, int]] = []
        with self._cond:
            while self._tasks and len(batch) < self.max_task_rows:
                job = self._tasks[0]
                take = min(len(job.inputs) - job.next, self.max_task_rows - len(batch))
                batch += [(job, job.next + k) for k in range(take)]
                job.next += take
                if job.next >= len(job.inputs):
                    self._tasks.popleft()
        if not batch:
            return False
        try:
            hidden = self.engine.encode(
                [job.inputs[i].ids for job, i in batch], [job.adapter.slot for job, _ in batch]
            )
            pad = self.engine.config.pad_token_id
            failed: dict[int, TaskJob] = {}
            for (job, i), states in zip(batch, hidden, strict=True):
                if not bool(torch.isfinite(states).all()):  # this input alone; the rest are answered
                    failed[id(job)] = job
                    continue
                head, labels = job.adapter.head, job.adapter.labels
                job.results[i] = task_result(job.kind, head, labels, job.inputs[i], states, pad)
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
            logger.exception("task batch failed")
            for job in {id(j): j for j, _ in batch}.values():
                job.resolve(error=exc)
            return True
        for job in failed.values():
            logger.warning(
                "a %s input produced non-finite hidden states; failing its request alone", job.kind
            )
            job.resolve(error=_non_finite(job.adapter))
        for job, _ in batch:
            if id(job) in failed:
                continue
            job.done += 1
            if job.done == len(job.inputs):
                job.resolve(job.results)
        return True


def _reserve(request: GenerationRequest) -> int:
    """Tokens a sequence may reach: its KV cache is reserved at this length from its prefill on."""
    return len(request.prompt_ids) + request.max_new_tokens


def _non_finite(adapter: LoadedAdapter | None) -> NonFiniteOutputError:
    who = f"adapter {adapter.key}" if adapter is not None else "the base model"
    return NonFiniteOutputError(f"The forward pass of {who} produced non-finite (NaN or infinite) values.")


def _validate(request: GenerationRequest, max_seq_len: int) -> None:
    if not request.prompt_ids:
        raise ValueError("The prompt is empty; send at least one token.")
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}.")
    if request.temperature < 0 or not 0 < request.top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1].")
    total = len(request.prompt_ids) + request.max_new_tokens
    if total > max_seq_len:
        raise SequenceTooLongError(
            f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens exceed "
            f"the context of {max_seq_len} tokens."
        )
