"""Methods: bottleneck format and identity at init, seeded LoRA init, QLoRA settings, configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hub.errors import CorruptAdapterError
from trainers.configs import ALL_LINEAR, ConfigError, TrainConfig
from trainers.methods import get_method
from trainers.methods.bottleneck import (
    add_bottleneck_adapters,
    load_bottleneck,
    make_config,
    save_bottleneck,
)
from trainers.modeling import block_linear_names

IDS = torch.tensor([[5, 17, 300, 42, 9, 1000]])

LLAMA_BLOCK_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def causal(tiny_base):
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_base.path).eval()


def config(**overrides) -> TrainConfig:
    return TrainConfig(data="x.jsonl", name="t", **overrides)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_fresh_bottleneck_is_identity_and_roundtrips(variant, causal, tmp_path) -> None:
    base = causal()
    with torch.no_grad():
        expected = base(IDS).logits
    model = causal()
    cfg = make_config(model, variant=variant, reduction_factor=8, non_linearity="gelu")
    adapters = add_bottleneck_adapters(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected)
        for parameter in adapters.parameters():  # make it do something, then round-trip it
            parameter.add_(torch.randn_like(parameter) * 0.05)
        changed = model(IDS).logits
    assert not torch.allclose(changed, expected)
    save_bottleneck(model, tmp_path)

    saved = json.loads((tmp_path / "bottleneck_config.json").read_text())
    assert saved == {
        "adapter_type": "bottleneck", "variant": variant, "reduction_factor": 8, "bottleneck_size": 32,
        "non_linearity": "gelu", "hidden_size": 256, "num_layers": 4, "task_type": "CAUSAL_LM",
        "num_labels": None,
    }  # fmt: skip
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "layers.3.mlp_adapter.up.bias" in names
    assert ("layers.0.attn_adapter.down.weight" in names) == (variant == "houlsby")
    assert len(names) == (4 * 8 if variant == "houlsby" else 4 * 4)

    reloaded = load_bottleneck(causal(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, changed)


def test_bottleneck_head_saved_and_wrong_base_refused(tiny_base, tmp_path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=2)
    model.config.pad_token_id = 0
    get_method("bottleneck").prepare(model, config(method="bottleneck"), "classification")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(
        n.startswith(("bottleneck_adapters.", "score.")) for n in trainable
    )
    save_bottleneck(model, tmp_path)
    assert "score.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))

    cfg = json.loads((tmp_path / "bottleneck_config.json").read_text())
    cfg["num_layers"] = 8
    (tmp_path / "bottleneck_config.json").write_text(json.dumps(cfg))
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=2)
    with pytest.raises(CorruptAdapterError, match="does not fit"):
        load_bottleneck(fresh, tmp_path)


def test_lora_init_is_seeded_and_heads_are_saved(tiny_base) -> None:
    def lora_a(seed: int) -> torch.Tensor:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=3)
        peft_model = get_method("lora").prepare(model, config(seed=seed), "classification")
        assert "score" in peft_model.peft_config["default"].modules_to_save
        assert set(peft_model.peft_config["default"].target_modules) == set(LLAMA_BLOCK_LINEARS)
        return peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_qlora_settings_on_cpu() -> None:
    qlora = get_method("qlora")
    bnb = qlora.load_kwargs(config(method="qlora"), "cpu")["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    assert "score" in bnb.llm_int8_skip_modules
    assert qlora.quantization(config(method="qlora"), "cpu")["bits"] == 4
    assert (qlora.name, qlora.kind, qlora.adapter_format, qlora.quantized) == (
        "qlora",
        "adapter",
        "peft",
        True,
    )
    assert get_method("lora").quantization(config(), "cpu") is None
    full = get_method("full")
    assert (full.kind, full.adapter_format, full.quantized) == ("model", "hf-model", False)
    assert get_method("bottleneck").adapter_format == "bottleneck"
    with pytest.raises(ValueError, match="unknown method"):
        get_method("prefix")


def test_config_resolution_and_errors() -> None:
    resolved = config(method="bottleneck").to_dict()
    assert resolved["lr"] == 1e-3 and resolved["target_modules"] == [ALL_LINEAR]
    assert config(target_modules=["q_proj"]).resolved_target_modules() == ["q_proj"]
    assert TrainConfig.from_dict({"data": "d", "name": "n", "max-steps": 5}).max_steps == 5
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.from_dict({"data": "d", "name": "n", "epochz": 1})
    problems = TrainConfig(epochs=0, batch_size=0, eval_fraction=1.5).problems()
    assert len(problems) == 5  # data, name, epochs/max-steps, batch size, eval fraction


@pytest.mark.parametrize("name", ["lora", "qlora", "bottleneck", "full"])
def test_method_owns_its_optimizer_on_cpu(name: str) -> None:
    """On a CPU every method steps with AdamW at its default rate (QLoRA's paged 8-bit AdamW is GPU-only)."""
    run = config(method=name, weight_decay=0.01)
    optimizer = get_method(name).optimizer([torch.nn.Parameter(torch.zeros(2))], run, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == run.learning_rate and optimizer.defaults["weight_decay"] == 0.01


def test_all_linear_is_read_off_each_architecture(tiny_base) -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    llama = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=2)
    assert block_linear_names(llama) == LLAMA_BLOCK_LINEARS  # the `score` head is not a block linear
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      pad_token_id=0))  # fmt: skip
    assert block_linear_names(phi3) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(ConfigError, match="name the modules to adapt"):
        block_linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))
