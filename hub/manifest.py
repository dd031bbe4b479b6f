"""The manifest: what an adapter version is, written as `manifest.json` beside its files.

Boundary: this is the contract between training and serving. Trainers write it (through the store), the server
and the hub read it. Validation collects every problem into one `ManifestError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hub.errors import ManifestError
from hub.ref import validate_name

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TASKS = ("classification", "ner", "instruction", "reward", "dpo", "ppo")
GENERATION_TASKS = ("instruction", "dpo", "ppo")
METHODS = ("lora", "qlora", "dora", "qdora", "bottleneck", "full")
KINDS = ("adapter", "model")
ADAPTER_FORMATS = ("peft", "bottleneck", "hf-model")


@dataclass(frozen=True)
class BaseSpec:
    """The base model an adapter was trained on: how it was named, and the fingerprint of its weights."""

    name_or_path: str
    fingerprint: str


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass
class Manifest:
    """Everything needed to find, verify, serve and reproduce one adapter version."""

    name: str
    version: int
    task: str
    method: str
    base: BaseSpec
    labels: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    created_at: str = ""
    trainer: dict[str, Any] = field(default_factory=dict)
    kind: str = "adapter"
    adapter_format: str = "peft"
    quantization: dict[str, Any] | None = None
    description: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def ref(self) -> str:
        """The immutable reference `name@version`."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> Manifest:
        """Build and validate a manifest from parsed JSON.

        Raises:
            ManifestError: listing every problem found, not only the first.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        problems: list[str] = []
        for key in ("name", "version", "task", "method", "base"):
            if key not in data:
                problems.append(f"missing key {key!r}")
        if problems:
            raise ManifestError(f"{source}: " + "; ".join(problems) + ".")
        base = data["base"]
        if not isinstance(base, dict) or not {"name_or_path", "fingerprint"} <= base.keys():
            problems.append("'base' must be an object with 'name_or_path' and 'fingerprint'")
            base = {"name_or_path": "", "fingerprint": ""}
        files: dict[str, FileEntry] = {}
        raw_files = data.get("files", {})
        if not isinstance(raw_files, dict):
            problems.append("'files' must be an object")
            raw_files = {}
        for fname, entry in raw_files.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                problems.append(f"file {fname!r} lacks a sha256")
                continue
            files[fname] = FileEntry(sha256=entry["sha256"], size=int(entry.get("size", -1)))
        known = {f for f in cls.__dataclass_fields__} - {"base", "files"}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            manifest = cls(
                base=BaseSpec(str(base["name_or_path"]), str(base["fingerprint"])), files=files, **kwargs
            )
        except TypeError as exc:
            raise ManifestError(f"{source}: {exc}.") from exc
        problems.extend(manifest.problems())
        if problems:
            raise ManifestError(f"{source}: " + "; ".join(problems) + ".")
        return manifest

    def problems(self) -> list[str]:
        """Every rule this manifest breaks (empty when valid)."""
        problems: list[str] = []
        try:
            validate_name(self.name)
        except ValueError as exc:
            problems.append(str(exc))
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            problems.append(f"version must be a non-negative integer, got {self.version!r}")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.adapter_format not in ADAPTER_FORMATS:
            problems.append(f"adapter_format {self.adapter_format!r} is not one of {ADAPTER_FORMATS}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            problems.append("labels must be a list of strings")
        if self.task in ("classification", "ner") and not self.labels:
            problems.append(f"a {self.task} adapter needs its labels")
        if self.format_version > FORMAT_VERSION:
            problems.append(
                f"format_version {self.format_version} is newer than this adapterdock ({FORMAT_VERSION}); "
                "upgrade adapterdock"
            )
        return problems

    def save(self, folder: Path) -> Path:
        """Write `manifest.json` into `folder` and return its path."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder_or_file: Path | str) -> Manifest:
        """Read and validate `manifest.json` from a version folder (or the file itself).

        Raises:
            ManifestError: if it is missing, not JSON, or invalid.
        """
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"No manifest at {path}.") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path} is not a readable JSON manifest: {exc}.") from exc
        return cls.from_dict(data, source=str(path))


def utc_now() -> str:
    """The current time as ISO-8601 UTC with a Z suffix, as manifests record it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
