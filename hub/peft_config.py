"""PEFT LoRA folders as adapterdock reads them: tensor names, `adapter_config.json` fields and options.

- the tensor-name patterns (`LORA_KEY`, `HEAD_KEY`) and `peft_type` (`check_peft_type`);
- every field's type and range (`check_peft_config`: `r`, `lora_alpha`, `rank_pattern`/`alpha_pattern` and
  their keys, no nesting where none is expected), all problems reported at once;
- the options adapterdock does not apply (`check_peft_options`, `UNSUPPORTED_PEFT`); DoRA (`use_dora`) it
  applies (its `lora_magnitude_vector` tensors, `is_dora`), other engines may not (`hub.vllm_resolver`);
- PEFT's `rank_pattern` / `alpha_pattern` lookup at a bounded cost, without regular expressions
  (`pattern_value`).

Boundary: json-decoded values only (reading the file is `hub.adapter_format.load_config`'s); no torch. Every
problem is a `CorruptAdapterError` that names the file and the remedy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hub.adapter_format import REEXPORT, describe_value, is_int
from hub.errors import CorruptAdapterError

LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?:(?P<part>A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight"
    r"|(?P<part_m>magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$"
)
"""A PEFT LoRA tensor: `module` is the wrapped layer's path, `part` A or B (`lora_part` gives DoRA's
`magnitude_vector`, saved with or without `.weight` by PEFT's versions); others are refused."""


def lora_part(match: re.Match[str]) -> str:
    """The part a `LORA_KEY` match names: A, B, embedding_A, embedding_B or magnitude_vector."""
    return match["part"] or match["part_m"]


HEAD_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:score|classifier)(?:\.modules_to_save\.[^.]+)?\.(?P<p>weight|bias)$"
)
"""The task head (`score`, saved through modules_to_save) of a classification, NER or reward adapter."""
HEAD_MODULES = ("score", "classifier")
UNSUPPORTED_PEFT = {
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
            "Retrain with plain LoRA or DoRA options (bias='none', only the task head in modules_to_save).",
        )


def is_dora(config: Mapping[str, Any]) -> bool:
    """Whether a (checked) adapter_config.json is DoRA: LoRA factors plus one magnitude per output feature."""
    return config.get("use_dora") is True


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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rank_problems(field: str, value: Any) -> list[str]:
    if is_int(value) and 1 <= value <= MAX_LORA_RANK:
        return []
    return [f"field {field!r} is {describe_value(value)}, not an integer in 1..{MAX_LORA_RANK}"]


def _alpha_problems(field: str, value: Any) -> list[str]:
    if _is_number(value) and 0 < value <= MAX_LORA_ALPHA:
        return []
    return [f"field {field!r} is {describe_value(value)}, not a finite number in (0, {MAX_LORA_ALPHA:g}]"]


def _pattern_checker(check_value):
    """A checker of `rank_pattern` / `alpha_pattern`: an object of module-path keys to `check_value`s."""

    def check(field: str, value: Any) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, dict):
            return [f"field {field!r} is {describe_value(value)}, not an object of module paths to values"]
        if len(value) > MAX_PATTERN_ENTRIES:
            return [f"field {field!r} has {len(value)} entries, more than {MAX_PATTERN_ENTRIES}"]
        problems = []
        for key, item in value.items():
            if len(key) > MAX_PATTERN_KEY or not PATTERN_KEY.fullmatch(key):
                shown = describe_value(key)
                problems.append(f"{field} key {shown} is not a module path of at most {MAX_PATTERN_KEY} "
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
        return [f"field {field!r} is {describe_value(value)}, not {names}"]

    return check


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
    "use_dora": _typed(bool),
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
