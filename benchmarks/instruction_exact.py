"""Instruction benchmark with exact answers: SST-2 written as instructions, answered through the server.

An instruction adapter is trained (through the real CLI) on SST-2 training sentences phrased as a chat
request ("Is the sentiment of this movie review positive or negative? ..." -> "positive"), then
`adapterdock serve` is started on the same base and every held-out sentence is sent to the OpenAI chat
endpoint twice: with the adapter and with the base alone (greedy, a few tokens). A reply counts as exactly
right only if, stripped of spaces, it IS the label ("positive" / "negative"). For context the base's
lenient rate is reported too (its reply names the right label and not the other).

Data: a seeded sample of `sst2-glue/train.tsv` for training; a seeded sample of `sst2-glue/test.tsv`
(the GLUE dev set) for scoring. Settings were fixed before the run; nothing was tuned on the scored split.

Run: `python benchmarks/instruction_exact.py [--base smollm2-135m] [--train 1200] [--eval 300]`;
writes benchmarks/results/instruction_exact_<base>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2-glue"
RESULTS = REPO / "benchmarks" / "results"
SEED = 0
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
LABELS = {"0": "negative", "1": "positive"}
TRAIN = {"max_steps": 150, "batch_size": 8, "max_length": 96, "lr": 1e-3, "rank": 16}


def read_rows(path: Path) -> list[tuple[str, str]]:
    """(sentence, label word) rows of a GLUE SST-2 TSV file (header first)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        sentence, label = line.rsplit("\t", 1)
        rows.append((sentence.strip(), LABELS[label.strip()]))
    return rows


def write_chat(rows: list[tuple[str, str]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text, label in rows:
            messages = [{"role": "user", "content": PROMPT.format(text=text)},
                        {"role": "assistant", "content": label}]  # fmt: skip
            handle.write(json.dumps({"messages": messages}) + "\n")


def train(base: str, data: Path, registry: Path, threads: int) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "trainers", "instruction", "--base", base, "--name", "sst2-instruct",
        "--data", str(data), "--max-steps", str(TRAIN["max_steps"]), "--batch-size", str(TRAIN["batch_size"]),
        "--max-length", str(TRAIN["max_length"]), "--lr", str(TRAIN["lr"]), "--rank", str(TRAIN["rank"]),
        "--registry", str(registry), "--seed", str(SEED), "--no-progress", "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
    manifest = json.loads(sorted((registry / "sst2-instruct").glob("*/manifest.json"))[-1].read_text())
    return {"ref": f"sst2-instruct@{manifest['version']}", "metrics": manifest["metrics"],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "precision": manifest["trainer"].get("compute_precision")}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: str, registry: Path, port: int, log: Path, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "server", "--base", base, "--quantize", "none",
               "--registry", str(registry), "--port", str(port), "--max-adapters", "2",
               "--max-rank", "16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"server not ready; see {log}")


async def answers(url: str, model: str, rows: list[tuple[str, str]], concurrency: int) -> list[str]:
    """Greedy replies of `model` to every row, `concurrency` requests in flight."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(text: str) -> str:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(text=text)}],
                    "max_tokens": 4, "temperature": 0}  # fmt: skip
            async with gate:
                response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        return list(await asyncio.gather(*(one(text) for text, _ in rows)))


def rate(hits: int, total: int) -> dict[str, float]:
    """A proportion with its 95% (normal-approximation) interval."""
    p = hits / total
    half = 1.96 * math.sqrt(p * (1 - p) / total)
    return {"rate": round(p, 4), "ci95": [round(max(0.0, p - half), 4), round(min(1.0, p + half), 4)]}


def score(replies: list[str], rows: list[tuple[str, str]]) -> dict[str, Any]:
    exact = sum(reply.strip() == label for reply, (_, label) in zip(replies, rows, strict=True))
    lenient = 0
    for reply, (_, label) in zip(replies, rows, strict=True):
        other = "negative" if label == "positive" else "positive"
        lenient += label in reply.lower() and other not in reply.lower()
    return {"exact": rate(exact, len(rows)), "lenient": rate(lenient, len(rows)), "examples": replies[:5]}


def markdown(result: dict[str, Any]) -> str:
    meta, adapter, base = result["meta"], result["adapter"], result["base"]
    return "\n".join([
        f"# Instruction with exact answers ({meta['base']} base, CPU)",
        "",
        f"Generated by `benchmarks/instruction_exact.py --base {meta['base']}` on {meta['date']} "
        f"({meta['machine']}).",
        f"SST-2 as instructions: {meta['train']} seeded train sentences, {meta['eval']} seeded sentences of "
        "`sst2-glue/test.tsv` (the GLUE dev set) scored through `POST /v1/chat/completions` "
        "(greedy, 4 tokens).",
        f"Adapter: LoRA r={TRAIN['rank']}, {TRAIN['max_steps']} steps of {TRAIN['batch_size']}, "
        f"lr {TRAIN['lr']} "
        f"({result['training']['precision']} compute, {result['training']['wall_seconds']:.0f} s).",
        "",
        "| model | exactly right | 95% CI | names the right label (lenient) | 95% CI |",
        "|---|---|---|---|---|",
        f"| {result['training']['ref']} | {adapter['exact']['rate']:.3f} | {adapter['exact']['ci95']} | "
        f"{adapter['lenient']['rate']:.3f} | {adapter['lenient']['ci95']} |",
        f"| {meta['base']} (no adapter) | {base['exact']['rate']:.3f} | {base['exact']['ci95']} | "
        f"{base['lenient']['rate']:.3f} | {base['lenient']['ci95']} |",
        "",
        f"First replies, adapter: {adapter['examples']}; base: {base['examples']}",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--train", type=int, default=1200, help="sampled training sentences")
    parser.add_argument("--eval", type=int, default=300, help="sampled held-out sentences")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    train_rows = rng.sample(read_rows(args.data_root / "train.tsv"), args.train)
    eval_rows = random.Random(SEED + 1).sample(read_rows(args.data_root / "test.tsv"), args.eval)
    with tempfile.TemporaryDirectory(prefix="instruction-exact-") as tmp:
        work = Path(tmp)
        write_chat(train_rows, work / "train.jsonl")
        training = train(args.base, work / "train.jsonl", work / "registry", args.threads)
        print(json.dumps(training)[:300], flush=True)
        port = free_port()
        server = start_server(args.base, work / "registry", port, work / "server.log", args.threads)
        try:
            url = f"http://127.0.0.1:{port}"
            adapter = score(
                asyncio.run(answers(url, training["ref"], eval_rows, args.concurrency)), eval_rows
            )
            base = score(asyncio.run(answers(url, args.base, eval_rows, args.concurrency)), eval_rows)
        finally:
            server.terminate()
            server.wait(60)
    meta = {"base": args.base, "date": time.strftime("%Y-%m-%d"), "train": args.train, "eval": args.eval,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seed": SEED,
            "settings": TRAIN}  # fmt: skip
    result = {"meta": meta, "training": training, "adapter": adapter, "base": base}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"instruction_exact_{args.base}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
