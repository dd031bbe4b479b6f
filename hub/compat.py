"""Does an adapter folder fit a base? Tensor names and shapes checked from safetensors headers alone.

Boundary: reads headers and JSON configs only (no torch, no tensors loaded), so `hub import` and the hub
service can refuse an adapter made for another architecture before anything is allocated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hub.bases import read_safetensors_header
from hub.errors import BaseMismatchError, CorruptAdapterError

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def _base_shapes(base_path: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in sorted(base_path.glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            if key != "__metadata__":
                shapes[key] = list(meta["shape"])
    return shapes


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptAdapterError(f"{path} is not readable JSON: {exc}.") from exc


def check_peft_fits_base(folder: Path, base_path: Path) -> dict[str, Any]:
    """Check every LoRA tensor of a PEFT folder against the base's layer shapes.

    Returns:
        The adapter's config (adapter_config.json) for the caller's use.

    Raises:
        CorruptAdapterError: unreadable or unsupported files. BaseMismatchError: a tensor that does not fit.
    """
    config = _load_json(folder / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise CorruptAdapterError(
            f"{folder}: PEFT type {config.get('peft_type')!r} is not supported; adapterdock serves LoRA.",
            "Train a LoRA adapter (QLoRA-trained LoRA is fine).",
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CorruptAdapterError(
            f"{folder} has no adapter_model.safetensors.",
            "Save with save_pretrained(..., safe_serialization=True); pickled .bin files are refused.",
        )
    base = _base_shapes(base_path)
    rank = int(config.get("r", 0))
    problems: list[str] = []
    for key, meta in read_safetensors_header(weights).items():
        match = _LORA_KEY.match(key)
        if key == "__metadata__" or not match:
            continue
        base_key = f"{match['module']}.weight"
        if base_key not in base:
            problems.append(f"{key}: the base has no layer {base_key}")
            continue
        out_features, in_features = base[base_key][0], base[base_key][-1]
        expected = [rank, in_features] if match["part"] == "A" else [out_features, rank]
        if list(meta["shape"]) != expected:
            problems.append(f"{key}: shape {meta['shape']}, the base needs {expected}")
    if problems:
        raise BaseMismatchError(
            f"{folder} does not fit base {base_path}: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ".",
        )
    return config


def check_bottleneck_fits_base(folder: Path, base_path: Path) -> dict[str, Any]:
    """Check a bottleneck adapter's hidden size and layer count against the base's config."""
    config = _load_json(folder / "bottleneck_config.json")
    base_config = _load_json(base_path / "config.json")
    problems = [
        f"{key} is {config.get(key)}, the base has {base_config.get(key)}"
        for key in ("hidden_size", "num_layers" if "num_layers" in config else "hidden_size")
        if config.get(key) != base_config.get("num_hidden_layers" if key == "num_layers" else key)
    ]
    if problems:
        raise BaseMismatchError(f"{folder} does not fit base {base_path}: " + "; ".join(problems) + ".")
    return config


def check_fits_base(folder: Path, base_path: Path, adapter_format: str) -> dict[str, Any]:
    """Dispatch to the check for `adapter_format` (peft, bottleneck); full models need none."""
    if adapter_format == "peft":
        return check_peft_fits_base(folder, base_path)
    if adapter_format == "bottleneck":
        return check_bottleneck_fits_base(folder, base_path)
    return {}
