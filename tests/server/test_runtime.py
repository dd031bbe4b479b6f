"""`server.runtime`'s engine and scheduler Protocols: the real classes and the test fakes implement them."""

from __future__ import annotations

import inspect

from server.runtime import EngineLike, SchedulerLike
from tests.server.fakes import FakeEngine, FakeScheduler


def _members(protocol: type) -> dict[str, object]:
    names = set(protocol.__annotations__) | {
        n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")
    }
    return {n: getattr(protocol, n, None) for n in names}


def _check(protocol: type, implementation: object) -> None:
    for name, member in _members(protocol).items():
        assert hasattr(implementation, name), f"{type(implementation).__name__} lacks {name}"
        if callable(member):
            want = list(inspect.signature(member).parameters)
            got = list(inspect.signature(getattr(type(implementation), name)).parameters)
            assert got == want, (name, got, want)


def test_the_fakes_implement_the_protocols():
    engine = FakeEngine()
    _check(EngineLike, engine)
    _check(SchedulerLike, FakeScheduler(engine))


def test_the_real_classes_implement_the_protocols(engine):
    from server.scheduler import Scheduler

    _check(EngineLike, engine)
    _check(SchedulerLike, Scheduler(engine))


def test_the_protocols_list_what_the_http_layer_uses():  # so the checks above check something
    assert set(_members(EngineLike)) == {
        "tokenizer", "memory_footprint", "load_adapter", "load_adapter_set", "unload_adapter"
    }  # fmt: skip
    assert set(_members(SchedulerLike)) == {"stats", "start", "stop", "generate", "classify", "ner", "score"}
