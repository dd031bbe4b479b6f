"""The on-disk adapter format, owned in one place: what an adapter folder may hold and what is refused.

- safetensors headers, parsed from the raw bytes with one set of limits: `read_safetensors_header` for
  any file (bases too), `read_header` for adapter weights, whose every tensor entry is checked against
  the file size before anything is allocated;
- PEFT LoRA folders: the tensor-name patterns, `peft_type`, every field's type and range (`check_peft_config`:
  `r`, `lora_alpha`, `rank_pattern`/`alpha_pattern` and their keys, no nesting where none is expected), the
  options adapterdock does not apply, and PEFT's pattern lookup at a bounded cost (`pattern_value`);
- bottleneck folders: the `bottleneck_config.json` schema, its variants and activations;
- pickle refusal: adapterdock never unpickles;
- `check_base`: an adapter meets the base it was trained on (same fingerprint), else `BaseMismatchError`.

Boundary: json, re and struct only; no torch, no numpy. Training (`trainers`) and serving (`server`) meet
in this format as data and both take its rules from here; turning checked tensors into weights is theirs.
Every problem is a `CorruptAdapterError` or `BaseMismatchError` that names the file and the remedy.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from hub.errors import BaseMismatchError, CorruptAdapterError
from hub.manifest import BaseSpec

ADAPTER_CONFIG = "adapter_config.json"
BOTTLENECK_CONFIG = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_HEADER_BYTES = 64 << 20
"""Largest safetensors JSON header accepted (real headers are kilobytes to a few MiB)."""
MAX_CONFIG_BYTES = 1 << 20
"""Largest adapter_config.json / bottleneck_config.json read (real ones are about a kilobyte)."""
MAX_TENSOR_DIMS = 8
"""Most dimensions a tensor of an adapter may have (LoRA factors and heads have one or two)."""
ADAPTER_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
"""safetensors dtype name -> item size, for the dtypes adapter weights may have."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REEXPORT = "Re-export it with save_pretrained(..., safe_serialization=True) from the training run."
SAFE_SAVE = "Save with save_pretrained(..., safe_serialization=True); pickled .bin files are refused."
BOTTLENECK_FIX = "Re-export the bottleneck adapter with adapterdock's trainer (see docs/training.md)."

# ---- PEFT LoRA --------------------------------------------------------------------------------------
LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B|magnitude_vector)"
    r"(?:\.[^.]+)?\.weight$"
)
"""A PEFT LoRA tensor: `module` is the wrapped layer's path, `part` A or B (others are refused)."""
HEAD_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:score|classifier)(?:\.modules_to_save\.[^.]+)?\.(?P<p>weight|bias)$"
)
"""The task head (`score`, saved through modules_to_save) of a classification, NER or reward adapter."""
HEAD_MODULES = ("score", "classifier")
UNSUPPORTED_PEFT = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "alora_invocation_tokens": "activated LoRA",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters",
}
"""PEFT options whose math adapterdock does not implement: refused rather than served as something else."""
MAX_LORA_RANK = 1 << 16
"""Largest `r` (or `rank_pattern` value) the format accepts; the server's `--max-rank` is far lower."""
MAX_LORA_ALPHA = 1e6
"""Largest `lora_alpha` (or `alpha_pattern` value): real ones are 1-1024; larger makes scales overflow."""
MAX_PATTERN_ENTRIES = 4096
"""Most keys in `rank_pattern` or `alpha_pattern` (one per module of a 500-layer model's 8 linears)."""
MAX_PATTERN_KEY = 256
"""Longest `rank_pattern` / `alpha_pattern` key, in characters."""
PATTERN_KEY = re.compile(r"[A-Za-z0-9_]+(?:\\?\.[A-Za-z0-9_]+)*")
"""What a pattern key may be: a module path or the end of one (`q_proj`, `layers.0.mlp.down_proj`), its dots
optionally escaped as in a regex (`layers\\.0\\.mlp`)."""
MAX_CONFIG_DEPTH = 4
"""Deepest nesting of any value in adapter_config.json (PEFT's deepest, `layer_replication`, is 2)."""
PATTERN_FIX = (
    "Write each rank_pattern/alpha_pattern key as a module path or its end (`q_proj`, "
    "`model.layers.0.self_attn.q_proj`), one entry per module; regular expressions are not accepted."
)

# ---- bottleneck -------------------------------------------------------------------------------------
BOTTLENECK_VARIANTS = ("houlsby", "pfeiffer")
"""houlsby: after attention and MLP; pfeiffer: after the MLP only."""
BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "silu")
MAX_BOTTLENECK_DIM = 1 << 20
"""Largest size, hidden size, depth or label count a bottleneck config may state."""
BOTTLENECK_KEY = re.compile(
    r"^layers\.(?P<layer>\d+)\.(?P<site>attn|mlp)_adapter\.(?P<proj>down|up)\.(?P<p>weight|bias)$"
)
"""A bottleneck tensor: `layers.{i}.{attn,mlp}_adapter.{down,up}.{weight,bias}`."""


@dataclass
class BottleneckConfig:
    """The content of `bottleneck_config.json`, as adapterdock's trainer writes it."""

    variant: str
    """One of BOTTLENECK_VARIANTS."""
    reduction_factor: int
    """hidden_size // bottleneck_size at training time."""
    bottleneck_size: int
    """Width of each adapter's down projection."""
    non_linearity: str
    """One of BOTTLENECK_ACTIVATIONS."""
    hidden_size: int
    """Hidden size of the base it was trained on."""
    num_layers: int
    """Decoder blocks of the base it was trained on."""
    task_type: str
    """PEFT task type (CAUSAL_LM, SEQ_CLS, TOKEN_CLS)."""
    num_labels: int | None = None
    """Outputs of the task head, if any."""
    adapter_type: str = "bottleneck"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path = BOTTLENECK_CONFIG) -> BottleneckConfig:
        """Build and check a config read from `source`.

        Raises:
            CorruptAdapterError: missing or unknown fields, or values the format does not allow.
        """
        if not isinstance(data, Mapping):
            raise CorruptAdapterError(f"{source} is not a JSON object.", BOTTLENECK_FIX)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        problems = [f"unknown field {k!r}" for k in sorted(set(data) - names)]
        problems += [f"missing field {k!r}" for k in sorted(required - set(data))]
        if problems:
            raise CorruptAdapterError(f"{source}: " + "; ".join(problems) + ".", BOTTLENECK_FIX)
        check_bottleneck_config(data, source)
        return cls(**data)


def bottleneck_problems(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the values every reader of a bottleneck adapter relies on (all of it at once)."""
    variant, activation = config.get("variant"), config.get("non_linearity")
    problems = []
    if variant not in BOTTLENECK_VARIANTS:
        problems.append(f"variant {variant!r} is not houlsby or pfeiffer")
    if activation not in BOTTLENECK_ACTIVATIONS:
        problems.append(f"non_linearity {activation!r} is not one of {', '.join(BOTTLENECK_ACTIVATIONS)}")
    for field in ("bottleneck_size", "reduction_factor", "hidden_size", "num_layers", "num_labels"):
        value = config.get(field)
        optional = field in ("reduction_factor", "num_labels") and value is None
        if not optional and not (_is_int(value) and 1 <= value <= MAX_BOTTLENECK_DIM):
            problems.append(f"{field} {value!r} is not an integer in 1..{MAX_BOTTLENECK_DIM}")
    if not isinstance(config.get("task_type", ""), str):
        problems.append(f"task_type {config.get('task_type')!r} is not a string")
    return problems


def check_bottleneck_config(config: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a bottleneck config with an unknown variant or activation, or a bad size.

    Raises:
        CorruptAdapterError: listing every problem.
    """
    problems = bottleneck_problems(config)
    if problems:
        raise CorruptAdapterError(f"{source}: " + "; ".join(problems) + ".", BOTTLENECK_FIX)


def check_bottleneck_fits(
    config: Mapping[str, Any], hidden_size: int, num_layers: int, source: str, base_name: str = "this base"
) -> None:
    """Refuse a bottleneck adapter made for another hidden size or depth than the base's.

    Args:
        config: the adapter's bottleneck_config.json.
        hidden_size: the base's hidden size.
        num_layers: the base's decoder blocks.
        source: the config file, as the message names it.
        base_name: the base, as the message names it.

    Raises:
        BaseMismatchError: naming both shapes.
    """
    if config.get("hidden_size") != hidden_size or config.get("num_layers") != num_layers:
        raise BaseMismatchError(
            f"{source}: made for hidden size {config.get('hidden_size')} and {config.get('num_layers')} "
            f"layers; {base_name} has {hidden_size} and {num_layers}."
        )


# ---- safetensors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in a safetensors header, validated against the file size."""

    dtype: str
    """safetensors dtype name (one of ADAPTER_DTYPES)."""
    shape: tuple[int, ...]
    begin: int
    """Offset of its first byte in the data section."""
    end: int


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (with `__metadata__`), read without loading tensors.

    Raises:
        CorruptAdapterError: truncated file, a header over MAX_HEADER_BYTES or longer than the file, or
            a header that is not a JSON object.
    """
    return _read_header_json(Path(path))[0]


def _read_header_json(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CorruptAdapterError(f"{path} is {size} bytes, too short for a safetensors file.", REEXPORT)
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CorruptAdapterError(
                f"{path}: the safetensors header claims {length} bytes but the file has {size}; "
                "the file is truncated or damaged.",
                REEXPORT,
            )
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a huge integer, deep nesting
            raise CorruptAdapterError(
                f"{path}: the safetensors header is not valid JSON ({exc}).", REEXPORT
            ) from exc
    if not isinstance(header, dict):
        raise CorruptAdapterError(f"{path}: the safetensors header is not a JSON object.", REEXPORT)
    return header, length


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check an adapter's safetensors header without reading tensor data.

    Returns:
        Tensor name -> info, and the offset where the data section starts.

    Raises:
        CorruptAdapterError: truncated file, absurd header, bad JSON, a dtype other than F32, F16 or
            BF16, or offsets outside the file.
    """
    path = Path(path)
    header, length = _read_header_json(path)
    data_size = path.stat().st_size - 8 - length
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CorruptAdapterError(
            f"{path}: the safetensors header's __metadata__ is not an object of strings.", REEXPORT
        )
    infos = {name: _tensor_info(path, name, meta, data_size) for name, meta in header.items()}
    spans = sorted((info.begin, info.end, name) for name, info in infos.items() if info.end > info.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CorruptAdapterError(
                f"{path}: tensors {first!r} and {second!r} overlap in the data section.", REEXPORT
            )
    return infos, 8 + length


def _tensor_info(path: Path, name: str, meta: Any, data_size: int) -> TensorInfo:
    """One header entry: exactly `dtype` (a string), `shape` (<= MAX_TENSOR_DIMS integers) and
    `data_offsets` (two integers), each of its JSON type (no strings, floats or booleans for numbers)."""
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} has a malformed header entry (it needs exactly dtype, shape and "
            "data_offsets).",
            REEXPORT,
        )
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    problems = []
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(map(_is_int, shape)):
        problems.append(f"shape {_show(shape)} is not a list of at most {MAX_TENSOR_DIMS} integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        problems.append(f"data_offsets {_show(offsets)} is not a list of two integers")
    if problems:
        message = f"{path}: tensor {name!r} has a malformed header entry: " + "; ".join(problems) + "."
        raise CorruptAdapterError(message, REEXPORT)
    shape, (begin, end) = tuple(shape), offsets
    if not isinstance(dtype, str) or dtype not in ADAPTER_DTYPES:
        shown = dtype if isinstance(dtype, str) else _show(dtype)
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} has dtype {shown}; adapter weights must be F32, F16 or BF16.", REEXPORT
        )
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} spans bytes {begin}..{end} but the data section has {data_size}; "
            "the file is truncated or damaged.",
            REEXPORT,
        )
    needed = math.prod(shape) * ADAPTER_DTYPES[dtype]
    if end - begin != needed:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} of shape {list(shape)} ({dtype}) needs {needed} bytes, "
            f"its header gives {end - begin}.",
            REEXPORT,
        )
    return TensorInfo(dtype=dtype, shape=shape, begin=begin, end=end)


# ---- folders and configs ----------------------------------------------------------------------------
def refuse_pickles(folder: Path) -> None:
    """Refuse a folder holding any file whose suffix marks a pickle (anywhere below it, any case).

    Raises:
        CorruptAdapterError: naming the pickle files.
    """
    folder = Path(folder)
    pickles = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise CorruptAdapterError(
            f"{folder} holds pickle file(s) {', '.join(pickles)}; adapterdock never loads pickles "
            "(safetensors only).",
            "Re-save with save_pretrained(..., safe_serialization=True), remove the pickle files, "
            "then register again.",
        )


def load_config(path: Path) -> dict[str, Any]:
    """Read an adapter's JSON config (`adapter_config.json`, `bottleneck_config.json`).

    Raises:
        CorruptAdapterError: missing, unreadable, over MAX_CONFIG_BYTES, or not a JSON object.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise CorruptAdapterError(f"{path} is missing.", REEXPORT) from exc
    except OSError as exc:
        raise CorruptAdapterError(f"{path} is not readable: {exc}.", REEXPORT) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise CorruptAdapterError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes.", REEXPORT)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a huge integer, deep nesting
        raise CorruptAdapterError(f"{path} is not readable JSON: {exc}.", REEXPORT) from exc
    if not isinstance(data, dict):
        raise CorruptAdapterError(f"{path} is not a JSON object.", REEXPORT)
    return data


def weights_file(folder: Path) -> Path:
    """The folder's `adapter_model.safetensors`.

    Raises:
        CorruptAdapterError: it is absent (a pickled `.bin` does not count).
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CorruptAdapterError(f"{folder} has no {WEIGHTS_FILE}.", SAFE_SAVE)
    return path


def check_peft_type(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a PEFT config that is not a LoRA (`peft_type` absent counts as LORA).

    Raises:
        CorruptAdapterError: naming the type.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise CorruptAdapterError(
            f"{path}: PEFT type {config.get('peft_type')!r} is not supported; adapterdock serves LoRA "
            "adapters.",
            "Train a LoRA (or QLoRA) adapter.",
        )


def check_peft_options(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a PEFT config that is not a plain LoRA the server can apply exactly.

    Raises:
        CorruptAdapterError: another PEFT type, or listing every unsupported option used.
    """
    check_peft_type(path, config)
    check_peft_config(path, config)
    used = [label for key, label in UNSUPPORTED_PEFT.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    extra = [m for m in config.get("modules_to_save") or [] if m not in HEAD_MODULES]
    if extra:
        used.append(f"modules_to_save {extra}")
    if used:
        raise CorruptAdapterError(
            f"{path}: the server does not implement {', '.join(used)}.",
            "Retrain with plain LoRA options (no DoRA, bias='none', only the task head in modules_to_save).",
        )


def check_peft_config(path: Path, config: Mapping[str, Any]) -> None:
    """Check the type and range of every field of an adapter_config.json that adapterdock reads or refuses.

    `r` is an integer in 1..MAX_LORA_RANK, `lora_alpha` a finite number in (0, MAX_LORA_ALPHA];
    `rank_pattern` / `alpha_pattern` map module-path keys (PATTERN_KEY, at most MAX_PATTERN_KEY characters,
    MAX_PATTERN_ENTRIES entries) to such values; flags are booleans, names strings; no value is nested
    deeper than MAX_CONFIG_DEPTH.

    Raises:
        CorruptAdapterError: naming the file and every bad field.
    """
    checked = [(name, check) for name, check in _PEFT_FIELDS.items() if name in config]
    problems = [problem for name, check in checked for problem in check(name, config[name])]
    deep = [name for name, value in config.items() if _depth(value) > MAX_CONFIG_DEPTH]
    problems += [f"field {name!r} is nested deeper than {MAX_CONFIG_DEPTH} levels" for name in deep]
    if problems:
        remedy = PATTERN_FIX if any("pattern" in p for p in problems) else REEXPORT
        raise CorruptAdapterError(f"{path}: " + "; ".join(problems) + ".", remedy)


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of a JSON value (a scalar is 0), stopping once past MAX_CONFIG_DEPTH."""
    if level > MAX_CONFIG_DEPTH or not isinstance(value, dict | list):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rank_problems(field: str, value: Any) -> list[str]:
    if _is_int(value) and 1 <= value <= MAX_LORA_RANK:
        return []
    return [f"field {field!r} is {_show(value)}, not an integer in 1..{MAX_LORA_RANK}"]


def _alpha_problems(field: str, value: Any) -> list[str]:
    if _is_number(value) and 0 < value <= MAX_LORA_ALPHA:
        return []
    return [f"field {field!r} is {_show(value)}, not a finite number in (0, {MAX_LORA_ALPHA:g}]"]


def _pattern_checker(check_value):
    """A checker of `rank_pattern` / `alpha_pattern`: an object of module-path keys to `check_value`s."""

    def check(field: str, value: Any) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, dict):
            return [f"field {field!r} is {_show(value)}, not an object of module paths to values"]
        if len(value) > MAX_PATTERN_ENTRIES:
            return [f"field {field!r} has {len(value)} entries, more than {MAX_PATTERN_ENTRIES}"]
        problems = []
        for key, item in value.items():
            if len(key) > MAX_PATTERN_KEY or not PATTERN_KEY.fullmatch(key):
                problems.append(f"{field} key {_show(key)} is not a module path of at most {MAX_PATTERN_KEY} "
                                "characters (letters, digits, _ and .)")  # fmt: skip
            problems += check_value(f"{field}[{key[:60]!r}]", item)
        return problems

    return check


def _typed(*types: type, none: bool = True, items: type | None = None):
    """A checker that `value` is one of `types` (or null), and a list's items of type `items`."""

    def check(field: str, value: Any) -> list[str]:
        if value is None and none:
            return []
        allowed = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if allowed and isinstance(value, list) and items is not None:
            allowed = all(isinstance(v, items) and not isinstance(v, bool) or items is bool for v in value)
        if allowed:
            return []
        names = " or ".join(t.__name__ for t in types) + (f" of {items.__name__}" if items else "")
        return [f"field {field!r} is {_show(value)}, not {names}"]

    return check


def _show(value: Any) -> str:
    """A value as a message quotes it: its JSON type, and its text cut to 60 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


_PEFT_FIELDS = {
    "r": _rank_problems,
    "lora_alpha": _alpha_problems,
    "rank_pattern": _pattern_checker(_rank_problems),
    "alpha_pattern": _pattern_checker(_alpha_problems),
    "lora_dropout": _typed(int, float),
    "peft_type": _typed(str),
    "task_type": _typed(str),
    "bias": _typed(str),
    "base_model_name_or_path": _typed(str),
    "use_rslora": _typed(bool),
    "inference_mode": _typed(bool),
    "target_modules": _typed(str, list, items=str),
    "modules_to_save": _typed(list, items=str),
    "layers_to_transform": _typed(int, list, items=int),
}
"""Field -> checker returning its problems; fields not listed may hold anything not nested too deep."""


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: float) -> float:
    r"""PEFT's `rank_pattern` / `alpha_pattern` lookup, without regular expressions.

    PEFT takes the first key (in file order) for which `re.match(rf"(.*\.)?({key})$", module)` holds.
    Keys are checked by `check_peft_config` to be module paths (letters, digits, `_`, `.` or `\.`), in which
    only `.` is special to a regex (any one character); this compares such a key with the one end of `module`
    that has its length and starts at a dot boundary, so the cost is linear in the key whatever it holds
    (a regex could freeze the process: Python's `re` holds the GIL). Keys of other characters never match.
    """
    for key, value in (pattern or {}).items():
        if _key_matches(key, module):
            return float(value)
    return default


def _key_matches(key: str, module: str) -> bool:
    if not PATTERN_KEY.fullmatch(key):
        return False
    units = re.findall(r"\\\.|.", key)  # `\.` is a dot, `.` any one character, the rest themselves
    start = len(module) - len(units)
    if start < 0 or (start > 0 and module[start - 1] != "."):
        return False
    pairs = zip(units, module[start:], strict=True)
    return all(u == m or u == "." or (u == "\\." and m == ".") for u, m in pairs)


# ---- base -------------------------------------------------------------------------------------------
def check_base(
    subject: str,
    trained_on: BaseSpec,
    expected: BaseSpec,
    *,
    expected_as: str = "",
    remedy: str | None = None,
    outcome: str = "",
) -> None:
    """Refuse an adapter trained on another base than `expected`; bases are compared by fingerprint.

    Args:
        subject: what is checked, as the message names it (`chat@3`, `--from sft@1`).
        trained_on: the base its manifest records.
        expected: the base it is about to meet.
        expected_as: how the message introduces `expected` ("the served base ", "this run's base ").
        remedy: how to fix it (default: use the base the adapter was trained on).
        outcome: what did not happen, appended to the message ("Nothing was registered.").

    Raises:
        BaseMismatchError: the fingerprints differ.
    """
    if trained_on.fingerprint == expected.fingerprint:
        return
    message = (
        f"{subject} was trained on base {trained_on.name_or_path} ({trained_on.fingerprint[:19]}), "
        f"not on {expected_as}{expected.name_or_path} ({expected.fingerprint[:19]})."
    )
    raise BaseMismatchError(f"{message} {outcome}".strip(), remedy)
