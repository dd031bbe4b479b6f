"""The scheduler: an asyncio front over ONE worker thread that owns the engine.

Requests from the event loop go into a bounded queue; the worker admits generation requests into free
KV-cache rows between decode steps (continuous batching), runs one shared decode step for every
running sequence whatever its adapter, retires finished or cancelled ones, and batches pending
classify / NER / score inputs of any adapters into shared forward passes. Token events flow back to
each request's asyncio queue with `call_soon_threadsafe`. Text is detokenized incrementally; stop
strings, stop tokens, `ignore_eos`, `min_tokens` and `max_new_tokens` are applied here.

Boundary: no HTTP. The engine is only touched from the worker thread (adapter loads excepted, which
the engine makes thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hub.errors import AdapterDockError
from server.engine import Engine, LoadedAdapter, SequenceTooLongError
from server.heads import bio_entities, classification_result, last_non_pad_index

logger = logging.getLogger(__name__)


class QueueFullError(AdapterDockError, RuntimeError):
    """The scheduler's queue is full; the request was not accepted."""

    default_remedy = "Retry after a short wait, or raise --max-queue."
    retry_after: float = 1.0


class SchedulerStoppedError(AdapterDockError, RuntimeError):
    """The scheduler is stopping or stopped and takes no more work."""

    default_remedy = "The server is shutting down; retry against a running server."


@dataclass
class GenerationRequest:
    """One completion to generate."""

    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class TokenEvent:
    """One generated token's text delta; the last event of a request carries `finish_reason`."""

    text: str
    token_id: int | None
    finish_reason: str | None
    """"stop" | "length" | None while running."""
    logprob: float | None = None
    """Log-probability of `token_id` under the model's (untempered) distribution, as TGI reports it."""


_DONE = object()


class _Detokenizer:
    """Incremental detokenization (prefix/read offsets, as TGI and vLLM do) plus stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stop = [s for s in stop if s]

    def add(self, token: int) -> None:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def find_stop(self) -> int | None:
        """Index in `text` where the earliest stop string begins, if any appeared."""
        window = self.emitted - max((len(s) for s in self.stop), default=0)
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, window))) >= 0]
        return min(hits) if hits else None

    def take(self, upto: int | None = None, final: bool = False) -> str:
        """Text not yet emitted, holding back a tail that could still become a stop string."""
        end = len(self.text) if upto is None else upto
        if not final and upto is None:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


class _GenJob:
    """A generation request in flight: its stream, sampling state and detokenizer."""

    def __init__(self, seq_id: int, request: GenerationRequest, loop, tokenizer, device) -> None:
        self.seq_id = seq_id
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.generated = 0
        self.detok = _Detokenizer(tokenizer, request.stop)
        self.generator: torch.Generator | None = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=device)
            if request.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.seed)

    @property
    def slot(self) -> int:
        return self.request.adapter.slot if self.request.adapter else 0

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _TokenStream:
    """The async iterator `Scheduler.generate` returns; closing it cancels the request."""

    def __init__(self, job: _GenJob, scheduler: Scheduler) -> None:
        self._job = job
        self._scheduler = scheduler

    def __aiter__(self) -> _TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._job.finished and self._job.queue.empty():
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except BaseException:
            self._cancel()
            raise
        if item is _DONE:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._job.finished = True
            raise item
        if item.finish_reason is not None:
            self._job.finished = True
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._job.finished:
            self._job.cancelled = True
            self._scheduler._wake()

    def __del__(self) -> None:
        if not self._job.finished:
            self._job.cancelled = True


class _TaskJob:
    """A classify / NER / score call: its inputs, and the future its results resolve."""

    def __init__(self, kind: str, adapter: LoadedAdapter, inputs: list[dict], loop) -> None:
        self.kind, self.adapter, self.inputs, self.loop = kind, adapter, inputs, loop
        self.future: asyncio.Future = loop.create_future()
        self.results: list[Any] = [None] * len(inputs)
        self.next = 0
        self.done = 0

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(_set)


class Scheduler:
    """Continuous batching of heterogeneous-adapter requests over one engine."""

    def __init__(self, engine: Engine, *, max_batch_size: int = 16, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch_size)
        self.max_queue = max_queue
        self.max_task_rows = 4 * self.max_batch_size
        self._pending: collections.deque[_GenJob] = collections.deque()
        self._tasks: collections.deque[_TaskJob] = collections.deque()
        self._running: dict[int, _GenJob] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._halt = False
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
        error = SchedulerStoppedError("The scheduler stopped before this request finished.")
        for job in [*self._pending, *self._running.values()]:
            job.finished = True
            job.push(error)
        for task in self._tasks:
            task.resolve(error=error)
        self._pending.clear()
        self._running.clear()
        self._tasks.clear()

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
        job = _GenJob(next(self._ids), request, loop, self.engine.tokenizer, self.engine.device)
        with self._cond:
            self._pending.append(job)
            self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
            self._cond.notify_all()
        return _TokenStream(job, self)

    async def classify(self, adapter: LoadedAdapter, texts: list[str]) -> list[dict]:
        """Label each text: [{"label": str, "scores": {label: probability}}]."""
        inputs = [{"ids": self._tokenize(t)} for t in texts]
        return await self._submit("classification", adapter, inputs)

    async def ner(self, adapter: LoadedAdapter, texts: list[str]) -> list[list[dict]]:
        """Entities of each text: [[{"type", "text", "start", "end", "score"}]]."""
        inputs = []
        for text in texts:
            enc = self.engine.tokenizer(text, return_offsets_mapping=True)
            self._check_input(enc["input_ids"])
            inputs.append({"ids": enc["input_ids"], "offsets": enc["offset_mapping"], "text": text})
        return await self._submit("ner", adapter, inputs)

    async def score(self, adapter: LoadedAdapter, pairs: list[tuple[str, str]]) -> list[float]:
        """Scalar reward of each (prompt, response), rendered with the base's chat template."""
        inputs = []
        for prompt, response in pairs:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False)
            inputs.append({"ids": self._tokenize(text, add_special_tokens=False)})
        return await self._submit("reward", adapter, inputs)

    def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        self._check_input(ids)
        return ids

    def _check_input(self, ids: list[int]) -> None:
        if not ids or len(ids) > self.engine.max_seq_len:
            raise SequenceTooLongError(
                f"An input of {len(ids)} tokens does not fit (1..{self.engine.max_seq_len})."
            )

    async def _submit(self, kind: str, adapter: LoadedAdapter, inputs: list[dict]) -> list:
        self._admit_check()
        if not inputs:
            return []
        if adapter.head is None:
            raise ValueError(f"Adapter {adapter.key} ({adapter.task}) has no task head.")
        job = _TaskJob(kind, adapter, inputs, asyncio.get_running_loop())
        with self._cond:
            self._tasks.append(job)
            self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
            self._cond.notify_all()
        return await job.future

    # ---- worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
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

    def _fail_running(self, exc: Exception) -> None:
        """After an unexpected error, end every running request with it and free the cache."""
        for job in list(self._running.values()):
            job.finished = True
            job.push(exc)
            self._retire(job)

    def _step(self) -> None:
        self._retire_cancelled()
        self._admit()
        self._run_tasks()
        if self._running:
            self._decode()
        self.stats["queue_depth"] = len(self._pending) + len(self._tasks)
        self.stats["running"] = len(self._running)

    def _retire_cancelled(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled]:
            self._retire(job)
        with self._cond:
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)

    def _retire(self, job: _GenJob) -> None:
        self.engine.release(job.seq_id)
        del self._running[job.seq_id]

    def _admit(self) -> None:
        admitted: list[_GenJob] = []
        with self._cond:
            free = min(self.engine.free_rows, self.max_batch_size - len(self._running))
            while self._pending and len(admitted) < free:
                job = self._pending.popleft()
                if not job.cancelled:
                    admitted.append(job)
        if not admitted:
            return
        try:
            logits = self.engine.prefill(
                [j.seq_id for j in admitted],
                [j.request.prompt_ids for j in admitted],
                [j.slot for j in admitted],
            )
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
            logger.exception("prefill failed")
            for job in admitted:
                job.finished = True
                job.push(exc)
            return
        for job in admitted:
            self._running[job.seq_id] = job
        self._emit(admitted, logits)

    def _decode(self) -> None:
        order = self.engine.active_ids
        jobs = [self._running[i] for i in order]
        logits = self.engine.decode([j.detok.tokens[-1] for j in jobs])
        self.stats["last_batch_size"] = len(jobs)
        self.stats["batches"] += 1
        self._emit(jobs, logits)

    def _emit(self, jobs: list[_GenJob], logits: torch.Tensor) -> None:
        """Sample one token per job, push its event, retire the finished."""
        for i, job in enumerate(jobs):
            if job.generated < job.request.min_tokens and self._eos:
                logits[i, list(self._eos)] = float("-inf")
        tokens = sample_tokens(logits, [j.request for j in jobs], [j.generator for j in jobs])
        chosen = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen).squeeze(-1).tolist()
        self.stats["tokens_generated"] += len(jobs)
        for job, token, logprob in zip(jobs, tokens, logprobs, strict=True):
            event = self._advance(job, token)
            event.logprob = logprob if logprob != float("-inf") else None
            job.push(event)
            if event.finish_reason is not None:
                job.finished = True
                self._retire(job)

    def _advance(self, job: _GenJob, token: int) -> TokenEvent:
        request = job.request
        job.generated += 1
        job.detok.add(token)
        past_min = job.generated >= request.min_tokens
        if token in self._eos and not request.ignore_eos and past_min:
            return TokenEvent(job.detok.take(final=True), token, "stop")
        if past_min and job.detok.stop:
            cut = job.detok.find_stop()
            if cut is not None:
                return TokenEvent(job.detok.take(upto=cut), token, "stop")
        if job.generated >= request.max_new_tokens:
            return TokenEvent(job.detok.take(final=True), token, "length")
        return TokenEvent(job.detok.take(), token, None)

    def _run_tasks(self) -> None:
        """One shared forward over pending task inputs of any adapters (up to max_task_rows)."""
        batch: list[tuple[_TaskJob, int]] = []
        with self._cond:
            while self._tasks and len(batch) < self.max_task_rows:
                job = self._tasks[0]
                take = min(len(job.inputs) - job.next, self.max_task_rows - len(batch))
                batch += [(job, job.next + k) for k in range(take)]
                job.next += take
                if job.next >= len(job.inputs):
                    self._tasks.popleft()
        if not batch:
            return
        try:
            hidden = self.engine.encode(
                [job.inputs[i]["ids"] for job, i in batch], [job.adapter.slot for job, _ in batch]
            )
            for (job, i), states in zip(batch, hidden, strict=True):
                job.results[i] = self._head_output(job, job.inputs[i], states)
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
            logger.exception("task batch failed")
            for job in {id(j): j for j, _ in batch}.values():
                job.resolve(error=exc)
            return
        for job, _ in batch:
            job.done += 1
            if job.done == len(job.inputs):
                job.resolve(job.results)

    def _head_output(self, job: _TaskJob, item: dict, states: torch.Tensor) -> Any:
        head, labels = job.adapter.head, job.adapter.labels
        if job.kind == "ner":
            return bio_entities(item["text"], head(states), item["offsets"], labels)
        index = last_non_pad_index(item["ids"], self.engine.config.pad_token_id)
        logits = head(states[index])
        if job.kind == "reward":
            return float(logits[0])
        return classification_result(logits, labels)


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


SAMPLING_EPS = 1e-5
"""Temperatures below this decode greedily (as in vLLM): dividing logits by them overflows to inf/NaN."""


def sample_tokens(logits: torch.Tensor, requests: list[GenerationRequest], generators: list) -> list[int]:
    """Next token per row: argmax when temperature is (about) 0, else temperature + top-p sampling.

    Each sampled row draws from its own `torch.Generator`, so a seeded request gets the same draws
    whatever else shares its batch.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, (request, generator) in enumerate(zip(requests, generators, strict=True)):
        if request.temperature < SAMPLING_EPS:
            continue
        probs = torch.softmax(logits[i] / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < request.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[i] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
