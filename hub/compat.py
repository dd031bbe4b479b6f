"""Does an adapter folder fit a base? Tensor names and shapes checked from safetensors headers alone.

Boundary: reads headers and JSON configs only (no torch, no tensors loaded), so `hub import` and the hub
service can refuse an adapter made for another architecture before anything is allocated. The format's
rules (header parsing, tensor names, PEFT type, bottleneck fields) come from `hub.adapter_format` and
the modules beside it (`hub.safetensors_header`, `hub.peft_config`, `hub.bottleneck_format`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.adapter_format import ADAPTER_CONFIG, BOTTLENECK_CONFIG, load_config, weights_file
from hub.bottleneck_format import check_bottleneck_fits
from hub.errors import BaseMismatchError
from hub.peft_config import LORA_KEY, check_peft_type
from hub.safetensors_header import read_header, read_safetensors_header


def _base_shapes(base_path: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in sorted(base_path.glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            if key != "__metadata__":
                shapes[key] = list(meta["shape"])
    return shapes


def check_peft_fits_base(folder: Path, base_path: Path) -> dict[str, Any]:
    """Check every LoRA tensor of a PEFT folder against the base's layer shapes.

    Returns:
        The adapter's config (adapter_config.json) for the caller's use.

    Raises:
        CorruptAdapterError: unreadable or unsupported files. BaseMismatchError: a tensor that does not fit.
    """
    config = load_config(folder / ADAPTER_CONFIG)
    check_peft_type(folder / ADAPTER_CONFIG, config)
    infos, _ = read_header(weights_file(folder))
    base = _base_shapes(base_path)
    rank = int(config.get("r", 0))
    problems: list[str] = []
    for key, info in infos.items():
        match = LORA_KEY.match(key)
        if not match or match["part"] not in ("A", "B"):
            continue
        base_key = f"{match['module']}.weight"
        if base_key not in base:
            problems.append(f"{key}: the base has no layer {base_key}")
            continue
        out_features, in_features = base[base_key][0], base[base_key][-1]
        expected = [rank, in_features] if match["part"] == "A" else [out_features, rank]
        if list(info.shape) != expected:
            problems.append(f"{key}: shape {list(info.shape)}, the base needs {expected}")
    if problems:
        raise BaseMismatchError(
            f"{folder} does not fit base {base_path}: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ".",
        )
    return config


def check_bottleneck_fits_base(folder: Path, base_path: Path) -> dict[str, Any]:
    """Check a bottleneck adapter's hidden size and layer count against the base's config.

    Raises:
        CorruptAdapterError: unreadable configs. BaseMismatchError: another hidden size or depth.
    """
    config = load_config(folder / BOTTLENECK_CONFIG)
    base_config = load_config(base_path / "config.json")
    check_bottleneck_fits(
        config,
        base_config.get("hidden_size"),
        base_config.get("num_hidden_layers"),
        str(folder / BOTTLENECK_CONFIG),
        base_name=f"base {base_path}",
    )
    return config


def check_fits_base(folder: Path, base_path: Path, adapter_format: str) -> dict[str, Any]:
    """Dispatch to the check for `adapter_format` (peft, bottleneck); full models need none."""
    if adapter_format == "peft":
        return check_peft_fits_base(folder, base_path)
    if adapter_format == "bottleneck":
        return check_bottleneck_fits_base(folder, base_path)
    return {}
