"""The scheduler: continuous batching, solo-equal outputs, stops, cancellation, queue bound, tasks.

Task inputs are tokenized by `server.prompts`, as the routes do, so these tests cover that hand-off too.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from server.config import ServerConfig
from server.detokenize import Detokenizer
from server.errors import QueueFullError
from server.prompts import score_inputs, task_inputs
from server.requests import GenerationRequest
from server.scheduler import Scheduler

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def loaded(engine, adapters):
    held = {}
    for name in ("gen-a", "gen-b", "cls", "ner", "reward"):
        a = adapters[name]
        held[name] = engine.load_adapter(a.key, a.path, a.manifest)
    yield held
    for adapter in held.values():
        engine.unload_adapter(adapter)
    assert engine.active_ids == []


def _run(engine, body, **kwargs):
    async def main():
        scheduler = Scheduler(engine, **kwargs)
        await scheduler.start()
        try:
            return await body(scheduler)
        finally:
            await scheduler.stop(drain_timeout=5)

    return asyncio.run(main())


async def _collect(stream):
    return [event async for event in stream]


def _request(engine, adapter=None, prompt=PROMPT, **kw):
    ids = engine.tokenizer(prompt)["input_ids"]
    kw.setdefault("temperature", 0.0)
    return GenerationRequest(prompt_ids=ids, adapter=adapter, **kw)


def test_generate_streams_deltas_that_join_into_the_decoded_text(engine, loaded):
    async def body(s):
        return await _collect(s.generate(_request(engine, loaded["gen-a"], max_new_tokens=12)))

    events = _run(engine, body)
    tokens = [e.token_id for e in events]
    assert len(events) == 12 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(e.text for e in events) == text


def test_concurrent_mixed_adapters_get_their_solo_output_and_join_mid_decode(engine, loaded):
    adapters = [loaded["gen-a"], loaded["gen-b"], None]
    prompts = [PROMPT, "Hello there", "Adapters share one base"]

    async def solo(s):
        return [
            [e.token_id for e in await _collect(s.generate(_request(engine, a, p, max_new_tokens=10)))]
            for a, p in zip(adapters, prompts, strict=True)
        ]

    async def mixed(s):
        long = s.generate(_request(engine, adapters[0], prompts[0], max_new_tokens=10))
        first = await long.__anext__()  # the first request is decoding before the others arrive
        others = [
            asyncio.create_task(_collect(s.generate(_request(engine, a, p, max_new_tokens=10))))
            for a, p in zip(adapters[1:], prompts[1:], strict=True)
        ]
        rest = await _collect(long)
        done = [[e.token_id for e in await t] for t in others]
        return [[first.token_id] + [e.token_id for e in rest], *done], s.stats

    want = _run(engine, solo)
    got, stats = _run(engine, mixed)
    assert got == want
    assert stats["tokens_generated"] == 30 and stats["batches"] < 27  # decode steps were shared


def test_stop_string_truncates_and_min_tokens_defers_it(engine, loaded):
    async def body(s):
        full = await _collect(s.generate(_request(engine, loaded["gen-a"], max_new_tokens=16)))
        text = "".join(e.text for e in full)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stopped = await _collect(
            s.generate(_request(engine, loaded["gen-a"], max_new_tokens=16, stop=[stop]))
        )
        deferred = await _collect(
            s.generate(_request(engine, loaded["gen-a"], max_new_tokens=16, stop=[stop], min_tokens=16))
        )
        return text, stop, stopped, deferred

    text, stop, stopped, deferred = _run(engine, body)
    assert stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped) == text[: text.find(stop)]
    assert deferred[-1].finish_reason == "length" and "".join(e.text for e in deferred) == text


def test_stop_token_ignore_eos_and_min_tokens(engine, loaded):
    adapter = loaded["gen-a"]

    async def body(s):
        plain = await _collect(s.generate(_request(engine, adapter, max_new_tokens=8)))
        tokens = [e.token_id for e in plain]
        k = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])
        s._eos = {tokens[k]}  # pretend this token is the end of sequence
        stopped = await _collect(s.generate(_request(engine, adapter, max_new_tokens=8)))
        ignored = await _collect(s.generate(_request(engine, adapter, max_new_tokens=8, ignore_eos=True)))
        held = await _collect(s.generate(_request(engine, adapter, max_new_tokens=8, min_tokens=k + 2)))
        return tokens, k, stopped, ignored, held

    tokens, k, stopped, ignored, held = _run(engine, body)
    assert [e.token_id for e in stopped] == tokens[: k + 1]
    assert stopped[-1].finish_reason == "stop"
    assert [e.token_id for e in ignored] == tokens and ignored[-1].finish_reason == "length"
    assert tokens[k] not in [e.token_id for e in held[: k + 2]] and len(held) >= k + 2


def test_detokenizer_holds_back_a_possible_stop_prefix(engine):
    detok = Detokenizer(engine.tokenizer, ["STOP"])
    detok.text = "abc ST"
    assert detok.take() == "abc " and detok.find_stop() is None
    detok.text += "OP and more"
    assert detok.find_stop() == 4


def test_cancelling_a_stream_frees_its_row(engine, loaded):
    async def body(s):
        stream = s.generate(_request(engine, loaded["gen-b"], max_new_tokens=100))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if s.stats["running"] == 0 and not engine.active_ids:
                return s.stats["tokens_generated"]
            await asyncio.sleep(0.01)
        raise AssertionError("the cancelled request still holds a row")

    assert _run(engine, body) < 100


def test_the_last_token_pushed_just_before_finished_is_still_read(engine):
    """The worker pushes a request's last event, then sets `finished`; the put reaches the queue only when
    the event loop runs its callbacks. A stream that stopped on "finished and the queue empty" dropped that
    last token (seen as a 1-token answer to a 2-token request under load); it must end on the event."""
    from server.requests import TokenEvent
    from server.scheduler_jobs import GenJob, TokenStream

    async def main():
        request = _request(engine, max_new_tokens=2)
        job = GenJob(1, request, asyncio.get_running_loop(), engine.tokenizer, engine.device)
        stream = TokenStream(job, wake=lambda: None)
        job.push(TokenEvent(" a", 7, None))
        first = await stream.__anext__()
        job.push(TokenEvent(" b", 8, "length"))  # as the worker does, from its thread: queued later
        job.finished = True
        events = [first] + [event async for event in stream]
        return [(e.text, e.finish_reason) for e in events], job.cancelled

    events, cancelled = asyncio.run(main())
    assert events == [(" a", None), (" b", "length")]
    assert not cancelled


def test_a_prefill_that_fails_after_writing_the_cache_leaves_no_row_behind(engine, loaded, monkeypatch):
    """Rows recorded before a late failure (here lm_head) were never running: the next decode looked them up
    and failed every later step. They are released; the next request is served."""
    real_logits = engine._logits
    calls = {"n": 0}

    def failing_once(hidden):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("lm_head failed")
        return real_logits(hidden)

    monkeypatch.setattr(engine, "_logits", failing_once)

    async def body(s):
        with pytest.raises(RuntimeError, match="lm_head failed"):
            await _collect(s.generate(_request(engine, loaded["gen-a"], max_new_tokens=3)))
        assert engine.active_ids == []
        return await _collect(s.generate(_request(engine, loaded["gen-a"], max_new_tokens=3)))

    assert len(_run(engine, body)) == 3


def test_stop_drains_a_request_whose_prefill_is_under_way(engine, loaded, monkeypatch):
    """Admitted jobs are neither pending nor running while their prefill runs; `stop` must still see them
    as work to drain (a SIGTERM during a rolling deploy) rather than fail them."""
    import threading

    started, real_prefill = threading.Event(), engine.prefill

    def slow_prefill(*args, **kwargs):
        started.set()
        time.sleep(0.3)
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "prefill", slow_prefill)

    async def main():
        scheduler = Scheduler(engine)
        await scheduler.start()
        stream = scheduler.generate(_request(engine, loaded["gen-a"], max_new_tokens=3))
        collecting = asyncio.ensure_future(_collect(stream))
        await asyncio.to_thread(started.wait, 10)
        await scheduler.stop(drain_timeout=10)
        return await collecting

    events = asyncio.run(main())
    assert len(events) == 3 and events[-1].finish_reason == "length"


def test_a_worker_that_cannot_recover_fails_every_request_and_refuses_new_ones(engine, loaded, monkeypatch):
    """When freeing the rows after a failed step fails too, the worker thread ends: every stream must get an
    error (none waits forever) and new requests a 503-mapped error instead of a queue nobody serves."""
    from server.errors import SchedulerStoppedError

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        scheduler = Scheduler(engine)
        await scheduler.start()
        running = scheduler.generate(_request(engine, loaded["gen-a"], max_new_tokens=50))
        await running.__anext__()
        monkeypatch.setattr(engine, "decode", broken)
        monkeypatch.setattr(engine, "release", broken)
        with pytest.raises(RuntimeError, match="device lost"):
            await asyncio.wait_for(_collect(running), 10)
        await asyncio.to_thread(scheduler._thread.join, 10)
        with pytest.raises(SchedulerStoppedError):
            scheduler.generate(_request(engine, None, max_new_tokens=2))
        monkeypatch.undo()
        for seq_id in engine.active_ids:  # the rows the broken release could not free
            engine.release(seq_id)
        await scheduler.stop(drain_timeout=1)

    asyncio.run(main())


def test_queue_full_raises(engine, loaded):
    async def body(s):
        running = s.generate(_request(engine, None, max_new_tokens=60))
        await running.__anext__()  # occupies the only batch row
        waiting = [s.generate(_request(engine, None, max_new_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            s.generate(_request(engine, None, max_new_tokens=2))
        await running.aclose()
        return [len(await _collect(w)) for w in waiting]

    assert _run(engine, body, max_batch_size=1, max_queue=2) == [2, 2]


def test_seeded_sampling_is_reproducible_across_batches(engine, loaded):
    async def body(s):
        req = dict(temperature=0.8, top_p=0.9, seed=123, max_new_tokens=8)
        alone = await _collect(s.generate(_request(engine, loaded["gen-a"], **req)))
        noise = s.generate(_request(engine, None, "Hello there", max_new_tokens=8))
        shared = await _collect(s.generate(_request(engine, loaded["gen-a"], **req)))
        await _collect(noise)
        return [e.token_id for e in alone], [e.token_id for e in shared]

    alone, shared = _run(engine, body)
    assert alone == shared


def test_task_requests_of_different_adapters_run_together(engine, loaded):
    texts = ["Alice lives in Paris.", "Nothing to see here", "Bob met Carol in Rome yesterday."]
    config, tokenizer = ServerConfig(), engine.tokenizer

    async def body(s):
        cls_in = await task_inputs(tokenizer, texts, config)
        ner_in = await task_inputs(tokenizer, texts, config, offsets=True)
        score_in = await score_inputs(tokenizer, [("Hi", "Hello!"), ("2+2?", "4")], config)
        cls, ner, score = await asyncio.gather(
            s.classify(loaded["cls"], cls_in),
            s.ner(loaded["ner"], ner_in),
            s.score(loaded["reward"], score_in),
        )
        solo_cls = await s.classify(loaded["cls"], cls_in[:1])
        return cls, ner, score, solo_cls

    cls, ner, score, solo_cls = _run(engine, body)
    assert [set(r["scores"]) for r in cls] == [set(loaded["cls"].labels)] * 3
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in cls)
    assert cls[0]["label"] == solo_cls[0]["label"]
    assert cls[0]["scores"] == pytest.approx(solo_cls[0]["scores"], abs=1e-5)
    assert len(ner) == 3 and len(score) == 2 and all(isinstance(v, float) for v in score)
    for text, entities in zip(texts, ner, strict=True):
        for ent in entities:
            assert text[ent["start"] : ent["end"]] == ent["text"] and ent["type"] in ("PER", "LOC")
            assert 0 < ent["score"] <= 1


def test_loads_on_another_thread_do_not_disturb_running_requests(engine, loaded, adapters):
    other = adapters["gen-c"]

    async def body(s):
        solo = await _collect(s.generate(_request(engine, loaded["gen-a"], max_new_tokens=24)))
        stream = s.generate(_request(engine, loaded["gen-a"], max_new_tokens=24))
        first = await stream.__anext__()

        def churn():
            for _ in range(4):
                engine.unload_adapter(engine.load_adapter(other.key, other.path, other.manifest))

        churned, rest = await asyncio.gather(asyncio.to_thread(churn), _collect(stream))
        return [e.token_id for e in solo], [first.token_id] + [e.token_id for e in rest]

    solo, during = _run(engine, body)
    assert during == solo
