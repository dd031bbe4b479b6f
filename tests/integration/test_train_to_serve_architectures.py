"""A trainer run on every declared architecture serves as trained.

For each tiny family of `tests/server/arch_bases.py`, the classification recipe trains a LoRA for a few
steps (`all-linear`: every block linear by the model's own names, Phi-3's fused ones included), registers
it, and the engine behind the scheduler answers what the trained model reloaded by plain PEFT answers.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from hub.bases import BaseInfo, resolve_base
from hub.store import LocalStore
from tests.integration.test_train_to_serve import TEXTS, _reference_probs
from tests.server.arch_bases import FAMILIES, LORA_TARGETS, build_arch_base

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_serves_as_trained_on_every_architecture(
    family: str, tiny_base: BaseInfo, registry: LocalStore, tmp_path
) -> None:
    from server.config import ServerConfig
    from server.engine import Engine
    from server.prompts import task_inputs
    from server.scheduler import Scheduler
    from trainers import classification
    from trainers.sample_data import sample_path

    base = resolve_base(str(build_arch_base(family, tmp_path / family, tiny_base.path)))
    config = classification.Config(
        base=str(base.path), data=str(sample_path("classification")), name=f"tickets-{family}",
        method="lora", target_modules=["all-linear"], registry=str(registry.root), max_steps=3,
        batch_size=8, max_length=32, progress=False, baseline=False, lr=3e-3,
    )  # fmt: skip
    manifest = classification.train(config)
    stored = registry.get(manifest.ref)
    saved = json.loads((stored.path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LORA_TARGETS[family])  # all-linear, by its own names
    expected = _reference_probs("lora", stored.path, base, manifest.labels)

    engine = Engine(base.path, base_name=family, quantize="none", max_adapters=2, max_seq_len=128)
    adapter = engine.load_adapter(manifest.ref, stored.path, stored.manifest)

    async def classify() -> list[dict]:
        scheduler = Scheduler(engine, max_batch_size=4)
        await scheduler.start()
        try:
            return await scheduler.classify(
                adapter, await task_inputs(engine.tokenizer, TEXTS, ServerConfig())
            )
        finally:
            await scheduler.stop()

    served = asyncio.run(classify())
    got = torch.tensor([[row["scores"][label] for label in manifest.labels] for row in served])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3, msg=family)
