"""The adapter format: safetensors headers, PEFT keys and options, bottleneck schema, pickles, bases.

`hub.adapter_format` and its siblings `hub.safetensors_header`, `hub.peft_config`, `hub.bottleneck_format`.

Files are written byte by byte here (no torch, no safetensors library), so every lie a header can tell is
easy to state.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hub import adapter_format as fmt
from hub import bottleneck_format as bn
from hub import peft_config as pc
from hub import safetensors_header as st
from hub.errors import BaseMismatchError, CorruptAdapterError
from hub.manifest import BaseSpec

ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I32": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, metadata=None) -> Path:
    """A valid safetensors file of zero-filled tensors: name -> (dtype, shape)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = ITEM[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A file whose header is exactly `header` (JSON-encoded unless bytes) and whose length field may lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


# ---- safetensors headers ------------------------------------------------------------------------------
def test_read_header_checks_and_returns_every_tensor(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "a.safetensors", {"a": ("F32", [2, 3]), "b": ("BF16", [4])})
    infos, data_start = st.read_header(path)
    assert set(infos) == {"a", "b"}
    assert infos["a"] == st.TensorInfo(dtype="F32", shape=(2, 3), begin=0, end=24)
    assert infos["b"] == st.TensorInfo(dtype="BF16", shape=(4,), begin=24, end=32)
    assert data_start == path.stat().st_size - 32


def test_any_file_header_keeps_metadata_and_any_dtype(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "base.safetensors", {"w": ("I8", [3])}, metadata={"format": "np"})
    header = st.read_safetensors_header(path)
    assert header["__metadata__"] == {"format": "np"} and header["w"]["dtype"] == "I8"
    with pytest.raises(CorruptAdapterError, match="dtype I8"):
        st.read_header(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\1\2\3", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header claims"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
    ],
)
def test_broken_headers_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    for read in (st.read_safetensors_header, st.read_header):
        with pytest.raises(CorruptAdapterError, match=match) as info:
            read(path)
        assert str(path) in str(info.value) and info.value.remedy


def test_a_header_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a": ("F32", [64])})
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 16)
    with pytest.raises(CorruptAdapterError, match="header claims"):
        st.read_safetensors_header(path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}, "dtype I32"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}, "truncated or damaged"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "truncated or damaged"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes"),
        ({"dtype": "F32", "shape": [1 << 40, 8], "data_offsets": [0, 8]}, "needs"),
        ({"dtype": "F32", "shape": [2]}, "malformed"),
        ({"dtype": "F32", "shape": ["x"], "data_offsets": [0, 8]}, "malformed"),
        ("F32", "malformed"),
    ],
)
def test_lying_tensor_entries_are_refused(tmp_path: Path, entry: object, match: str) -> None:
    path = write_raw(tmp_path / "x.safetensors", {"t": entry}, data=b"\0" * 8)
    with pytest.raises(CorruptAdapterError, match=match) as info:
        st.read_header(path)
    assert "'t'" in str(info.value)


# ---- pickles, configs, files --------------------------------------------------------------------------
def test_pickles_anywhere_in_any_case_are_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    fmt.refuse_pickles(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "optimizer.PT").write_bytes(b"x")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(CorruptAdapterError, match="pickle") as info:
        fmt.refuse_pickles(tmp_path)
    assert "adapter_model.bin" in str(info.value) and "sub/optimizer.PT" in str(info.value)
    assert "safetensors only" in str(info.value) and "safe_serialization=True" in info.value.remedy


def test_load_config_and_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CorruptAdapterError, match="is missing"):
        fmt.load_config(tmp_path / fmt.ADAPTER_CONFIG)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CorruptAdapterError, match="not readable JSON"):
        fmt.load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CorruptAdapterError, match="not a JSON object"):
        fmt.load_config(tmp_path / "list.json")
    (tmp_path / "ok.json").write_text('{"r": 4}')
    assert fmt.load_config(tmp_path / "ok.json") == {"r": 4}
    with pytest.raises(CorruptAdapterError, match=fmt.WEIGHTS_FILE) as info:
        fmt.weights_file(tmp_path)
    assert "pickled .bin" in info.value.remedy
    (tmp_path / fmt.WEIGHTS_FILE).write_bytes(b"")
    assert fmt.weights_file(tmp_path) == tmp_path / fmt.WEIGHTS_FILE


# ---- PEFT ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "module", "part"),
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj",
            "A",
        ),
        (
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight",
            "model.layers.3.mlp.down_proj",
            "B",
        ),
        ("base_model.model.model.embed_tokens.lora_embedding_A.weight", "model.embed_tokens", "embedding_A"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight",
            "model.layers.0.self_attn.q_proj",
            "magnitude_vector",
        ),
        (  # PEFT >= 0.14 saves DoRA's magnitude without `.weight`
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "model.layers.0.self_attn.q_proj",
            "magnitude_vector",
        ),
    ],
)
def test_lora_key(key: str, module: str, part: str) -> None:
    match = pc.LORA_KEY.match(key)
    assert match and (match["module"], pc.lora_part(match)) == (module, part)
    assert pc.LORA_KEY.match(key.replace("base_model.model.", "")) is None


def test_head_and_bottleneck_keys() -> None:
    assert pc.HEAD_KEY.match("base_model.model.score.modules_to_save.default.weight")["p"] == "weight"
    assert pc.HEAD_KEY.match("score.bias")["p"] == "bias"
    assert pc.HEAD_KEY.match("base_model.model.lm_head.weight") is None
    match = bn.BOTTLENECK_KEY.match("layers.12.attn_adapter.down.bias")
    assert match and (match["layer"], match["site"], match["proj"], match["p"]) == (
        "12",
        "attn",
        "down",
        "bias",
    )
    assert bn.BOTTLENECK_KEY.match("layers.1.ffn_adapter.down.weight") is None


def test_plain_lora_config_passes_and_others_are_refused_with_every_option_named(tmp_path: Path) -> None:
    path = tmp_path / fmt.ADAPTER_CONFIG
    plain = {"peft_type": "LORA", "r": 8, "bias": "none", "modules_to_save": ["score"]}
    pc.check_peft_options(path, plain)
    pc.check_peft_options(path, {})  # PEFT's defaults: a LoRA
    with pytest.raises(CorruptAdapterError, match="PEFT type 'PREFIX_TUNING'"):
        pc.check_peft_type(path, {"peft_type": "PREFIX_TUNING"})
    pc.check_peft_type(path, {"peft_type": "LORA", "use_dora": True})  # the type alone is fine
    fancy = {**plain, "use_dora": True, "bias": "all", "modules_to_save": ["score", "lm_head"]}
    with pytest.raises(CorruptAdapterError) as info:
        pc.check_peft_options(path, fancy)
    message = str(info.value)
    assert "DoRA" in message and "bias='all'" in message and "lm_head" in message and str(path) in message


def test_pattern_value_matches_the_end_of_a_module_path() -> None:
    pattern = {"q_proj": 16, r"layers\.1\.mlp\.up_proj": 4}
    assert pc.pattern_value(pattern, "model.layers.0.self_attn.q_proj", 8) == 16
    assert pc.pattern_value(pattern, "model.layers.1.mlp.up_proj", 8) == 4
    assert pc.pattern_value(pattern, "model.layers.0.self_attn.k_proj", 8) == 8
    assert pc.pattern_value(None, "x", 2.0) == 2.0


def test_peft_config_fields_are_typed_and_ranged_all_problems_at_once() -> None:
    config = {"r": True, "lora_alpha": float("nan"), "rank_pattern": {"q_proj": 0, "(a+)+$": 4},
              "alpha_pattern": {"down_proj": {"x": 1}}, "use_rslora": "yes", "modules_to_save": "score",
              "loftq_config": [[[[[1]]]]]}  # fmt: skip
    with pytest.raises(CorruptAdapterError) as info:
        pc.check_peft_config(Path("adapter_config.json"), config)
    message = str(info.value)
    fields = [
        "'r'",
        "'lora_alpha'",
        "rank_pattern['q_proj']",
        "rank_pattern key",
        "alpha_pattern['down_proj']",
    ]
    for field in [*fields, "'use_rslora'", "'modules_to_save'", "'loftq_config'"]:
        assert field in message, (field, message)
    assert "regular expressions are not accepted" in message  # the remedy for pattern keys
    valid = {"r": 8, "lora_alpha": 16.0, "rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj"]}
    pc.check_peft_config(Path("x"), {**valid, "bias": "none", "layer_replication": None})


KEYS = ["q_proj", "proj", "q.proj", r"q\.proj", "self_attn.q_proj", "layers.0.self_attn.q_proj",
        "mlp.up.proj", "model.layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "0.self_attn.q_proj",
        "x.model.layers.0.self_attn.q_proj", r"layers\.0\.mlp\.up_proj"]  # fmt: skip
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.10.mlp.up_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_pattern_keys_match_as_peft_reads_them_without_re(key: str) -> None:
    r"""PEFT's lookup is `re.match(rf"(.*\.)?({key})$", module)`; for module-path keys ours agrees exactly."""
    import re

    for module in MODULES:
        peft = re.match(rf"(.*\.)?({key})$", module) is not None
        assert pc.pattern_value({key: 4}, module, 8) == (4 if peft else 8), (key, module)


def test_a_pattern_key_that_would_freeze_re_never_matches_and_costs_nothing() -> None:
    import time

    started = time.perf_counter()
    for _ in range(1000):
        assert (
            pc.pattern_value({"(.|.)*(.|.)*(.|.)*Q" * 10: 4}, "model.layers.0.self_attn.q_proj" * 8, 8) == 8
        )
    assert time.perf_counter() - started < 1


# ---- bottleneck ---------------------------------------------------------------------------------------
GOOD_BOTTLENECK = {
    "variant": "houlsby",
    "reduction_factor": 16,
    "bottleneck_size": 16,
    "non_linearity": "gelu",
    "hidden_size": 256,
    "num_layers": 4,
    "task_type": "CAUSAL_LM",
}


def test_bottleneck_config_round_trips_and_lists_every_problem(tmp_path: Path) -> None:
    config = bn.BottleneckConfig.from_dict(GOOD_BOTTLENECK)
    assert config.num_labels is None and config.adapter_type == "bottleneck"
    bad = {**GOOD_BOTTLENECK, "variant": "lora", "non_linearity": "tanh", "bottleneck_size": 0}
    assert len(bn.bottleneck_problems(bad)) == 3
    with pytest.raises(CorruptAdapterError) as info:
        bn.BottleneckConfig.from_dict(bad, tmp_path / fmt.BOTTLENECK_CONFIG)
    assert all(word in str(info.value) for word in ("'lora'", "'tanh'", "bottleneck_size 0"))
    with pytest.raises(CorruptAdapterError, match="unknown field 'extra'.*missing field 'num_layers'"):
        bn.BottleneckConfig.from_dict(
            {**{k: v for k, v in GOOD_BOTTLENECK.items() if k != "num_layers"}, "extra": 1}
        )
    with pytest.raises(CorruptAdapterError, match="not a JSON object"):
        bn.BottleneckConfig.from_dict([])  # type: ignore[arg-type]


def test_bottleneck_fits_only_its_hidden_size_and_depth() -> None:
    bn.check_bottleneck_fits(GOOD_BOTTLENECK, 256, 4, "x")
    with pytest.raises(BaseMismatchError, match="hidden size 256 and 4 layers; base b has 512 and 4"):
        bn.check_bottleneck_fits(GOOD_BOTTLENECK, 512, 4, "x", base_name="base b")
    with pytest.raises(BaseMismatchError, match="None layers"):
        bn.check_bottleneck_fits({**GOOD_BOTTLENECK, "num_layers": None}, 256, 4, "x")


def test_every_reader_of_the_format_knows_the_same_activations() -> None:
    pytest.importorskip("torch")
    from server.lora_batch import ACTIVATION_FNS
    from trainers.methods.bottleneck import ACTIVATIONS

    assert set(ACTIVATION_FNS) == set(ACTIVATIONS) == set(bn.BOTTLENECK_ACTIVATIONS)


# ---- bases --------------------------------------------------------------------------------------------
def test_check_base_names_both_bases_and_the_remedy() -> None:
    tiny = BaseSpec("tiny", "sha256:" + "a" * 64)
    small = BaseSpec("small", "sha256:" + "b" * 64)
    fmt.check_base("chat@1", tiny, BaseSpec("my-tiny-copy", tiny.fingerprint))
    with pytest.raises(BaseMismatchError) as info:
        fmt.check_base("chat@1", tiny, small, expected_as="the served base ", outcome="Nothing was loaded.")
    message = str(info.value)
    assert message.startswith(
        "chat@1 was trained on base tiny (sha256:aaaaaaaaaaaa), not on the served base "
    )
    assert "small (sha256:bbbbbbbbbbbb). Nothing was loaded." in message
    assert info.value.remedy == BaseMismatchError.default_remedy
    with pytest.raises(BaseMismatchError, match="--base tiny"):
        fmt.check_base("chat@1", tiny, small, remedy="Serve it with --base tiny.")
