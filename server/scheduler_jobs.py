"""The scheduler's units of work, and the async streams that carry their results to the event loop.

A `GenJob` is one generation in flight: the worker thread samples its tokens and `push`es each event (or
an error) to its asyncio queue through `call_soon_threadsafe`; the route reads them through a
`TokenStream`, which ends on what it reads, never on a flag the worker set (see `TokenStream`). A `TaskJob`
is one classify / NER / score call, whose inputs the worker batches with other calls' and whose future it
resolves on the event loop.

Boundary: the hand-over between the worker thread and the event loop; batching is `server.scheduler`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from server.detokenize import SequenceOutput
from server.engine import LoadedAdapter
from server.requests import GenerationRequest, TaskInput, TokenEvent
from server.sampling import new_generator


class GenJob:
    """A generation request in flight: its stream, generator and output so far."""

    def __init__(self, seq_id: int, request: GenerationRequest, loop, tokenizer, device) -> None:
        self.seq_id = seq_id
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        """Set by the worker once it has pushed this job's last item (which may not be queued yet)."""
        self.output = SequenceOutput(request, tokenizer)
        self.generator = new_generator(request, device)

    @property
    def slot(self) -> int:
        return self.request.adapter.slot if self.request.adapter else 0

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def fail(self, error: BaseException) -> None:
        """End this request with `error` (the worker's last item for it)."""
        self.finished = True
        self.push(error)


class TokenStream:
    """The async iterator `Scheduler.generate` returns; closing it cancels the request.

    It ends on what it reads from the queue (an event with a finish reason, or an error), never on the
    job's `finished` flag: the worker sets that flag right after `push`, whose put reaches the queue only
    when the event loop next runs its callbacks, so "finished and the queue empty" could be seen with the
    last token still on its way, and the answer would silently lose it.
    """

    def __init__(self, job: GenJob, wake: Callable[[], None]) -> None:
        self._job = job
        self._wake = wake
        """Wakes the worker (a cancelled job frees its row at the next step)."""
        self._ended = False
        """A terminal item was read (event loop thread only)."""

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except BaseException:
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        self._ended = item.finish_reason is not None
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not (self._ended or self._job.finished):
            self._job.cancelled = True
            self._wake()

    def __del__(self) -> None:
        if not (self._ended or self._job.finished):
            self._job.cancelled = True


class TaskJob:
    """A classify / NER / score call: its inputs, and the future its results resolve."""

    def __init__(self, kind: str, adapter: LoadedAdapter, inputs: list[TaskInput], loop) -> None:
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
