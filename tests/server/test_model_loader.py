"""Loading the base: quantization choices, footprint, and refusals."""

from __future__ import annotations

import pytest
import torch

from server.model_loader import ModelLoadError, load_base, quantization_config


def test_no_quantization_needs_no_config_and_unknown_choices_are_refused():
    assert quantization_config("none", torch.float32) is None
    with pytest.raises(ModelLoadError, match="fp8"):
        quantization_config("fp8", torch.float32)


def test_unquantized_load_is_eval_fp32_on_cpu(tiny_base, caplog):
    caplog.set_level("INFO", logger="server.model_loader")
    base = load_base(tiny_base.path, "none")
    assert base.device.type == "cpu" and base.dtype == torch.float32
    assert not base.model.training
    assert base.memory_footprint == base.model.get_memory_footprint() > 0
    assert "MiB" in caplog.text


def test_missing_folder_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_base(tmp_path / "nothing", "none")


@pytest.mark.slow
def test_nf4_and_int8_are_smaller_than_fp32(tiny_base):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    nf4_config = quantization_config("nf4", torch.float32)
    assert nf4_config.load_in_4bit and nf4_config.bnb_4bit_quant_type == "nf4"
    assert nf4_config.bnb_4bit_use_double_quant and nf4_config.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config("int8", torch.float32).load_in_8bit

    full = load_base(tiny_base.path, "none")
    nf4 = load_base(tiny_base.path, "nf4")
    int8 = load_base(tiny_base.path, "int8")
    assert isinstance(nf4.model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(int8.model.model.layers[0].mlp.down_proj, Linear8bitLt)
    assert nf4.memory_footprint < int8.memory_footprint < full.memory_footprint
