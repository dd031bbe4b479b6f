"""The local registry: versioned, checksummed adapter folders under one root (default `./adapters`).

Layout: `<root>/<name>/<version>/` holds the adapter files, `manifest.json` and a `README.md` card;
`<root>/<name>/tags.json` maps movable tags to versions (`latest` is always the highest version);
`<root>/<name>/routes.json` (optional) splits a tag's traffic between versions by weight (`hub.traffic`).
Boundary: files and manifests only. Writes are atomic: a version is built in `<root>/.staging/`, checked,
fsynced, then renamed into place under a per-name lock, so readers never see a partial version and
concurrent writers get distinct versions. What one version folder holds (file entries, checks, card) is
`hub.version_folder`'s; fsync and atomic writes are `hub.durable`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hub.adapter_format import detect_adapter_format, refuse_pickles
from hub.durable import fsync_dir, fsync_tree, make_dirs, write_atomic
from hub.errors import (
    AdapterNotFoundError,
    CorruptAdapterError,
    InvalidReferenceError,
    ManifestError,
    RegistryError,
)
from hub.manifest import MANIFEST_FILE, BaseSpec, Manifest, utc_now
from hub.ref import AdapterRef, validate_name, validate_tag
from hub.traffic import TrafficSplit, read_routes, write_routes
from hub.version_folder import copy_files, file_entry, render_card, verify_files

logger = logging.getLogger(__name__)

REGISTRY_ENV = "ADAPTERDOCK_REGISTRY"
DEFAULT_REGISTRY = "adapters"
STAGING = ".staging"
TAGS_FILE = "tags.json"
COUNTER_FILE = ".next_version"
_STALE_STAGING_SECONDS = 3600


@dataclass(frozen=True)
class StoredAdapter:
    """A registered version: its folder and its manifest."""

    path: Path
    manifest: Manifest


def default_registry_root() -> Path:
    """The registry root: `$ADAPTERDOCK_REGISTRY`, else `./adapters`."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


class LocalStore:
    """A versioned, checksummed registry of adapters in one folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry_root()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ---- paths and locking -------------------------------------------------------------------
    def _name_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the per-name lock (across threads and processes) and yield the name's folder."""
        name_dir = self._name_dir(name)
        try:
            make_dirs(name_dir)
            handle = open(name_dir / ".lock", "a+")
        except OSError as exc:
            raise RegistryError(f"Cannot write to registry {self.root}: {exc}.") from exc
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield name_dir
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _staging_dir(self) -> Path:
        staging = self.root / STAGING
        try:
            make_dirs(staging)
        except OSError as exc:
            raise RegistryError(f"Cannot write to registry {self.root}: {exc}.") from exc
        now = time.time()
        for stale in staging.iterdir():
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > _STALE_STAGING_SECONDS:
                    shutil.rmtree(stale, ignore_errors=True)
        path = staging / f"{uuid.uuid4().hex}.tmp"
        path.mkdir()
        return path

    # ---- writing -----------------------------------------------------------------------------
    def put(
        self,
        src_dir: str | Path,
        *,
        name: str,
        task: str,
        method: str,
        base: BaseSpec,
        labels: Iterable[str] = (),
        metrics: dict[str, Any] | None = None,
        trainer: dict[str, Any] | None = None,
        kind: str = "adapter",
        adapter_format: str | None = None,
        quantization: dict[str, Any] | None = None,
        description: str = "",
        tags: Iterable[str] = (),
    ) -> Manifest:
        """Register the files of `src_dir` as the next version of `name`.

        Returns:
            The manifest of the new version, as written.

        Raises:
            ManifestError: invalid fields (all listed at once). CorruptAdapterError: no adapter files, or
            pickle files (safetensors only). RegistryError: the registry cannot be written.
        """
        src = Path(src_dir)
        manifest = Manifest(
            name=name,
            version=0,
            task=task,
            method=method,
            base=base,
            labels=list(labels),
            metrics=dict(metrics or {}),
            trainer=dict(trainer or {}),
            kind=kind,
            adapter_format=adapter_format or detect_adapter_format(src),
            quantization=quantization,
            description=description,
        )
        return self.put_manifest(src, manifest, tags=tags)

    def put_manifest(
        self,
        src_dir: str | Path,
        manifest: Manifest,
        tags: Iterable[str] = (),
        *,
        keep_version: bool = False,
    ) -> Manifest:
        """Register `src_dir` under `manifest`'s fields as a NEW version.

        Args:
            src_dir: the folder holding the files.
            manifest: the fields to register; its `version` is reassigned unless `keep_version`.
            tags: movable tags to point at the new version.
            keep_version: register at exactly `manifest.version` (a hub's version N stays N here). If that
                version exists with the very same files, it is returned and nothing is written.

        Raises:
            ManifestError, CorruptAdapterError, RegistryError: see `put`; with `keep_version`, also
            RegistryError when that version exists here with other files.
        """
        src = Path(src_dir)
        validate_name(manifest.name)
        if not src.is_dir():
            raise CorruptAdapterError(
                f"{src} is not a folder.", "Pass the folder that holds the adapter files."
            )
        tags = [validate_tag(t) for t in tags]
        problems = manifest.problems()
        if problems:
            raise ManifestError(f"Cannot register {manifest.name!r}: " + "; ".join(problems) + ".")
        refuse_pickles(src)
        staging = self._staging_dir()
        try:
            files = copy_files(src, staging)
            manifest = replace(manifest, files=files, created_at=manifest.created_at or utc_now())
            with self._locked(manifest.name) as name_dir:
                if keep_version:
                    existing = self._existing_copy(name_dir, manifest)
                    if existing is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                        return existing
                    version = manifest.version
                else:
                    version = self._next_version(name_dir)
                manifest = replace(manifest, version=version)
                if not (staging / "README.md").exists():
                    (staging / "README.md").write_text(render_card(manifest), encoding="utf-8")
                    manifest.files["README.md"] = file_entry(staging / "README.md")
                manifest.save(staging)
                for path in staging.iterdir():
                    fsync_tree(path)
                verify_files(staging, manifest)
                fsync_dir(staging)
                os.rename(staging, name_dir / str(version))
                fsync_dir(name_dir)
                if version >= self._next_version(name_dir) - 1:
                    write_atomic(name_dir / COUNTER_FILE, str(version + 1))
                if tags:
                    current = self._read_tags(name_dir)
                    current.update({t: version for t in tags})
                    write_atomic(name_dir / TAGS_FILE, json.dumps(current, indent=2, sort_keys=True))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("registered %s (%s, %s) in %s", manifest.ref, manifest.task, manifest.method, self.root)
        return manifest

    def _existing_copy(self, name_dir: Path, manifest: Manifest) -> Manifest | None:
        """The registered `manifest.version` when it holds exactly `manifest.files`; None when absent.

        Raises:
            InvalidReferenceError: a version below 1. RegistryError: that version holds other files.
        """
        if manifest.version < 1:
            raise InvalidReferenceError(f"Cannot register {manifest.name!r} at version {manifest.version}.")
        if manifest.version not in self._versions_in(name_dir):
            return None
        existing = Manifest.load(name_dir / str(manifest.version))
        same = {k: v for k, v in existing.files.items() if k != "README.md" or "README.md" in manifest.files}
        if same != manifest.files:
            raise RegistryError(
                f"{manifest.name}@{manifest.version} is already registered in {self.root} with other files.",
                f"Delete the local {manifest.ref} (`adapterdock hub delete`) and pull again.",
            )
        return existing

    def _next_version(self, name_dir: Path) -> int:
        existing = max(self._versions_in(name_dir), default=0)
        try:
            counter = int((name_dir / COUNTER_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            counter = 0
        return max(existing + 1, counter)

    # ---- reading -----------------------------------------------------------------------------
    @staticmethod
    def _versions_in(name_dir: Path) -> list[int]:
        if not name_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in name_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    @staticmethod
    def _read_tags(name_dir: Path) -> dict[str, int]:
        try:
            data = json.loads((name_dir / TAGS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{name_dir / TAGS_FILE} is unreadable: {exc}.") from exc
        return {str(k): int(v) for k, v in data.items()}

    def versions(self, name: str) -> list[int]:
        """All registered versions of `name`, ascending."""
        return self._versions_in(self._name_dir(name))

    def tags(self, name: str) -> dict[str, int]:
        """Tags of `name` mapped to versions, `latest` included."""
        name_dir = self._name_dir(name)
        versions = self._versions_in(name_dir)
        tags = {t: v for t, v in self._read_tags(name_dir).items() if v in versions}
        if versions:
            tags["latest"] = versions[-1]
        return tags

    def resolve(self, ref: str | AdapterRef) -> AdapterRef:
        """Turn any reference into `name@version`.

        Raises:
            InvalidReferenceError: malformed reference. AdapterNotFoundError: unknown name, version or tag.
        """
        ref = AdapterRef.parse(ref)
        versions = self.versions(ref.name)
        if not versions:
            raise AdapterNotFoundError(f"No adapter named {ref.name!r} in registry {self.root}.")
        if ref.version is not None:
            if ref.version not in versions:
                raise AdapterNotFoundError(
                    f"Adapter {ref.name!r} has no version {ref.version}; it has {_fmt(versions)}."
                )
            return ref
        tags = self.tags(ref.name)
        tag = ref.tag or "latest"
        if tag not in tags:
            raise AdapterNotFoundError(
                f"Adapter {ref.name!r} has no tag {tag!r}; its tags are {', '.join(sorted(tags))}."
            )
        return AdapterRef(ref.name, version=tags[tag])

    def get(self, ref: str | AdapterRef, verify: bool = True) -> StoredAdapter:
        """Resolve `ref` and return its folder and manifest, checking every file's sha256 when `verify`.

        Raises:
            AdapterNotFoundError, ManifestError, ChecksumMismatchError (naming the file).
        """
        resolved = self.resolve(ref)
        path = self._name_dir(resolved.name) / str(resolved.version)
        manifest = Manifest.load(path)
        if manifest.name != resolved.name or manifest.version != resolved.version:
            raise ManifestError(
                f"{path / MANIFEST_FILE} names {manifest.ref}, but lives at {resolved}.",
                "The registry folder was edited by hand; restore it or re-register the adapter.",
            )
        if verify:
            verify_files(path, manifest)
        return StoredAdapter(path=path, manifest=manifest)

    def verify(self, ref: str | AdapterRef) -> Manifest:
        """Check every file of `ref`; return its manifest."""
        return self.get(ref, verify=True).manifest

    def names(self) -> list[str]:
        """Every adapter name in the registry (namespaced ones as `ns/name`)."""
        if not self.root.is_dir():
            return []
        names: list[str] = []
        for top in sorted(self.root.iterdir()):
            if not top.is_dir() or top.name.startswith("."):
                continue
            if self._versions_in(top):
                names.append(top.name)
            for sub in sorted(top.iterdir()):
                if sub.is_dir() and not sub.name.isdigit() and self._versions_in(sub):
                    names.append(f"{top.name}/{sub.name}")
        return names

    def list(
        self, task: str | None = None, base: str | None = None, all_versions: bool = False
    ) -> list[Manifest]:
        """Manifests of the latest (or every) version, filtered by task and base (fingerprint or name)."""
        manifests: list[Manifest] = []
        for name in self.names():
            versions = self.versions(name)
            for version in versions if all_versions else versions[-1:]:
                try:
                    manifest = Manifest.load(self._name_dir(name) / str(version))
                except ManifestError as exc:
                    logger.warning("skipping %s@%s: %s", name, version, exc)
                    continue
                if task and manifest.task != task:
                    continue
                if base and base not in (manifest.base.fingerprint, manifest.base.name_or_path):
                    continue
                manifests.append(manifest)
        return manifests

    # ---- tags and deletion -------------------------------------------------------------------
    def tag(self, ref: str | AdapterRef, tag: str) -> AdapterRef:
        """Point movable `tag` at the version `ref` resolves to; `latest` cannot be set by hand."""
        validate_tag(tag)
        if tag == "latest":
            raise InvalidReferenceError(
                "The tag 'latest' always names the highest version; pick another tag."
            )
        resolved = self.resolve(ref)
        with self._locked(resolved.name) as name_dir:
            current = self._read_tags(name_dir)
            current[tag] = resolved.version
            write_atomic(name_dir / TAGS_FILE, json.dumps(current, indent=2, sort_keys=True))
            routes = read_routes(name_dir)
            if routes.pop(tag, None) is not None:  # a plain tag ends its split (`hub route --promote`)
                write_routes(name_dir, routes)
        logger.info("tagged %s as %s@%s", resolved, resolved.name, tag)
        return resolved

    def route(self, name: str, tag: str, split: TrafficSplit) -> None:
        """Split the traffic of `name@tag` between versions by weight.

        `tags.json` names the split's heaviest version, for readers that know only tags.

        Raises:
            InvalidReferenceError: a malformed tag, or `latest`. AdapterNotFoundError: a version that does
            not exist.
        """
        validate_tag(tag)
        if tag == "latest":
            raise InvalidReferenceError(
                "The tag 'latest' always names the highest version; route another tag."
            )
        with self._locked(name) as name_dir:
            versions = self._versions_in(name_dir)
            missing = [v for v in split.versions if v not in versions]
            if missing:
                raise AdapterNotFoundError(
                    f"Adapter {name!r} has no version {_fmt(missing)}; it has {_fmt(versions)}.",
                    "Split only between registered versions (`adapterdock hub list --all-versions`).",
                )
            routes = read_routes(name_dir)
            routes[tag] = split
            write_routes(name_dir, routes)
            tags = self._read_tags(name_dir)
            tags[tag] = split.main
            write_atomic(name_dir / TAGS_FILE, json.dumps(tags, indent=2, sort_keys=True))
        logger.info("routed %s@%s to %s", name, tag, split.describe())

    def routes(self, name: str) -> dict[str, TrafficSplit]:
        """The traffic splits of `name` by tag (only those whose versions all still exist)."""
        name_dir = self._name_dir(name)
        versions = set(self._versions_in(name_dir))
        return {t: s for t, s in read_routes(name_dir).items() if set(s.versions) <= versions}

    def delete(self, ref: str | AdapterRef) -> list[AdapterRef]:
        """Remove one version (`name@3`, `name@tag`) or, for a bare name, every version."""
        parsed = AdapterRef.parse(ref)
        targets = (
            [self.resolve(parsed)]
            if parsed.version is not None or parsed.tag is not None
            else [AdapterRef(parsed.name, v) for v in self.versions(parsed.name)]
        )
        if not targets:
            raise AdapterNotFoundError(f"No adapter named {parsed.name!r} in registry {self.root}.")
        with self._locked(parsed.name) as name_dir:
            for target in targets:
                trash = self.root / STAGING / f"{uuid.uuid4().hex}.deleted"
                os.rename(name_dir / str(target.version), trash)
                shutil.rmtree(trash, ignore_errors=True)
            remaining = self._versions_in(name_dir)
            tags = {t: v for t, v in self._read_tags(name_dir).items() if v in remaining}
            write_atomic(name_dir / TAGS_FILE, json.dumps(tags, indent=2, sort_keys=True))
            routes = read_routes(name_dir)
            if any(not set(split.versions) <= set(remaining) for split in routes.values()):
                write_routes(name_dir, {t: r for t, r in routes.items() if set(r.versions) <= set(remaining)})
        logger.info("deleted %s", ", ".join(str(t) for t in targets))
        return targets


def _fmt(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions) if versions else "none"
