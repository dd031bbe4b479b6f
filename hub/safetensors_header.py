"""safetensors headers, parsed from the raw bytes with one set of limits, without loading a tensor.

`read_safetensors_header` reads any file's header (bases too, with `__metadata__`); `read_header` reads an
adapter's weights file and checks every tensor entry (dtype, shape, offsets) against the file size before
anything is allocated, returning a `TensorInfo` per tensor.

Boundary: json, math and struct only; no torch, no numpy. What the tensors' names mean (PEFT, bottleneck) is
`hub.peft_config`'s and `hub.bottleneck_format`'s; turning the bytes into weights is the server's
(`server.adapter_weights`). Every problem is a `CorruptAdapterError` naming the file and the remedy.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.adapter_format import REEXPORT, describe_value, is_int
from hub.errors import CorruptAdapterError

MAX_HEADER_BYTES = 64 << 20
"""Largest safetensors JSON header accepted (real headers are kilobytes to a few MiB)."""
MAX_TENSOR_DIMS = 8
"""Most dimensions a tensor of an adapter may have (LoRA factors and heads have one or two)."""
ADAPTER_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
"""safetensors dtype name -> item size, for the dtypes adapter weights may have."""


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
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(map(is_int, shape)):
        problems.append(f"shape {describe_value(shape)} is not a list of at most {MAX_TENSOR_DIMS} integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets)):
        problems.append(f"data_offsets {describe_value(offsets)} is not a list of two integers")
    if problems:
        message = f"{path}: tensor {name!r} has a malformed header entry: " + "; ".join(problems) + "."
        raise CorruptAdapterError(message, REEXPORT)
    shape, (begin, end) = tuple(shape), offsets
    if not isinstance(dtype, str) or dtype not in ADAPTER_DTYPES:
        shown = dtype if isinstance(dtype, str) else describe_value(dtype)
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
