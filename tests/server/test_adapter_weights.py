"""Reading adapter folders: PEFT names and scales, bottleneck, heads, and every corruption refused."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from hub.errors import BaseMismatchError, CorruptAdapterError
from hub.safetensors_header import read_header
from server.adapter_weights import BaseLayout, read_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def layout(tiny_base) -> BaseLayout:
    return BaseLayout.from_config(AutoConfig.from_pretrained(tiny_base.path))


@pytest.fixture
def copy_of(adapters, tmp_path):
    """A writable copy of a registered adapter folder (and its manifest)."""

    def copy(name: str) -> tuple[Path, object]:
        adapter = adapters[name]
        folder = tmp_path / name
        shutil.copytree(adapter.path, folder)
        return folder, adapter.manifest

    return copy


def _rewrite_header(path: Path, edit) -> None:
    """Apply `edit` to a safetensors file's JSON header, keeping the data section."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])


def test_peft_lora_reads_every_module_with_its_scale(adapters, layout):
    a = read_adapter(adapters["gen-a"].path, adapters["gen-a"].manifest, layout, max_rank=64)
    assert len(a.lora) == 4 * 7 and a.rank == 8 and a.head_weight is None
    q = a.lora["model.layers.0.self_attn.q_proj"]
    assert q.a.shape == (8, 256) and q.b.shape == (256, 8) and q.scale == pytest.approx(2.0)
    assert q.b.abs().sum() > 0
    b = read_adapter(adapters["gen-b"].path, adapters["gen-b"].manifest, layout, max_rank=64)
    assert set(m.rsplit(".", 1)[1] for m in b.lora) == {"q_proj", "v_proj"}
    assert b.lora["model.layers.1.self_attn.v_proj"].scale == pytest.approx(8 / math.sqrt(4))
    c = read_adapter(adapters["gen-c"].path, adapters["gen-c"].manifest, layout, max_rank=64)
    assert c.lora["model.layers.2.mlp.down_proj"].scale == pytest.approx(4 / 16)
    assert c.lora["model.layers.2.mlp.up_proj"].scale == pytest.approx(2.0)


def test_task_heads_are_read_from_modules_to_save(adapters, layout):
    cls = read_adapter(adapters["cls"].path, adapters["cls"].manifest, layout, max_rank=64)
    assert cls.head_weight.shape == (3, 256) and cls.head_bias is None
    ner = read_adapter(adapters["ner"].path, adapters["ner"].manifest, layout, max_rank=64)
    assert ner.head_weight.shape == (5, 256) and ner.head_bias.shape == (5,)
    reward = read_adapter(adapters["reward"].path, adapters["reward"].manifest, layout, max_rank=64)
    assert reward.head_weight.shape == (1, 256)


def test_bottleneck_reads_both_sites(adapters, layout):
    weights = read_adapter(adapters["bneck"].path, adapters["bneck"].manifest, layout, max_rank=64)
    assert weights.method == "bottleneck" and weights.activation == "gelu"
    assert len(weights.bottleneck) == 8 and weights.bottleneck_size == 16
    assert weights.bottleneck[(3, "attn")].down_weight.shape == (16, 256)


def test_bit_flip_in_header_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    raw = bytearray((folder / WEIGHTS).read_bytes())
    raw[20] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(CorruptAdapterError, match=WEIGHTS):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_absurd_header_length_is_refused_before_reading(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])
    with pytest.raises(CorruptAdapterError, match="header claims"):
        read_header(folder / WEIGHTS)


def test_truncated_file_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    raw = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CorruptAdapterError, match="truncated"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_tensor_claiming_more_bytes_than_the_file_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def grow(header):
        header[key]["shape"] = [8, 1 << 40]

    _rewrite_header(folder / WEIGHTS, grow)
    with pytest.raises(CorruptAdapterError, match="q_proj.lora_A"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_wrong_shape_is_refused_naming_the_tensor(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    tensors[key] = torch.zeros(256, 8)  # up_proj's out is 512
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CorruptAdapterError, match=r"layers\.1\.mlp\.up_proj\.lora_B.*\[512, 8\]"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_wrong_dtype_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CorruptAdapterError, match="dtype I32"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_unknown_module_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 256)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CorruptAdapterError, match=r"layers\.9"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_missing_file_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    (folder / WEIGHTS).unlink()
    with pytest.raises(CorruptAdapterError, match="missing"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_pickle_bin_is_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CorruptAdapterError, match="pickle"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_unsupported_peft_options_are_refused(copy_of, layout):
    folder, manifest = copy_of("gen-a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(CorruptAdapterError, match="LoRA bias"):
        read_adapter(folder, manifest, layout, max_rank=64)


def test_dora_reads_its_magnitudes_and_needs_them(copy_of, layout):
    folder, manifest = copy_of("dora-a")
    weights = read_adapter(folder, manifest, layout, max_rank=64)
    assert weights.method == "dora"
    q = weights.lora["model.layers.0.self_attn.q_proj"]
    assert q.magnitude is not None and q.magnitude.shape == (q.b.shape[0],)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(CorruptAdapterError, match="magnitude_vector"):  # a magnitude without DoRA
        read_adapter(folder, manifest, layout, max_rank=64)
    plain, plain_manifest = copy_of("gen-a")
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CorruptAdapterError, match="no lora_magnitude_vector"):  # DoRA without its magnitudes
        read_adapter(plain, plain_manifest, layout, max_rank=64)


def test_rank_above_max_rank_is_refused(adapters, layout):
    with pytest.raises(CorruptAdapterError, match="--max-rank"):
        read_adapter(adapters["gen-c"].path, adapters["gen-c"].manifest, layout, max_rank=8)


def test_head_that_disagrees_with_labels_is_refused(adapters, layout):
    manifest = adapters["cls"].manifest
    wrong = type(manifest)(**{**manifest.__dict__, "labels": ["a", "b"]})
    with pytest.raises(CorruptAdapterError, match="score.weight"):
        read_adapter(adapters["cls"].path, wrong, layout, max_rank=64)


def test_bottleneck_for_another_base_is_a_base_mismatch(copy_of, layout):
    folder, manifest = copy_of("bneck")
    config = json.loads((folder / "bottleneck_config.json").read_text())
    (folder / "bottleneck_config.json").write_text(json.dumps({**config, "hidden_size": 512}))
    with pytest.raises(BaseMismatchError, match="hidden size 512"):
        read_adapter(folder, manifest, layout, max_rank=64)
