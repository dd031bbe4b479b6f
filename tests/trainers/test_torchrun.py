"""Data-parallel training under `torchrun --nproc_per_node 2` on CPU (gloo): registered once, by
the main process, with metrics over the whole eval set (an odd size, so the last batch is padded)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainers.metrics import accuracy
from trainers.sample_data import sample_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_classification(tiny_base, registry, tmp_path: Path) -> None:
    lines = sample_path("classification").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:40]))
    (tmp_path / "eval.jsonl").write_text("".join(lines[40:51]))  # 11 rows: uneven across 2 ranks
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [
        torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "trainers", "classification",
        "--base", tiny_base.name_or_path, "--data", str(tmp_path / "train.jsonl"),
        "--eval", str(tmp_path / "eval.jsonl"), "--name", "ddp", "--max-steps", "3",
        "--batch-size", "4", "--max-length", "32", "--registry", str(registry.root),
        "--no-progress", "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("registered ddp@1") == 1

    assert registry.versions("ddp") == [1]
    manifest = registry.get("ddp").manifest
    assert manifest.metrics["eval_examples"] == 11
    assert manifest.metrics["train_steps"] == 3 and manifest.metrics["epochs"] == 0.6  # 3x4x2 / 40

    # The recorded accuracy is that of the registered adapter on all 11 eval rows.
    import json

    rows = [json.loads(line) for line in lines[40:51]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=3)
    base.config.pad_token_id = 0
    model = PeftModel.from_pretrained(base, registry.get("ddp").path).eval()
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)).logits
    predictions = [manifest.labels[i] for i in logits.argmax(-1).tolist()]
    assert accuracy(predictions, [r["label"] for r in rows]) == pytest.approx(manifest.metrics["accuracy"])
