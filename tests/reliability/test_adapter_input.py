"""Adapter files as hostile input, against the real server: every field of adapter_config.json and of the
safetensors header is checked before use, pattern keys cannot freeze the process, and a forward that turns
non-finite for one row fails that request alone.

Each hostile adapter is registered with valid checksums (so only the loader's own rules can refuse it) and
must get a 422 `corrupt_adapter` naming the file and the field, twice (a failed load is not cached), while
the reference adapters keep answering their known outputs. The fuzz cases throw hypothesis-made configs and
headers at the same real engine (tiny base) and allow only 200 or a 422 that names the file.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from tests.reliability.conftest import PROMPT, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(300)]

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_COUNTER = iter(range(10**9))
FUZZED: collections.Counter = collections.Counter()
"""(file, status) of every fuzz example, so the last test can check that both outcomes were reached."""


# ---- helpers ----------------------------------------------------------------------------------------
def register_variant(
    live: ServerProcess,
    tmp_path: Path,
    name: str,
    *,
    config: Callable[[dict], Any] | None = None,
    header: Callable[[dict], Any] | None = None,
    weights: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> str:
    """Copy load-00, change its config text, header or tensors, register it as `name`; -> the name.

    `config` and `header` take the parsed JSON and return either new JSON (dumped with NaN/Infinity
    allowed) or raw `bytes`/`str` written as they are.
    """
    folder = tmp_path / f"{name}-{next(_COUNTER)}"
    shutil.copytree(live.folders["load-00"], folder)
    if weights is not None:
        tensors = load_file(str(folder / WEIGHTS))
        weights(tensors)
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    if config is not None:
        changed = config(json.loads((folder / CONFIG).read_text()))
        (folder / CONFIG).write_bytes(_as_bytes(changed))
    if header is not None:
        raw = (folder / WEIGHTS).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        changed = _as_bytes(header(json.loads(raw[8 : 8 + length])))
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(changed)) + changed + raw[8 + length :])
    spec = live.registry.get("load-00").manifest.base
    live.registry.put(folder, name=name, task="instruction", method="lora", base=spec)
    return name


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()  # allow_nan: NaN and Infinity literals, as a hostile writer would


def assert_corrupt(live: ServerProcess, model: str, *words: str) -> dict:
    """422 `corrupt_adapter` naming `words` (file, field), twice: a failed load is never cached."""
    for _ in range(2):
        response = live.complete(model)
        assert response.status_code == 422, (model, response.status_code, response.text[:600])
        error = response.json()["error"]
        assert error["code"] == "corrupt_adapter", error
        for word in words:
            assert word in error["message"], (model, word, error["message"])
        assert "Traceback" not in error["message"]
    with live.client() as client:
        listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert not listed[f"{model}@1"]["loaded"]
    return error


def set_field(field: str, value: Any) -> Callable[[dict], dict]:
    return lambda config: {**config, field: value}


def first_entry(change: Callable[[dict], Any]) -> Callable[[dict], dict]:
    """Apply `change` to the header entry of the first lora_A tensor."""

    def edit(header: dict) -> dict:
        name = sorted(k for k in header if "lora_A" in k)[0]
        header[name] = change(dict(header[name]))
        return header

    return edit


# ---- configs ------------------------------------------------------------------------------------------
# name -> (change to adapter_config.json, words the 422 must contain besides the file name)
HOSTILE_CONFIGS: dict[str, tuple[Callable[[dict], Any], tuple[str, ...]]] = {
    "alpha-nan": (set_field("lora_alpha", math.nan), ("'lora_alpha'", "finite")),
    "alpha-inf": (set_field("lora_alpha", math.inf), ("'lora_alpha'",)),
    "alpha-negative": (set_field("lora_alpha", -16), ("'lora_alpha'",)),
    "alpha-huge": (set_field("lora_alpha", 1e300), ("'lora_alpha'",)),
    "alpha-string": (set_field("lora_alpha", "16"), ("'lora_alpha'",)),
    "r-zero": (set_field("r", 0), ("'r'",)),
    "r-bool": (set_field("r", True), ("'r'",)),
    "r-float": (set_field("r", 8.5), ("'r'",)),
    "r-list": (set_field("r", [8]), ("'r'",)),
    "r-huge-literal": (
        lambda c: json.dumps(c).replace('"r": 8', '"r": ' + "9" * 5000),
        ("not readable JSON",),
    ),
    "rank-pattern-nested": (set_field("rank_pattern", {"q_proj": {"r": 4}}), ("rank_pattern",)),
    "rank-pattern-list": (set_field("rank_pattern", [["q_proj", 4]]), ("'rank_pattern'",)),
    "rank-pattern-zero": (set_field("rank_pattern", {"q_proj": 0}), ("rank_pattern",)),
    "alpha-pattern-inf": (set_field("alpha_pattern", {"down_proj": math.inf}), ("alpha_pattern",)),
    "alpha-pattern-nan": (set_field("alpha_pattern", {"down_proj": math.nan}), ("alpha_pattern",)),
    "alpha-pattern-regex": (set_field("alpha_pattern", {r"layers\.\d+\.mlp": 4}), ("alpha_pattern key",)),
    "modules-to-save-string": (set_field("modules_to_save", "score"), ("'modules_to_save'",)),
    "rslora-string": (set_field("use_rslora", "yes"), ("'use_rslora'",)),
    "deep-nesting": (set_field("loftq_config", [[[[[[1]]]]]]), ("'loftq_config'", "nested")),
    "json-deeper-than-recursion": (lambda c: "[" * 200_000 + "]" * 200_000, ("not readable JSON",)),
    "not-an-object": (lambda c: [c], ("not a JSON object",)),
    "oversized": (lambda c: {**c, "padding": "x" * (2 << 20)}, ("larger than",)),
}


def test_hostile_adapter_configs_are_422_naming_the_file_and_field(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    for case, (change, words) in HOSTILE_CONFIGS.items():
        name = register_variant(live, tmp_path, f"config-{case}", config=change)
        assert_corrupt(live, name, CONFIG, *words)
    for model in ("load-01", "load-02"):
        assert live.greedy(model) == solo[model]
    assert live.alive()


# Under PEFT's reading (`re.match(rf"(.*\.)?({key})$", module)`) this key takes minutes per module name,
# all of it holding the GIL: every request of the process would stall behind one adapter load.
REDOS_KEY = "(.|.)*(.|.)*(.|.)*Q"


def test_a_pattern_key_cannot_freeze_the_server(live: ServerProcess, solo: dict[str, str], tmp_path: Path):
    name = register_variant(live, tmp_path, "config-redos", config=set_field("rank_pattern", {REDOS_KEY: 4}))
    neighbour: dict[str, Any] = {}

    def ask_neighbour() -> None:
        time.sleep(0.3)
        started = time.monotonic()
        neighbour["text"] = live.greedy("load-01")
        neighbour["took"] = time.monotonic() - started

    thread = threading.Thread(target=ask_neighbour)
    thread.start()
    started = time.monotonic()
    with live.client(timeout=30) as client:
        response = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
    took = time.monotonic() - started
    thread.join(60)
    assert response.status_code == 422, response.text
    assert "rank_pattern key" in response.json()["error"]["message"] and CONFIG in response.text
    assert took < 10, f"refusing the pattern took {took:.1f} s"
    assert neighbour["text"] == solo["load-01"] and neighbour["took"] < 10


def test_pattern_keys_as_module_paths_still_apply(live: ServerProcess, solo: dict[str, str], tmp_path: Path):
    """Literal keys (PEFT's usual ones) keep PEFT's meaning: a rank_pattern that repeats `r` changes
    nothing, an alpha_pattern of 0-like scale on every module gives the base's output."""
    same = register_variant(
        live, tmp_path, "config-pattern-same", config=set_field("rank_pattern", {"q_proj": 8})
    )
    assert live.greedy(same) == solo["load-00"]
    tiny = {"q_proj": 1e-9, "k_proj": 1e-9, r"self_attn\.v_proj": 1e-9, "o_proj": 1e-9, "mlp.gate_proj": 1e-9,
            "up_proj": 1e-9, "model.layers.0.mlp.down_proj": 1e-9, "down_proj": 1e-9}  # fmt: skip
    faint = register_variant(live, tmp_path, "config-pattern-faint", config=set_field("alpha_pattern", tiny))
    assert live.greedy(faint) == live.greedy("tiny")


# ---- safetensors headers --------------------------------------------------------------------------------
def _overlap(header: dict) -> dict:
    a, b = sorted(k for k in header if "lora_A" in k)[:2]
    header[b] = {**header[b], "data_offsets": header[a]["data_offsets"]}
    return header


HOSTILE_HEADERS: dict[str, tuple[Callable[[dict], Any], tuple[str, ...]]] = {
    "dtype-list": (first_entry(lambda e: {**e, "dtype": ["F32"]}), ("dtype",)),
    "dtype-f64": (first_entry(lambda e: {**e, "dtype": "F64"}), ("dtype F64",)),
    "offsets-strings": (
        first_entry(lambda e: {**e, "data_offsets": [str(o) for o in e["data_offsets"]]}),
        ("data_offsets",),
    ),  # fmt: skip
    "offsets-floats": (
        first_entry(lambda e: {**e, "data_offsets": [float(o) for o in e["data_offsets"]]}),
        ("data_offsets",),
    ),  # fmt: skip
    "shape-floats": (first_entry(lambda e: {**e, "shape": [float(d) for d in e["shape"]]}), ("shape",)),
    "shape-bools": (first_entry(lambda e: {**e, "shape": [True] * len(e["shape"])}), ("shape",)),
    "shape-too-deep": (first_entry(lambda e: {**e, "shape": [1] * 40}), ("shape",)),
    "extra-key": (first_entry(lambda e: {**e, "evil": {"nested": [1, 2]}}), ("malformed header entry",)),
    "metadata-nested": (lambda h: {**h, "__metadata__": {"format": {"pt": [1]}}}, ("__metadata__",)),
    "overlapping-tensors": (_overlap, ("overlap",)),
    "huge-integer": (
        lambda h: json.dumps(h).replace('"data_offsets": [', '"data_offsets": [' + "9" * 5000 + ", ", 1),
        ("not valid JSON",),
    ),  # fmt: skip
    "nested-past-recursion": (lambda h: b"[" * 200_000 + b"]" * 200_000, ("not valid JSON",)),
}


def test_hostile_safetensors_headers_are_422_naming_the_tensor(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    for case, (change, words) in HOSTILE_HEADERS.items():
        name = register_variant(live, tmp_path, f"header-{case}", header=change)
        assert_corrupt(live, name, WEIGHTS, *words)
    assert live.greedy("load-01") == solo["load-01"]
    assert live.alive()


# ---- a forward that turns non-finite for one row ------------------------------------------------------
def overflowing(tensors: dict[str, np.ndarray]) -> None:
    """Finite factors (1e38, below float32's 3.4e38) whose product overflows: inf, then NaN, in a forward."""
    for key in [k for k in tensors if "lora_" in k]:
        tensors[key] = np.full_like(tensors[key], 1e38)


def test_a_row_whose_forward_turns_non_finite_fails_alone(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    name = register_variant(live, tmp_path, "overflow", weights=overflowing)
    sampled_neighbour: dict[str, httpx.Response] = {}
    greedy_neighbour: dict[str, httpx.Response] = {}
    body = {"model": "load-02", "prompt": PROMPT, "max_tokens": 120, "temperature": 0.7, "seed": 1,
            "ignore_eos": True}  # fmt: skip

    def sampled() -> None:
        with live.client() as client:
            sampled_neighbour["r"] = client.post("/v1/completions", json=body)

    threads = [
        threading.Thread(target=sampled),
        threading.Thread(target=lambda: greedy_neighbour.update(r=live.complete("load-01", max_tokens=120))),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both neighbours are decoding when the overflowing requests join their batch
    with live.client() as client:
        hostile = [
            client.post(
                "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4, "temperature": t}
            )  # fmt: skip
            for t in (0.8, 0.0)
        ]
    for thread in threads:
        thread.join(120)
    for response in hostile:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "non_finite_output" and "non-finite" in error["message"], error
    assert greedy_neighbour["r"].status_code == 200, greedy_neighbour["r"].text
    assert sampled_neighbour["r"].status_code == 200, sampled_neighbour["r"].text
    assert sampled_neighbour["r"].json()["usage"]["completion_tokens"] == 120
    assert live.greedy("load-01") == solo["load-01"]  # later batches are unaffected
    assert live.metric("adapterdock_scheduler_running") == 0


# ---- fuzz against the real engine -----------------------------------------------------------------------
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["q_proj", "(.|.)*(.|.)*Q", "F32", "LORA", "none", ""])
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
pattern_keys = st.sampled_from(
    ["q_proj", "down_proj", "layers.0.mlp.up_proj", r"self_attn\.k_proj", "x"]
) | st.text(max_size=20)
config_changes = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "modules_to_save",
                     "target_modules", "bias", "peft_type", "lora_dropout", "use_dora", "layers_to_transform",
                     "loftq_config", "extra_field"]),
    json_values
    | st.integers(-2, 80)
    | st.floats(-1e40, 1e40)
    | st.dictionaries(pattern_keys, st.integers(-1, 80) | st.floats(allow_nan=True), max_size=4),
    min_size=1, max_size=3,
)  # fmt: skip


def _check_fuzzed(live: ServerProcess, name: str, what: Any, file: str) -> int:
    response = live.complete(name, max_tokens=2)
    assert response.status_code in (200, 422), (what, response.status_code, response.text[:600])
    if response.status_code == 422:
        error = response.json()["error"]
        assert (
            error["code"] in ("corrupt_adapter", "non_finite_output") and "Traceback" not in error["message"]
        )
        assert error["code"] == "non_finite_output" or file in error["message"], (what, error)
    FUZZED[file, response.status_code] += 1
    return response.status_code


@FUZZ
@given(changes=config_changes)
def test_fuzz_adapter_configs_against_the_real_engine(live: ServerProcess, tmp_path: Path, changes: dict):
    name = register_variant(
        live, tmp_path, f"fuzz-config-{next(_COUNTER)}", config=lambda c: {**c, **changes}
    )
    _check_fuzzed(live, name, changes, CONFIG)


entry_changes = st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    json_values | st.lists(st.integers(-5, 2**40), max_size=4) | st.sampled_from(["F16", "BF16", "I8"]),
    max_size=2,
)  # fmt: skip
"""Changes to one header entry; none at all (with no metadata) is the valid file, which must load."""


@FUZZ
@given(changes=entry_changes, metadata=st.none() | json_values, which=st.integers(0, 200))
def test_fuzz_safetensors_headers_against_the_real_engine(
    live: ServerProcess, tmp_path: Path, changes: dict, metadata: Any, which: int
):
    def edit(header: dict) -> dict:
        names = sorted(k for k in header if k != "__metadata__")
        target = names[which % len(names)]
        header[target] = {**header[target], **changes}
        if metadata is not None:
            header["__metadata__"] = metadata
        return header

    name = register_variant(live, tmp_path, f"fuzz-header-{next(_COUNTER)}", header=edit)
    _check_fuzzed(live, name, (changes, metadata), WEIGHTS)


def test_the_server_survived_the_fuzz(live: ServerProcess, solo: dict[str, str]):
    if FUZZED:  # the fuzz ran in this session: it reached both loads and refusals of each file
        assert {(f, s) for f in (CONFIG, WEIGHTS) for s in (200, 422)} <= set(FUZZED), FUZZED
        print(f"\nfuzz outcomes: {dict(FUZZED)}")
    assert live.alive()
    assert live.greedy("load-03") == solo["load-03"]
