"""Fixtures for the hub service and remote tests: a service subprocess on 127.0.0.1, tokens, a PEFT adapter.

The service runs as `python -m hub.service` on a free port with a temp root, exactly as a user starts it.
huggingface_hub is pointed at it in-process; modules that do so use the `hub_online` fixture, which lifts the
offline mode tests/conftest.py turns on (for those tests only).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER_TOKEN = "hf_writer_acme_0123456789"
READER_TOKEN = "hf_reader_all_0123456789"
OTHER_TOKEN = "hf_writer_other_0123456789"
TOKEN_FILE = f"""# token             access  repos              user
{WRITER_TOKEN}      write   acme/*,shared/*    alice
{READER_TOKEN}      read    *                  ci
{OTHER_TOKEN}       write   other/*            bob
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HubProcess:
    """A running `python -m hub.service`."""

    url: str
    root: Path
    token_file: Path | None
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_hub(root: Path, token_file: Path | None, port: int | None = None) -> HubProcess:
    """Start the service and wait (up to 30 s) until it answers."""
    port = port or free_port()
    log = root.parent / f"{root.name}-{port}.log"
    cmd = [sys.executable, "-m", "hub.service", "--root", str(root), "--port", str(port)]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    hub = HubProcess(f"http://127.0.0.1:{port}", root, token_file, proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub service exited early:\n{log.read_text()}")
        try:
            if httpx.get(hub.url + "/api/models", timeout=1).status_code == 200:
                return hub
        except httpx.HTTPError:
            time.sleep(0.1)
    hub.kill()
    raise RuntimeError(f"hub service did not start:\n{log.read_text()}")


@pytest.fixture(scope="session")
def hub_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One service with a token file, shared by the session (tests use distinct repo names)."""
    folder = tmp_path_factory.mktemp("hub-service")
    token_file = folder / "tokens.txt"
    token_file.write_text(TOKEN_FILE)
    hub = start_hub(folder / "root", token_file)
    yield hub
    hub.stop()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Start services rooted in this test's tmp_path (stopped at the end)."""
    started: list[HubProcess] = []

    def start(
        root: Path | None = None, token_file: Path | None = None, port: int | None = None
    ) -> HubProcess:
        hub = start_hub(root or tmp_path / "root", token_file, port)
        started.append(hub)
        return hub

    yield start
    for hub in started:
        hub.stop()


@pytest.fixture(scope="module")
def hub_online() -> Iterator[None]:
    """Let huggingface_hub talk to 127.0.0.1 (tests/conftest.py sets HF_HUB_OFFLINE=1 for the rest)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "0")
        patch.setenv("HF_HUB_DISABLE_XET", "1")
        patch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        patch.delenv("HF_TOKEN", raising=False)
        patch.delenv("HF_ENDPOINT", raising=False)
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield


@pytest.fixture(scope="session")
def peft_adapter(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny base, saved by PEFT's save_pretrained (safetensors), with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a trained-looking adapter: it changes the logits
    out = tmp_path_factory.mktemp("peft") / "lora"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder in PEFT's on-disk format for the tiny base, written without torch (fast tests).

    Same files and tensor names `save_pretrained` writes for r=4 on q_proj/v_proj; the slow test uses a
    folder made by PEFT itself (`peft_adapter`).
    """
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(4):
        for module, out_features in (("q_proj", 256), ("v_proj", 128)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, 256)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_features, 4)).astype(np.float32)
    out = tmp_path_factory.mktemp("lora-np") / "lora"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny",
        "bias": "none",
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
