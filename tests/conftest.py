"""Session fixtures shared by every test tree: the built-in tiny base (built once) and a fresh registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.bases import BaseInfo, resolve_base
from hub.store import LocalStore

# One intra-op thread per process: tests run servers as subprocesses beside the test process, and tiny
# models gain nothing from threads while oversubscribed cores lose a lot (measured: 31 ms vs 774 ms a step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Served outputs are compared with PEFT's exactly, so servers and engines compute in fp32 unless a test asks
# for bf16 (`--dtype bf16`); `auto` would pick bf16 on CPUs with avx512_bf16 (this one has it).
os.environ.setdefault("ADAPTERDOCK_DTYPE", "fp32")


@pytest.fixture(scope="session", autouse=True)
def adapterdock_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ADAPTERDOCK_CACHE at a session folder so tests never touch ~/.cache."""
    cache = tmp_path_factory.mktemp("adapterdock-cache")
    previous = os.environ.get("ADAPTERDOCK_CACHE")
    os.environ["ADAPTERDOCK_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("ADAPTERDOCK_CACHE", None)
    else:
        os.environ["ADAPTERDOCK_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_base(adapterdock_cache: Path) -> BaseInfo:
    """The built-in tiny Llama, built once per session into the session cache."""
    return resolve_base("tiny")


@pytest.fixture
def registry(tmp_path: Path) -> LocalStore:
    """An empty local registry in a temporary folder."""
    return LocalStore(tmp_path / "registry")
