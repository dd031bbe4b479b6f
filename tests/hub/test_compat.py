"""hub.compat: an adapter folder checked against a base from headers and configs alone (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hub.compat import check_bottleneck_fits_base, check_fits_base, check_peft_fits_base
from hub.errors import BaseMismatchError, CorruptAdapterError

HIDDEN, INTER, LAYERS, RANK = 8, 16, 2, 4
LINEARS = {  # module -> (out, in), as the base stores its weights
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A two-layer base: config.json and one safetensors file with its linears (zeros)."""
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = {
        f"model.layers.{i}.{name}.weight": np.zeros(shape, dtype=np.float32)
        for i in range(LAYERS)
        for name, shape in LINEARS.items()
    }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def peft_folder(root: Path, shapes: dict[str, tuple[int, ...]], **config) -> Path:
    """A PEFT LoRA folder holding tensors of the given shapes (`config` overrides adapter_config.json)."""
    folder = root / "lora"
    folder.mkdir(exist_ok=True)
    save_file(
        {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, **config}))
    return folder


def lora_shapes(layers: range = range(LAYERS), rank: int = RANK) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in layers:
        for name, (out_features, in_features) in LINEARS.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, in_features)
            shapes[f"{prefix}.lora_B.weight"] = (out_features, rank)
    return shapes


def test_fitting_lora_passes_and_returns_its_config(base: Path, tmp_path: Path) -> None:
    extra = {
        "base_model.model.score.modules_to_save.default.weight": (3, HIDDEN)
    }  # not a LoRA factor: skipped
    folder = peft_folder(tmp_path, {**lora_shapes(), **extra}, lora_alpha=8)
    config = check_peft_fits_base(folder, base)
    assert config["lora_alpha"] == 8
    assert check_fits_base(folder, base, "peft") == config


def test_lora_for_another_shape_lists_the_first_problems(base: Path, tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, lora_shapes(rank=RANK), r=RANK * 2)  # the config lies about the rank
    with pytest.raises(BaseMismatchError) as info:
        check_peft_fits_base(folder, base)
    message = str(info.value)
    assert message.startswith(f"{folder} does not fit base {base}: ")
    assert f"needs [{RANK * 2}, {HIDDEN}]" in message and "(and 7 more)" in message
    assert info.value.remedy == BaseMismatchError.default_remedy


def test_lora_for_a_deeper_base_names_the_missing_layer(base: Path, tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, lora_shapes(layers=range(LAYERS + 1)))
    with pytest.raises(
        BaseMismatchError, match=r"the base has no layer model\.layers\.2\.self_attn\.q_proj\.weight"
    ):
        check_peft_fits_base(folder, base)


def test_unsupported_or_unreadable_peft_folders(base: Path, tmp_path: Path) -> None:
    folder = peft_folder(tmp_path, lora_shapes(), peft_type="IA3")
    with pytest.raises(CorruptAdapterError, match="PEFT type 'IA3'"):
        check_peft_fits_base(folder, base)
    folder = peft_folder(tmp_path, lora_shapes())
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptAdapterError, match="has no adapter_model.safetensors"):
        check_peft_fits_base(folder, base)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(CorruptAdapterError, match="too short"):
        check_peft_fits_base(folder, base)
    (folder / "adapter_config.json").write_text("{")
    with pytest.raises(CorruptAdapterError, match="not readable JSON"):
        check_peft_fits_base(folder, base)


def bottleneck_folder(root: Path, **config) -> Path:
    folder = root / "bneck"
    folder.mkdir(exist_ok=True)
    values = {"variant": "pfeiffer", "bottleneck_size": 2, "non_linearity": "relu", "hidden_size": HIDDEN,
              "num_layers": LAYERS, **config}  # fmt: skip
    (folder / "bottleneck_config.json").write_text(json.dumps(values))
    return folder


def test_bottleneck_fits_by_hidden_size_and_depth(base: Path, tmp_path: Path) -> None:
    folder = bottleneck_folder(tmp_path)
    assert check_bottleneck_fits_base(folder, base)["variant"] == "pfeiffer"
    assert check_fits_base(folder, base, "bottleneck")["hidden_size"] == HIDDEN
    for wrong in ({"hidden_size": HIDDEN * 2}, {"num_layers": LAYERS + 1}):
        folder = bottleneck_folder(tmp_path, **wrong)
        with pytest.raises(BaseMismatchError, match=f"base {base} has {HIDDEN} and {LAYERS}"):
            check_fits_base(folder, base, "bottleneck")


def test_full_models_need_no_check(base: Path, tmp_path: Path) -> None:
    assert check_fits_base(tmp_path / "anything", base, "hf-model") == {}
