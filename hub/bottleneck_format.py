"""Bottleneck adapter folders: the `bottleneck_config.json` schema, variants, activations, tensor names.

`BottleneckConfig` is the file as adapterdock's trainer writes it; `check_bottleneck_config` refuses unknown
variants, activations or sizes (all problems at once); `check_bottleneck_fits` refuses an adapter made for
another hidden size or depth than the base's.

Boundary: json-decoded values only (reading the file is `hub.adapter_format.load_config`'s); no torch. The
modules themselves are `trainers.methods.bottleneck`'s, applying them the server's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from hub.adapter_format import BOTTLENECK_CONFIG, is_int
from hub.errors import BaseMismatchError, CorruptAdapterError

BOTTLENECK_FIX = "Re-export the bottleneck adapter with adapterdock's trainer (see docs/training.md)."
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
        if not optional and not (is_int(value) and 1 <= value <= MAX_BOTTLENECK_DIM):
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
