"""The on-disk adapter format, owned in one place: what an adapter folder may hold and what is refused.

- safetensors headers, parsed from the raw bytes with one set of limits: `read_safetensors_header` for
  any file (bases too), `read_header` for adapter weights, whose every tensor entry is checked against
  the file size before anything is allocated;
- PEFT LoRA folders: the tensor-name patterns, `peft_type`, and the options adapterdock does not apply;
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

# ---- bottleneck -------------------------------------------------------------------------------------
BOTTLENECK_VARIANTS = ("houlsby", "pfeiffer")
"""houlsby: after attention and MLP; pfeiffer: after the MLP only."""
BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "silu")
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
    size = config.get("bottleneck_size")
    problems = []
    if variant not in BOTTLENECK_VARIANTS:
        problems.append(f"variant {variant!r} is not houlsby or pfeiffer")
    if activation not in BOTTLENECK_ACTIVATIONS:
        problems.append(f"non_linearity {activation!r} is not one of {', '.join(BOTTLENECK_ACTIVATIONS)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append(f"bottleneck_size {size!r} is not a positive integer")
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
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    header.pop("__metadata__", None)
    infos = {name: _tensor_info(path, name, meta, data_size) for name, meta in header.items()}
    return infos, 8 + length


def _tensor_info(path: Path, name: str, meta: Any, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptAdapterError(f"{path}: tensor {name!r} has a malformed header entry.", REEXPORT) from exc
    if dtype not in ADAPTER_DTYPES:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} has dtype {dtype}; adapter weights must be F32, F16 or BF16.", REEXPORT
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
        CorruptAdapterError: missing, unreadable, or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptAdapterError(f"{path} is missing.", REEXPORT) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: float) -> float:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key (a regex) matching the path's end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return default


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
