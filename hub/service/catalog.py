"""What a repo says about itself: its model card (YAML front matter + text) and its adapterdock manifest.

Boundary: reads blobs through `Storage` and parses them; used by repo info (tags, cardData) and by browsing.
Never raises for a malformed card or manifest: a repo that is not an adapter is simply not listed as one.
Card metadata is untrusted: the front matter is at most `MAX_FRONT_MATTER_BYTES`, YAML aliases are refused
(an alias bomb expands exponentially when the metadata is serialized), and nesting and node counts are
bounded; metadata over a limit is dropped (logged), the card body is kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from hub.errors import ManifestError
from hub.manifest import MANIFEST_FILE, Manifest
from hub.service.errors import CorruptBlobError
from hub.service.records import FileRecord
from hub.service.storage import Storage

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
MAX_CARD_BYTES = 256 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FRONT_MATTER_BYTES = 64 * 1024
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases, with at most MAX_YAML_NODES nodes nested MAX_YAML_DEPTH deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ValueError("the card's YAML front matter uses an alias (*name); aliases are not accepted")
        self._nodes += 1
        self._depth += 1
        try:
            if self._nodes > MAX_YAML_NODES or self._depth > MAX_YAML_DEPTH:
                raise ValueError(
                    f"the card's YAML front matter has over {MAX_YAML_NODES} nodes or is nested over "
                    f"{MAX_YAML_DEPTH} deep"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_metadata(text: str) -> Any:
    """Parse card front matter under the limits above.

    Raises:
        ValueError: over a limit, or an alias. yaml.YAMLError: not YAML.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_FRONT_MATTER_BYTES:
        raise ValueError(f"the card's YAML front matter is over {MAX_FRONT_MATTER_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Split a model card into its YAML metadata (a dict, maybe empty) and its body.

    Raises:
        ValueError: the front matter is not valid YAML or not a mapping.
    """
    if not text.startswith("---"):
        return {}, text
    lines = text.splitlines(keepends=True)
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            meta = load_metadata("".join(lines[1:end])) or {}
            if not isinstance(meta, dict):
                raise ValueError("the card's YAML front matter is not a mapping")
            return meta, "".join(lines[end + 1 :])
    raise ValueError("the card's YAML front matter is not closed by '---'")


def read_small(storage: Storage, record: FileRecord, limit: int) -> bytes | None:
    """The bytes of a small verified file, or None when it is too big or its blob is corrupt."""
    if record.size > limit:
        return None
    try:
        return storage.verify_blob(record.sha256, record.size, record.path).read_bytes()
    except CorruptBlobError as exc:
        logger.error("%s", exc)
        return None


@dataclass(frozen=True)
class RepoCard:
    """A commit's card metadata, card body and adapterdock manifest (each possibly empty)."""

    meta: dict[str, Any]
    body: str
    manifest: Manifest | None


def read_card(storage: Storage, files: dict[str, FileRecord]) -> RepoCard:
    """Parse README.md and manifest.json from a commit's file list, tolerating their absence or damage."""
    meta: dict[str, Any] = {}
    body = ""
    if CARD_FILE in files:
        raw = read_small(storage, files[CARD_FILE], MAX_CARD_BYTES)
        if raw is not None:
            text = raw.decode("utf-8", errors="replace")
            try:
                meta, body = split_front_matter(text)
            except (ValueError, yaml.YAMLError, RecursionError) as exc:
                logger.warning("ignoring the card metadata of a repo: %s", str(exc)[:200])
                body = text
    manifest = None
    if MANIFEST_FILE in files:
        raw = read_small(storage, files[MANIFEST_FILE], MAX_MANIFEST_BYTES)
        if raw is not None:
            try:
                manifest = Manifest.from_dict(json.loads(raw), source=MANIFEST_FILE)
                json.dumps(manifest.to_dict(), allow_nan=False)  # what the listings will send
            except (ManifestError, ValueError, TypeError, AttributeError, RecursionError) as exc:
                logger.warning("ignoring an invalid manifest.json: %s", exc)
    return RepoCard(meta=meta, body=body, manifest=manifest)


def repo_tags(card: RepoCard) -> list[str]:
    """The tags HF would show: the card's `tags` plus library, task and method of the manifest."""
    tags: list[str] = []
    raw = card.meta.get("tags") or []
    for tag in raw if isinstance(raw, list) else [raw]:
        tags.append(str(tag))
    library = card.meta.get("library_name")
    if library:
        tags.append(str(library))
    if card.manifest is not None:
        tags.extend(["adapterdock", card.manifest.task, card.manifest.method])
    return list(dict.fromkeys(tags))


def adapter_summary(repo_id: str, sha: str, private: bool, manifest: Manifest) -> dict[str, Any]:
    """The JSON `GET /api/adapters` returns for one repo."""
    return {
        "repo_id": repo_id,
        "sha": sha,
        "private": private,
        "name": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "method": manifest.method,
        "kind": manifest.kind,
        "adapter_format": manifest.adapter_format,
        "base": {"name_or_path": manifest.base.name_or_path, "fingerprint": manifest.base.fingerprint},
        "labels": manifest.labels,
        "metrics": manifest.metrics,
        "quantization": manifest.quantization,
        "description": manifest.description,
        "created_at": manifest.created_at,
    }
