"""Training and serving agree through data alone: what a trainer registers, the server serves as trained.

The contract between `trainers/` and `server/` is the adapter folder plus its manifest; these tests train with
the real recipes, load the registered version into the real engine, and compare with the trained model
reloaded by plain PEFT (LoRA) or by the trainer's own loader (bottleneck). They also check that both sides
quantize a base the same way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore

pytestmark = pytest.mark.slow

TEXTS = ["my parcel never arrived", "the app crashes on start", "I was charged twice this month"]


def test_trainer_and_server_quantize_alike() -> None:
    from server.model_loader import quantization_config
    from trainers.configs import TrainConfig
    from trainers.methods import get_method, qlora

    config = TrainConfig(data="x", name="x", method="qlora")
    trained = get_method("qlora").load_kwargs(config, "cpu")["quantization_config"]
    served = quantization_config("nf4", qlora.compute_dtype("cpu"))
    for field in (
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
    ):
        assert getattr(trained, field) == getattr(served, field), field


def _train(method: str, registry: LocalStore, name: str):
    from trainers import classification
    from trainers.sample_data import sample_path

    config = classification.Config(
        base="tiny", data=str(sample_path("classification")), name=name, method=method,
        registry=str(registry.root), max_steps=6, batch_size=8, max_length=32, progress=False,
        baseline=False, lr=3e-3,
    )  # fmt: skip
    return classification.train(config)


def _reference_probs(method: str, folder: Path, base: BaseInfo, labels: list[str]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=len(labels))
    model.config.pad_token_id = tokenizer.pad_token_id
    if method == "lora":
        model = PeftModel.from_pretrained(model, folder)
    else:
        from trainers.methods.bottleneck import load_bottleneck

        model = load_bottleneck(model, folder)
    model.eval()
    with torch.no_grad():
        rows = [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in TEXTS]
    return torch.softmax(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_trained_adapter_serves_as_trained(method: str, tiny_base: BaseInfo, registry: LocalStore) -> None:
    from server.config import ServerConfig
    from server.engine import Engine
    from server.prompts import task_inputs
    from server.scheduler import Scheduler

    manifest = _train(method, registry, f"tickets-{method}")
    stored = registry.get(manifest.ref)
    expected = _reference_probs(method, stored.path, tiny_base, manifest.labels)

    engine = Engine(tiny_base.path, base_name="tiny", quantize="none", max_adapters=2)
    adapter = engine.load_adapter(manifest.ref, stored.path, stored.manifest)

    async def classify() -> list[dict]:
        scheduler = Scheduler(engine, max_batch_size=4)
        await scheduler.start()
        try:
            inputs = await task_inputs(engine.tokenizer, TEXTS, ServerConfig())
            return await scheduler.classify(adapter, inputs)
        finally:
            await scheduler.stop()

    served = asyncio.run(classify())
    got = torch.tensor([[row["scores"][label] for label in manifest.labels] for row in served])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    assert [row["label"] for row in served] == [manifest.labels[i] for i in expected.argmax(-1).tolist()]


def _peft_causal(folder: Path, base: BaseInfo, quantize: str):
    """The trained adapter on the base as PEFT loads it (4-bit NF4 as the server quantizes, for `nf4`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.model_loader import compute_dtype, quantization_config

    kwargs = {}
    if quantize == "nf4":
        kwargs["quantization_config"] = quantization_config("nf4", compute_dtype(torch.device("cpu")))
    model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    return PeftModel.from_pretrained(model, folder).eval()


@pytest.mark.parametrize(("method", "quantize"), [("dora", "none"), ("qdora", "nf4")])
def test_trained_dora_serves_as_peft_runs_it(
    method: str, quantize: str, tiny_base: BaseInfo, registry: LocalStore
) -> None:
    """A DoRA adapter trained by the recipe, served by the real server, answers what PEFT generates."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from server.app import create_app
    from server.config import ServerConfig
    from trainers import instruction
    from trainers.sample_data import sample_path

    config = instruction.Config(
        base="tiny", data=str(sample_path("instruction")), name=f"chat-{method}", method=method,
        registry=str(registry.root), max_steps=6, batch_size=4, max_length=48, progress=False,
        baseline=False, lr=1e-2,
    )  # fmt: skip
    manifest = instruction.train(config)
    folder = registry.get(manifest.ref).path
    peft_model = _peft_causal(folder, tiny_base, quantize)
    prompt = "Write one line about adapters:"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = peft_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        with peft_model.disable_adapter():
            base_out = peft_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                           pad_token_id=0)  # fmt: skip
    want, base_want = out[0, ids.shape[1] :].tolist(), base_out[0, ids.shape[1] :].tolist()
    assert want != base_want, "the trained DoRA adapter must change the output"
    server = ServerConfig(base="tiny", registry=registry.root, quantize=quantize, max_adapters=2,
                          max_new_tokens=8)  # fmt: skip
    params = {"max_new_tokens": 8, "details": True, "ignore_eos_token": True}
    with TestClient(create_app(server, base=tiny_base)) as client:
        answers = [
            client.post("/generate", json={"inputs": prompt, "parameters": {**params, **adapter}})
            for adapter in ({"adapter_id": manifest.ref}, {})
        ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    served = [[t["id"] for t in a.json()["details"]["tokens"]] for a in answers]
    assert served == [want, base_want]
