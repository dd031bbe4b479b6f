"""`adapterdock quickstart --exit --base tiny` end to end, twice: the second run reuses the trained adapters.

The default base (`smollm2-135m`) runs the same code with other step counts; tests/integration/
test_smollm2_base.py covers training and serving on it, and the quickstart's budget on it is measured by
hand (docs/training.md), not in a timed test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quickstart(registry: Path, port: int) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "adapterdock", "quickstart", "--exit", "--base", "tiny", "--registry",
         str(registry), "--port", str(port)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quickstart_trains_serves_and_reuses(tiny_base: BaseInfo, tmp_path: Path) -> None:
    registry = tmp_path / "adapters"
    out = _quickstart(registry, _free_port())
    store = LocalStore(registry)
    assert store.names() == ["quickstart-chat", "quickstart-entities", "quickstart-tickets"]
    for endpoint in ("/v1/classify", "/v1/ner", "/v1/chat/completions"):
        assert endpoint in out
    assert "mixed batch of 3 requests for 3 adapters" in out
    tickets = store.get("quickstart-tickets").manifest
    assert tickets.metrics["accuracy"] > tickets.metrics["majority_accuracy"]

    again = _quickstart(registry, _free_port())
    assert again.count("reusing") == 3
    assert all(store.versions(name) == [1] for name in store.names())
