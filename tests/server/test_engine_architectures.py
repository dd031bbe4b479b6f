"""Every declared architecture served exactly: the engine equals transformers + PEFT on tiny random models.

For each family of `tests/server/arch_bases.py` (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3):
greedy tokens for an adapter equal PEFT's `generate`, alone and in a mixed batch with two other adapters
and a base row (which equals plain transformers); so do a DoRA adapter's tokens and logits; classification /
NER logits equal PEFT's; a bottleneck adapter equals the HF model with the same residual hooks. Anything
else is refused at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hub.bases import BaseInfo, resolve_base
from hub.builtin_bases import IM_END
from hub.store import LocalStore
from tests.server.arch_bases import FAMILIES, LORA_TARGETS, build_arch_base
from tests.server.conftest import Adapter, make_bottleneck_adapter, make_peft_adapter

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, twice.",
    "Hello there",
    "Adapters share one base model, row by row, in every forward pass.",
]
STEPS = 8
NO_TOKEN_CLASSIFIER = {"gemma3_text"}
"""Families transformers has no *ForTokenClassification for (so there is nothing to be equal to)."""


@dataclass
class Arch:
    """One family's tiny base, its registered adapters and an engine serving them."""

    family: str
    base: BaseInfo
    adapters: dict[str, Adapter]
    engine: object
    registry: Path


def _register(family: str, base: BaseInfo, root: Path) -> dict[str, Adapter]:
    store = LocalStore(root / "registry")
    targets = LORA_TARGETS[family]
    src = root / "src"
    made = {
        "gen-a": (make_peft_adapter(base, src / "a", r=8, targets=targets, seed=1), "instruction", ()),
        "gen-b": (
            make_peft_adapter(
                base, src / "b", r=4, targets=[targets[0], targets[-1]], seed=2, use_rslora=True
            ),
            "instruction",
            (),
        ),  # fmt: skip
        "gen-c": (
            make_peft_adapter(base, src / "c", r=16, targets=targets, seed=3, alpha_pattern={"down_proj": 4}),
            "instruction",
            (),
        ),
        "dora": (
            make_peft_adapter(base, src / "dora", r=8, targets=targets, seed=6, use_dora=True),
            "instruction",
            (),
        ),
        "cls": (
            make_peft_adapter(base, src / "cls", task_type="SEQ_CLS", num_labels=3, targets=targets, seed=4),
            "classification",
            ("neg", "neu", "pos"),
        ),
    }
    if family not in NO_TOKEN_CLASSIFIER:
        ner = make_peft_adapter(
            base, src / "ner", task_type="TOKEN_CLS", num_labels=3, targets=targets, seed=5
        )
        made["ner"] = (ner, "ner", ("O", "B-PER", "I-PER"))
    adapters = {}
    for name, (folder, task, labels) in made.items():
        method = "dora" if name == "dora" else "lora"
        store.put(folder, name=name, task=task, method=method, base=base.spec, labels=labels)
    bneck = make_bottleneck_adapter(base, src / "bn", variant="houlsby", act="gelu", size=8)
    store.put(bneck, name="bneck", task="instruction", method="bottleneck", base=base.spec)
    for name in [*made, "bneck"]:
        stored = store.get(name)
        adapters[name] = Adapter(stored.path, stored.manifest)
    return adapters


@pytest.fixture(scope="module", params=FAMILIES)
def arch(request, tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Arch:
    from server.engine import Engine

    family = request.param
    root = tmp_path_factory.mktemp(f"arch-{family}")
    base = resolve_base(str(build_arch_base(family, root / "base", tiny_base.path)))
    adapters = _register(family, base, root)
    engine = Engine(base.path, base_name=family, quantize="none", max_adapters=8, max_rank=16,
                    max_batch_size=8, max_seq_len=128)  # fmt: skip
    return Arch(family, base, adapters, engine, root / "registry")


@pytest.fixture
def load(arch: Arch):
    """Load adapters by name into the family's engine for one test, unload them after it."""
    held = []

    def _load(name: str):
        a = arch.adapters[name]
        held.append(arch.engine.load_adapter(a.key, a.path, a.manifest))
        return held[-1]

    yield _load
    for adapter in held:
        arch.engine.unload_adapter(adapter)


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(IM_END) + 1] if IM_END in tokens else tokens


def _engine_greedy(engine, prompts: list[list[int]], slots: list[int]) -> list[list[int]]:
    seq_ids = list(range(100, 100 + len(prompts)))
    out = {
        s: [t]
        for s, t in zip(seq_ids, engine.prefill(seq_ids, prompts, slots).argmax(-1).tolist(), strict=True)
    }
    for _ in range(STEPS - 1):
        order = engine.active_ids
        for s, t in zip(order, engine.decode([out[s][-1] for s in order]).argmax(-1).tolist(), strict=True):
            out[s].append(t)
    for s in seq_ids:
        engine.release(s)
    return [_until_eos(out[s]) for s in seq_ids]


def _hf_greedy(arch: Arch, prompt: list[int], adapter: str | None) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch.base.path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, arch.adapters[adapter].path)
    model.eval()
    with torch.inference_mode():
        ids = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
        )
    return _until_eos(ids[0, len(prompt) :].tolist())


def test_greedy_tokens_equal_peft_generate_alone_and_mixed(arch: Arch, load) -> None:
    engine = arch.engine
    prompts = [engine.tokenizer(t)["input_ids"] for t in PROMPTS]
    a, b, c = (load(n).slot for n in ("gen-a", "gen-b", "gen-c"))
    want = {
        "gen-a": _hf_greedy(arch, prompts[0], "gen-a"),
        "gen-b": _hf_greedy(arch, prompts[1], "gen-b"),
        "gen-c": _hf_greedy(arch, prompts[2], "gen-c"),
        "base": _hf_greedy(arch, prompts[0], None),
    }
    assert _engine_greedy(engine, prompts[:1], [a]) == [want["gen-a"]], arch.family
    mixed = _engine_greedy(engine, [prompts[0], prompts[1], prompts[2], prompts[0]], [a, b, c, 0])
    assert mixed == [want["gen-a"], want["gen-b"], want["gen-c"], want["base"]], arch.family
    with_adapter, base = engine.prefill([1, 2], [prompts[0]] * 2, [a, 0])
    for seq_id in (1, 2):
        engine.release(seq_id)
    assert (with_adapter - base).abs().max() > 1e-2, "the adapter must change the logits"


def test_dora_tokens_and_logits_equal_peft_alone_and_mixed(arch: Arch, load) -> None:
    """DoRA's per-feature rescaling (with the q/k/v biases of Qwen2, Phi-3's fused linears) equals PEFT's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = arch.engine
    prompts = [engine.tokenizer(t)["input_ids"] for t in PROMPTS]
    dora, a = load("dora").slot, load("gen-a").slot
    want = _hf_greedy(arch, prompts[0], "dora")
    assert _engine_greedy(engine, prompts[:1], [dora]) == [want], arch.family
    mixed = _engine_greedy(engine, [prompts[0], prompts[1], prompts[0]], [dora, a, 0])
    assert mixed == [want, _hf_greedy(arch, prompts[1], "gen-a"), _hf_greedy(arch, prompts[0], None)]
    model = AutoModelForCausalLM.from_pretrained(arch.base.path)
    ref = PeftModel.from_pretrained(model, arch.adapters["dora"].path).eval()
    with torch.inference_mode():
        expected = ref(input_ids=torch.tensor([prompts[2]])).logits[0, -1]
    got = engine.prefill([1, 2], [prompts[2], prompts[1]], [dora, a])[0]
    for seq_id in (1, 2):
        engine.release(seq_id)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=arch.family)


def test_running_server_answers_what_peft_generates(arch: Arch) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    config = ServerConfig(base=str(arch.base.path), registry=arch.registry, quantize="none", max_adapters=2,
                          max_new_tokens=STEPS, max_input_tokens=64)  # fmt: skip
    prompt = arch.engine.tokenizer(PROMPTS[2])["input_ids"]
    want = arch.engine.tokenizer.decode(
        [t for t in _hf_greedy(arch, prompt, "gen-c") if t != IM_END], skip_special_tokens=True
    )
    with TestClient(create_app(config, base=arch.base)) as client:
        body = {"model": "gen-c", "prompt": PROMPTS[2], "max_tokens": STEPS, "temperature": 0}
        answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == want, arch.family


def test_classification_and_ner_equal_peft(arch: Arch, load) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    engine = arch.engine
    cls = load("cls")
    kinds = [("cls", cls, AutoModelForSequenceClassification)]
    if "ner" in arch.adapters:
        kinds.append(("ner", load("ner"), AutoModelForTokenClassification))
    prompts = [engine.tokenizer(t)["input_ids"] for t in PROMPTS]
    # one mixed encode batch: every task adapter's rows and a base row
    batch = [p for _ in kinds for p in prompts] + [prompts[0]]
    hidden = engine.encode(batch, [a.slot for _, a, _ in kinds for _ in prompts] + [0])
    for k, (name, adapter, auto) in enumerate(kinds):
        ref = PeftModel.from_pretrained(
            auto.from_pretrained(arch.base.path, num_labels=len(adapter.labels)), arch.adapters[name].path
        ).eval()
        for i, prompt in enumerate(prompts):
            with torch.inference_mode():
                want = ref(input_ids=torch.tensor([prompt])).logits[0]
            states = hidden[k * len(prompts) + i]
            got = adapter.head(states[-1]) if name == "cls" else adapter.head(states)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{arch.family} {name}")


def test_bottleneck_equals_hooked_hf_model(arch: Arch, load) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = load("bneck")
    tensors = load_file(arch.adapters["bneck"].path / "adapter_model.safetensors")
    prompt = arch.engine.tokenizer(PROMPTS[0])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(arch.base.path).eval()

    def hook(prefix: str):
        t = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        return lambda module, args, out: (
            out
            + torch.nn.functional.gelu(out @ t["down.weight"].t() + t["down.bias"]) @ t["up.weight"].t()
            + t["up.bias"]
        )

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_hook(hook(f"layers.{i}.attn_adapter."))
        layer.mlp.down_proj.register_forward_hook(hook(f"layers.{i}.mlp_adapter."))
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0, -1]
    got = arch.engine.prefill([1], [prompt], [adapter.slot])[0]
    arch.engine.release(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=arch.family)


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_architecture_is_refused_at_start(model_type: str, tiny_base, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    from server.engine import Engine
    from server.model_loader import UnsupportedModelError

    dims = {"gpt2": dict(n_embd=32, n_layer=1, n_head=2), "bert": dict(hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64)}[model_type]  # fmt: skip
    AutoModel.from_config(AutoConfig.for_model(model_type, vocab_size=64, **dims)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as refused:
        Engine(tmp_path, base_name="x", quantize="none")
    message = str(refused.value)
    assert repr(model_type) in message and "llama" in message and "phi3" in message and "gemma2" in message


def test_bidirectional_gemma3_is_refused() -> None:
    from server.attention import check_supported
    from server.model_loader import UnsupportedModelError
    from tests.server.arch_bases import arch_config

    config = arch_config("gemma3_text")
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        check_supported(config)


def test_batch_dependent_rotary_caps_the_context() -> None:
    from types import SimpleNamespace

    from server.attention import exact_context

    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 4096}
    phi3 = SimpleNamespace(max_position_embeddings=131072, rope_parameters=longrope)
    assert exact_context(phi3, 8192) == 4096 and exact_context(phi3, 1024) == 1024
    llama3 = SimpleNamespace(max_position_embeddings=131072, rope_parameters={"rope_type": "llama3"})
    assert exact_context(llama3, 8192) == 8192
