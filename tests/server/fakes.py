"""Fast fakes of the compute core (tokenizer, engine, scheduler) for the HTTP layer's unit tests.

They implement `server.runtime`'s `EngineLike` and `SchedulerLike` (with `server.requests`' types) with
deterministic, input-dependent answers, so the routes, cache and
resolver can be tested in milliseconds without torch work. The real engine is covered by
tests/server/test_engine.py and the real server by test_integration_server.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from hub.bases import BaseInfo
from hub.manifest import BaseSpec, Manifest
from hub.store import LocalStore
from server.app import create_app
from server.config import ServerConfig
from server.errors import QueueFullError
from server.requests import GenerationRequest, TaskInput, TokenEvent

FAKE_FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32
FAKE_BASE = BaseInfo(name_or_path="tiny", path=Path("/nonexistent/tiny"), fingerprint=FAKE_FINGERPRINT)
_OFFSET = 5  # ids 0..4 are special: <pad>=0 <s>=1 </s>=2 <|im_start|>=3 <|im_end|>=4


class FakeTokenizer:
    """Byte-level: id = byte + 5; eos = 4."""

    eos_token_id = 4
    all_special_ids = [0, 1, 2, 3, 4]

    def __len__(self) -> int:
        return 256 + _OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict[str, list]:
        ids = self.encode(text)
        if not return_offsets_mapping:
            return {"input_ids": ids}
        starts = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
        return {"input_ids": ids, "offset_mapping": [(s, s + 1) for s in starts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - _OFFSET for i in ids if i >= _OFFSET).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False) -> str:
        if any(m["role"] == "assistant" for m in messages[:1]):
            raise ValueError("Conversation must start with a system or user message.")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeAdapter:
    key: str
    slot: int
    task: str
    labels: list[str]
    nbytes: int
    manifest: Manifest


class FakeEngine:
    """Records loads; `gate` (a threading.Event) can hold loads to test concurrency."""

    memory_footprint = 123_456

    def __init__(self, max_adapters: int = 4) -> None:
        self.tokenizer = FakeTokenizer()
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.free = list(range(max_adapters, 0, -1))
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def memory_report(self) -> dict[str, int]:
        """The real engine's report fields (`server.engine.Engine.memory_report`), fixed numbers."""
        parts = ("adapter_bytes_in_use", "adapter_bytes_allocated", "adapter_bytes_free", "kv_bytes_in_use")
        parts += ("adapter_bytes_gathered",)
        report = {"base_bytes": self.memory_footprint} | {part: 1024 for part in parts}
        kv = {"kv_bytes_allocated": 2048, "kv_bytes_free": 4096}
        return report | kv | {"budget_bytes": 8192, "rss_bytes": 1}

    def load_adapter(self, key: str, folder: Path, manifest: Manifest) -> FakeAdapter:
        if self.gate is not None:
            self.gate.wait(10)
        config = json.loads((folder / "adapter_config.json").read_text())
        with self._lock:
            self.loads.append(key)
            slot = self.free.pop()
        return FakeAdapter(
            key, slot, manifest.task, list(manifest.labels), int(config.get("r", 1)) * 100, manifest
        )

    def load_adapter_set(self, key: str, parts: list[tuple[str, Path, Manifest, float]]) -> FakeAdapter:
        """A weighted set as one fake adapter (in a slot of its own, like the engine's)."""
        return self.load_adapter(key, parts[0][1], parts[0][2])

    def unload_adapter(self, adapter: FakeAdapter) -> None:
        with self._lock:
            self.unloads.append(adapter.key)
            self.free.append(adapter.slot)


def fake_text(request: GenerationRequest, tokenizer: FakeTokenizer) -> str:
    """What the fake generates: `<key>|<prompt>` reversed, so adapters and prompts both show."""
    key = request.adapter.key if request.adapter is not None else "base"
    return (key + "|" + tokenizer.decode(request.prompt_ids))[::-1]


class FakeScheduler:
    """One character per token; honours max_new_tokens, stop strings and an explicit queue-full switch."""

    def __init__(self, engine: FakeEngine, delay: float = 0.0) -> None:
        self.engine = engine
        self.delay = delay
        self.full = False
        self.started = self.stopped = False
        self.requests: list[GenerationRequest] = []
        self.cancelled = 0
        self.fail_after: int | None = None
        """Raise a RuntimeError after this many tokens (tests mid-stream failures)."""
        self.stats = {"queue_depth": 0, "running": 0, "last_batch_size": 1, "batches": 0}

    async def start(self) -> None:
        self.started = True

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.stopped = True

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.full:
            raise QueueFullError("256 requests are already waiting.")
        self.requests.append(request)
        return self._events(request)

    async def _events(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        text = fake_text(request, self.engine.tokenizer)
        limit = request.max_new_tokens
        cuts = [i for stop in request.stop if 0 <= (i := text.find(stop)) < limit]
        if cuts:
            body, reason = text[: min(cuts)], "stop"
        elif len(text) > limit:
            body, reason = text[:limit], "length"
        else:
            body, reason = text, "stop"  # as if the model produced its end-of-sequence token
        natural_end = reason == "stop" and not cuts
        try:
            for i, char in enumerate(body):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("engine step failed")
                last = i == len(body) - 1 and not natural_end
                yield TokenEvent(char, ord(char) + _OFFSET, reason if last else None)
            if natural_end or not body:  # the model's end-of-sequence token ends the stream, as for real
                yield TokenEvent("", FakeTokenizer.eos_token_id, reason)
        except GeneratorExit:
            self.cancelled += 1
            raise

    async def classify(self, adapter: FakeAdapter, inputs: list[TaskInput]) -> list[dict]:
        labels = adapter.labels
        results = []
        for item in inputs:
            winner = labels[len(item.text) % len(labels)]
            results.append({"label": winner, "scores": {lab: float(lab == winner) for lab in labels}})
        return results

    async def ner(self, adapter: FakeAdapter, inputs: list[TaskInput]) -> list[list[dict]]:
        """The first word as a person (of inputs tokenized with their offsets, as the engine needs)."""
        assert all(item.offsets is not None for item in inputs), "NER inputs carry token offsets"
        words = [item.text.split()[:1] for item in inputs]  # whitespace-only inputs have no entity
        return [
            [{"type": "PER", "text": w, "start": 0, "end": len(w), "score": 0.9} for w in first]
            for first in words
        ]

    async def score(self, adapter: FakeAdapter, inputs: list[TaskInput]) -> list[float]:
        """The number of tokens the reward head would read (the chat-template-rendered pair)."""
        return [float(len(item.ids)) for item in inputs]


# ---- registry helpers ----------------------------------------------------------------------------
def adapter_folder(root: Path, name: str, r: int = 4) -> Path:
    folder = root / f"src-{name}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (64 * r))
    return folder


def register(
    store: LocalStore,
    name: str,
    task: str = "instruction",
    *,
    labels: tuple[str, ...] = (),
    fingerprint: str = FAKE_FINGERPRINT,
    kind: str = "adapter",
    tags: tuple[str, ...] = (),
    r: int = 4,
) -> Manifest:
    folder = adapter_folder(store.root.parent, name, r)
    if kind == "model":
        (folder / "config.json").write_text("{}")
    return store.put(
        folder,
        name=name,
        task=task,
        method="full" if kind == "model" else "lora",
        base=BaseSpec("tiny", fingerprint),
        labels=labels,
        kind=kind,
        adapter_format="hf-model" if kind == "model" else None,
        tags=tags,
    )


def populate(store: LocalStore) -> None:
    """The adapters the app tests use."""
    register(store, "chat", tags=("prod",))
    register(store, "chat")
    register(store, "other", r=8)
    register(store, "sentiment", "classification", labels=("neg", "pos"))
    register(store, "people", "ner", labels=("O", "B-PER", "I-PER"))
    register(store, "judge", "reward")
    register(store, "foreign", fingerprint=OTHER_FINGERPRINT)
    register(store, "merged", kind="model")


class FakeServer:
    """A TestClient over an app with fake engine and scheduler, plus handles on both."""

    def __init__(self, store: LocalStore, *, api_key: str | None = None, delay: float = 0.0, **config: Any):
        self.engine = FakeEngine(max_adapters=config.setdefault("max_adapters", 4))
        self.scheduler: FakeScheduler | None = None

        def make_scheduler(engine: FakeEngine, cfg: ServerConfig) -> FakeScheduler:
            self.scheduler = FakeScheduler(engine, delay=delay)
            return self.scheduler

        self.config = ServerConfig(registry=store.root, quantize="none", api_key=api_key, **config)
        self.app = create_app(
            self.config,
            base=FAKE_BASE,
            engine_factory=lambda cfg, base: self.engine,
            scheduler_factory=make_scheduler,
        )
        self.client = TestClient(self.app, raise_server_exceptions=False)

    def __enter__(self) -> FakeServer:
        self.client.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.__exit__(*exc)

    @property
    def state(self) -> Any:
        return self.app.state.server
