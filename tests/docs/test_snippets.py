"""Run the shell and Python snippets of README.md and docs/*.md, so the docs cannot rot.

A fenced block runs when its info string holds the word `test` (e.g. `bash test`, `python test`).
Blocks of one file run in order, in one scratch folder (holding a link to `examples/`), with their own
registry. Blocks marked `test-server` run while a real `adapterdock serve` (tiny base, unquantized) is up on
a free port, and `127.0.0.1:8000` in them is rewritten to that port; `test-keys` blocks get a second such
server for `127.0.0.1:8001`, started with `--keys-file keys.json` (written by an earlier block); `test-hub`
blocks likewise get a real `adapterdock hub serve` for `127.0.0.1:8080` (and run without `HF_HUB_OFFLINE`).
Blocks that need hardware or a network we lack (GPUs, the Hugging Face Hub) carry no mark.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)


MARKS = {"test", "test-server", "test-keys", "test-hub"}
DOC_PORTS = {"test-server": "127.0.0.1:8000", "test-keys": "127.0.0.1:8001", "test-hub": "127.0.0.1:8080"}


@dataclass
class Snippet:
    file: Path
    line: int
    language: str
    mark: str
    body: str


def snippets(path: Path) -> list[Snippet]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        marks = MARKS & set(words[1:])
        if not words or not marks:
            continue
        line = text[: match.start()].count("\n") + 1
        found.append(Snippet(path, line, words[0], marks.pop(), match["body"]))
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_service(mark: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """Start the server (`test-server`) or the hub service (`test-hub`) and wait until it answers."""
    port = _free_port()
    if mark in ("test-server", "test-keys"):
        argv = ["-m", "server", "--base", "tiny", "--quantize", "none", "--port", str(port)]
        argv += ["--keys-file", "keys.json"] if mark == "test-keys" else []
        probe = f"http://127.0.0.1:{port}/ready"
    else:
        argv = ["-m", "hub", "serve", "--root", str(cwd / "hub-data"), "--port", str(port)]
        probe = f"http://127.0.0.1:{port}/api/whoami-v2"
    log_path = cwd / f"{mark}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text()[-3000:])
        try:
            if httpx.get(probe, timeout=2).status_code < 500:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{mark} service did not become ready in 180 s")


def run_snippet(snippet: Snippet, cwd: Path, env: dict[str, str], port: int | None) -> None:
    body = snippet.body
    if port is not None:
        body = body.replace(DOC_PORTS[snippet.mark], f"127.0.0.1:{port}")
    if snippet.mark == "test-hub":  # huggingface_hub's offline mode would block our local hub too
        env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    if snippet.language == "python":
        argv = [sys.executable, "-c", body]
    elif snippet.language in ("bash", "sh", "shell", "console"):
        argv = ["bash", "-euo", "pipefail", "-c", body]
    else:
        raise AssertionError(f"{snippet.file.name}:{snippet.line}: cannot run a {snippet.language} block")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (
        f"{snippet.file.relative_to(ROOT)}:{snippet.line} failed ({proc.returncode}):\n"
        f"{body}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


def test_readme_has_runnable_snippets() -> None:
    assert snippets(ROOT / "README.md"), "README.md must have blocks marked `test`"


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if snippets(d)], ids=lambda p: p.name)
def test_doc_snippets_run(doc: Path, tmp_path: Path, adapterdock_cache: Path) -> None:
    env = dict(os.environ)
    env.update(
        ADAPTERDOCK_REGISTRY=str(tmp_path / "adapters"),
        ADAPTERDOCK_CACHE=str(adapterdock_cache),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),
        MPLBACKEND="Agg",
        # The models are tiny: threads gain nothing, and the server plus a snippet would oversubscribe.
        OMP_NUM_THREADS="1",
    )
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    services: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for snippet in snippets(doc):
            if snippet.mark != "test" and snippet.mark not in services:
                services[snippet.mark] = _start_service(snippet.mark, env, tmp_path)
            port = services[snippet.mark][1] if snippet.mark in services else None
            run_snippet(snippet, tmp_path, env, port)
    finally:
        for proc, _ in services.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
