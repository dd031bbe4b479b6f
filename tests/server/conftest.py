"""Fixtures for the server's compute core: an engine on the tiny base and adapters made with PEFT.

Adapters are built by PEFT itself (`get_peft_model` with random non-zero B, `save_pretrained`) and
registered in a session registry, so the engine reads exactly what training writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hub.bases import BaseInfo
from hub.manifest import Manifest
from hub.store import LocalStore

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLS_LABELS = ["negative", "neutral", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@dataclass
class Adapter:
    """A registered adapter: its folder and manifest."""

    path: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return self.manifest.ref


def make_peft_adapter(
    base: BaseInfo,
    out: Path,
    *,
    task_type: str = "CAUSAL_LM",
    num_labels: int = 0,
    r: int = 8,
    targets: list[str] | None = None,
    seed: int = 0,
    zero_b: bool = False,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter for `base` into `out` (random non-zero B unless `zero_b`).

    With `use_dora=True` the DoRA magnitudes are jittered too, so that each output feature's rescaling
    differs from 1 (PEFT initialises them to exactly ||W + s*B@A||).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=num_labels)
    elif task_type == "TOKEN_CLS":
        model = AutoModelForTokenClassification.from_pretrained(base.path, num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets or ALL_LINEAR,
        init_lora_weights=zero_b,  # True is PEFT's default init: B = 0
        task_type=task_type,
        modules_to_save=["score"] if task_type != "CAUSAL_LM" else None,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    if not zero_b:
        with torch.no_grad():  # PEFT's random init is large; keep outputs in a sane range
            for name, param in peft_model.named_parameters():
                if "magnitude" in name:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
                elif "lora_" in name:
                    param.mul_(0.3)
    peft_model.save_pretrained(out)
    return out


def make_bottleneck_adapter(base: BaseInfo, out: Path, *, variant: str, act: str, size: int) -> Path:
    """Save a bottleneck adapter in adapterdock's format with random weights."""
    from safetensors.torch import save_file

    config = json.loads((base.path / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    sites = ("attn", "mlp") if variant == "houlsby" else ("mlp",)
    for i in range(layers):
        for site in sites:
            prefix = f"layers.{i}.{site}_adapter"
            tensors[f"{prefix}.down.weight"] = torch.randn(size, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.down.bias"] = torch.randn(size, generator=gen) * 0.1
            tensors[f"{prefix}.up.weight"] = torch.randn(hidden, size, generator=gen) * 0.1
            tensors[f"{prefix}.up.bias"] = torch.randn(hidden, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    bottleneck_config = {
        "adapter_type": "bottleneck",
        "variant": variant,
        "reduction_factor": hidden // size,
        "bottleneck_size": size,
        "non_linearity": act,
        "hidden_size": hidden,
        "num_layers": layers,
        "task_type": "CAUSAL_LM",
        "num_labels": None,
    }
    (out / "bottleneck_config.json").write_text(json.dumps(bottleneck_config))
    return out


@pytest.fixture(scope="session")
def adapter_store(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """A session registry holding every adapter the engine tests use."""
    root = tmp_path_factory.mktemp("server-adapters")
    store = LocalStore(root / "registry")
    spec = tiny_base.spec

    def put(name: str, folder: Path, task: str, labels=(), method: str = "lora") -> None:
        store.put(folder, name=name, task=task, method=method, base=spec, labels=labels)

    src = root / "src"
    put("gen-a", make_peft_adapter(tiny_base, src / "a", r=8, seed=1), "instruction")
    put(
        "gen-b",
        make_peft_adapter(tiny_base, src / "b", r=4, targets=["q_proj", "v_proj"], seed=2,
                          use_rslora=True),
        "instruction",
    )  # fmt: skip
    put(
        "gen-c",
        make_peft_adapter(tiny_base, src / "c", r=16, seed=3, alpha_pattern={"down_proj": 4}),
        "instruction",
    )
    put("zero", make_peft_adapter(tiny_base, src / "z", r=8, zero_b=True), "instruction")
    put("gen-d", make_peft_adapter(tiny_base, src / "d", r=8, seed=13), "instruction")
    put("dora-a", make_peft_adapter(tiny_base, src / "da", r=8, seed=11, use_dora=True), "instruction",
        method="dora")  # fmt: skip
    put(
        "dora-b",
        make_peft_adapter(tiny_base, src / "db", r=4, targets=["q_proj", "v_proj", "down_proj"], seed=12,
                          use_dora=True, use_rslora=True),
        "instruction",
        method="dora",
    )  # fmt: skip
    put(
        "cls",
        make_peft_adapter(tiny_base, src / "cls", task_type="SEQ_CLS", num_labels=3, seed=4),
        "classification",
        CLS_LABELS,
    )
    put(
        "ner",
        make_peft_adapter(tiny_base, src / "ner", task_type="TOKEN_CLS", num_labels=5, seed=5),
        "ner",
        NER_LABELS,
    )
    put(
        "reward",
        make_peft_adapter(tiny_base, src / "rw", task_type="SEQ_CLS", num_labels=1, seed=6, r=4),
        "reward",
    )
    put(
        "bneck",
        make_bottleneck_adapter(tiny_base, src / "bn", variant="houlsby", act="gelu", size=16),
        "instruction",
        method="bottleneck",
    )
    return store


@pytest.fixture(scope="session")
def adapters(adapter_store: LocalStore) -> dict[str, Adapter]:
    """Name -> registered adapter (folder + manifest)."""
    names = ["gen-a", "gen-b", "gen-c", "gen-d", "zero", "dora-a", "dora-b", "cls", "ner", "reward", "bneck"]
    return {n: Adapter(*_stored(adapter_store, n)) for n in names}


def _stored(store: LocalStore, name: str) -> tuple[Path, Manifest]:
    stored = store.get(name)
    return stored.path, stored.manifest


@pytest.fixture(scope="session")
def engine(tiny_base: BaseInfo):
    """An unquantized engine on the tiny base (shared: tests unload what they load)."""
    from server.engine import Engine

    return Engine(
        tiny_base.path,
        base_name="tiny",
        quantize="none",
        max_adapters=8,
        max_rank=32,
        max_batch_size=8,
        max_seq_len=128,
    )


def budget_engine(tiny_base: BaseInfo, budget: float, *, rows: int = 4, max_adapters: int = 6):
    """An fp32 engine on the tiny base (128-token context) with a memory budget of `budget` bytes."""
    from server.engine import Engine

    return Engine(
        tiny_base.path,
        base_name="tiny",
        quantize="none",
        dtype="fp32",
        max_adapters=max_adapters,
        max_rank=32,
        max_batch_size=rows,
        max_seq_len=128,
        memory_budget_mb=budget / 2**20,
    )
