"""Built-in bases: plain transformers loads them, they are deterministic, fingerprints tell weights apart."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hub.bases import BaseInfo, base_fingerprint, describe_base, resolve_base
from hub.builtin_bases import create_builtin_base
from hub.errors import BaseNotFoundError


def test_tiny_loads_with_plain_transformers(tiny_base: BaseInfo) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    assert (tokenizer.pad_token_id, tokenizer.eos_token) == (0, "<|im_end|>")
    ids = tokenizer("the movie was great", return_tensors="pt").input_ids
    causal = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    assert 3_000_000 <= sum(p.numel() for p in causal.parameters()) <= 5_000_000
    assert causal(ids).logits.shape == (1, ids.shape[1], 4096)
    seq = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=3)
    assert seq(ids).logits.shape == (1, 3)
    tok = AutoModelForTokenClassification.from_pretrained(tiny_base.path, num_labels=5)
    assert tok(ids).logits.shape == (1, ids.shape[1], 5)
    config = causal.config
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 32 == 0
    assert config.num_hidden_layers == 4 and config.model_type == "llama"
    with torch.no_grad():
        out = causal.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_chat_template_marks_assistant_tokens(tiny_base: BaseInfo) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = rendered["assistant_masks"]
    assistant_ids = [i for i, m in zip(rendered["input_ids"], mask, strict=True) if m]
    assert tokenizer.decode(assistant_ids) == "Hello there<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tiny_loads_in_4bit_nf4_on_cpu(tiny_base: BaseInfo) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, quantization_config=quant)
    full = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    assert model.get_memory_footprint() < full.get_memory_footprint()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_builds_are_deterministic_and_fingerprints_distinguish(tmp_path: Path, tiny_base: BaseInfo) -> None:
    again = create_builtin_base("tiny", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        a = hashlib.sha256((tiny_base.path / name).read_bytes()).hexdigest()
        b = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert a == b, name
    assert base_fingerprint(again) == tiny_base.fingerprint
    assert tiny_base.fingerprint.startswith("sha256:")

    changed = tmp_path / "changed"
    shutil.copytree(again, changed)
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (changed / "model.safetensors").write_bytes(bytes(data))
    assert base_fingerprint(changed) != tiny_base.fingerprint

    config = json.loads((again / "config.json").read_text())
    config["rope_theta"] = 500000.0
    (again / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(again) != tiny_base.fingerprint


def test_resolve_builds_once_and_reuses(tiny_base: BaseInfo) -> None:
    mtime = (tiny_base.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_base("tiny")
    assert again.path == tiny_base.path
    assert (again.path / "model.safetensors").stat().st_mtime_ns == mtime
    info = describe_base(again)
    assert info["dtype"] == "F32" and info["fingerprint"] == tiny_base.fingerprint


def test_resolve_folder_and_unknown(tiny_base: BaseInfo, tmp_path: Path) -> None:
    assert resolve_base(str(tiny_base.path)).fingerprint == tiny_base.fingerprint
    with pytest.raises(BaseNotFoundError, match="built-in"):
        resolve_base("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseNotFoundError, match="config.json"):
        resolve_base(str(tmp_path / "empty"))


@pytest.mark.slow
def test_small_has_the_advertised_size(tmp_path: Path) -> None:
    info = describe_base(resolve_base(str(create_builtin_base("small", tmp_path / "small"))))
    assert 25_000_000 <= info["parameters"] <= 40_000_000
