"""The adapter folder: what it holds, how its config is read, what is refused, which base it meets.

The on-disk adapter format is owned by this module and three beside it, one concern each:
- here: the folder's file names and kind (`detect_adapter_format`), reading its JSON config (`load_config`,
  size-capped), its weights file, pickle refusal (adapterdock never unpickles), `check_base` (an adapter meets
  the base it was trained on, same fingerprint, else `BaseMismatchError`), and the remedies and JSON-value
  tests the other three share;
- `hub.safetensors_header`: safetensors headers parsed with one set of limits, every tensor entry checked;
- `hub.peft_config`: PEFT LoRA tensor names, `adapter_config.json` fields, refused options, pattern keys;
- `hub.bottleneck_format`: the `bottleneck_config.json` schema, its variants and activations.

Boundary: json only; no torch, no numpy. Training (`trainers`) and serving (`server`) meet in this format as
data and both take its rules from these modules; turning checked tensors into weights is theirs. Every
problem is a `CorruptAdapterError` or `BaseMismatchError` that names the file and the remedy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hub.errors import BaseMismatchError, CorruptAdapterError
from hub.manifest import BaseSpec

ADAPTER_CONFIG = "adapter_config.json"
BOTTLENECK_CONFIG = "bottleneck_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
"""Largest adapter_config.json / bottleneck_config.json read (real ones are about a kilobyte)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REEXPORT = "Re-export it with save_pretrained(..., safe_serialization=True) from the training run."
SAFE_SAVE = "Save with save_pretrained(..., safe_serialization=True); pickled .bin files are refused."


def detect_adapter_format(folder: Path) -> str:
    """Tell PEFT, bottleneck and full-model folders apart by their config file."""
    if (folder / ADAPTER_CONFIG).is_file():
        return "peft"
    if (folder / BOTTLENECK_CONFIG).is_file():
        return "bottleneck"
    if (folder / "config.json").is_file():
        return "hf-model"
    raise CorruptAdapterError(
        f"{folder} holds no adapter_config.json, bottleneck_config.json or config.json.",
        "Point at a folder written by PEFT's save_pretrained, an adapterdock trainer, or a HF model folder.",
    )


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


def is_int(value: Any) -> bool:
    """An integer as JSON means one (a boolean is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def describe_value(value: Any) -> str:
    """A value as a message quotes it: its JSON type, and its text cut to 60 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


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
