"""Push adapters to, and pull them from, the Hugging Face Hub or a self-hosted hub speaking the same API.

`HubClient` wraps `huggingface_hub.HfApi` with an injectable endpoint (default `HF_ENDPOINT`, else
huggingface.co; `HF_TOKEN` respected). One hub repo holds one adapter: its PEFT (or bottleneck, or model)
files, `manifest.json` and the `README.md` card, so `PeftModel.from_pretrained("org/name")` works against that
endpoint. Each pushed version is tagged `v<version>` (never moved afterwards) plus the registry's own tags.
Pull reads one commit through `hub.hub_http.HubReader` (timeouts, one deadline, byte and file caps,
redirects kept on the hub) into a temp folder, checks every file against the manifest's sha256 and the base
fingerprint, then registers it through `LocalStore.put_manifest` (as the hub's version N with
`keep_version`, which the server and the vLLM resolver use): on any failure nothing is registered and the
temp folder is gone.
Boundary: the remote side of the registry; no torch. Errors are `HubError`, `HubAuthError`,
`ChecksumMismatchError`, `BaseMismatchError`, `ManifestError`, each with its remedy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub.adapter_format import check_base
from hub.errors import (
    AdapterDockError,
    ChecksumMismatchError,
    HubAuthError,
    HubError,
    HubLimitError,
    InvalidReferenceError,
    ManifestError,
    RegistryError,
)
from hub.hub_http import HubReader, PullLimits
from hub.manifest import MANIFEST_FILE, BaseSpec, Manifest
from hub.ref import AdapterRef, validate_name, validate_repo_id
from hub.store import LocalStore
from hub.version_folder import verify_files

logger = logging.getLogger(__name__)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_VERSION_TAG = re.compile(r"^v\d+$")
KEEP_ON_REMOTE = (".gitattributes",)


def split_repo_revision(text: str) -> tuple[str, str | None]:
    """`org/name@v3` -> (`org/name`, `v3`); `org/name` -> (`org/name`, None)."""
    repo_id, sep, revision = text.partition("@")
    if sep and not revision:
        raise InvalidReferenceError(
            f"Empty revision in {text!r}.", "Write ORG/NAME@REVISION, e.g. acme/x@v3."
        )
    return validate_repo_id(repo_id), (revision or None)


class HubClient:
    """A Hugging Face Hub compatible endpoint: huggingface.co or an `adapterdock hub serve`."""

    def __init__(
        self, endpoint: str | None = None, token: str | None = None, limits: PullLimits | None = None
    ) -> None:
        """Connect to a hub (nothing is sent until the first call).

        For any endpoint but huggingface.co this sets `HF_HUB_DISABLE_XET=1` for the whole process, since
        our service speaks LFS only.

        Args:
            endpoint: base URL; default `$HF_ENDPOINT`, else https://huggingface.co.
            token: access token; default `$HF_TOKEN` (or the token saved by `hf auth login`).
            limits: timeouts, deadline and caps of each pull (default `PullLimits()`).
        """
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        self.token = token or None
        self.limits = limits or PullLimits()
        if self.endpoint != HF_DEFAULT_ENDPOINT:
            # huggingface_hub read the env var at import; it checks `constants` at call time.
            os.environ["HF_HUB_DISABLE_XET"] = "1"
            constants.HF_HUB_DISABLE_XET = True
        self.api = HfApi(endpoint=self.endpoint, token=self.token)

    def __repr__(self) -> str:
        return f"HubClient({self.endpoint!r})"

    # ---- push ----------------------------------------------------------------------------------
    def push(
        self,
        store: LocalStore,
        ref: str | AdapterRef,
        repo_id: str,
        revision: str | None = None,
        private: bool = False,
    ) -> str:
        """Upload one registered version to `repo_id` in one commit and tag it `v<version>`.

        Args:
            store: the local registry holding `ref`.
            ref: the adapter version to push (`name`, `name@3`, `name@prod`).
            repo_id: `namespace/name` on the hub (created if missing).
            revision: branch to commit to (default `main`; created from main if missing).
            private: create the repo private (an existing repo keeps its visibility).

        Returns:
            The commit id the `v<version>` tag points to.

        Raises:
            ChecksumMismatchError: a local file no longer matches the manifest (nothing is uploaded).
            HubError: `v<version>` already exists for other content, or the hub refused a request.
            HubAuthError: the token is missing, wrong, or lacks rights.
        """
        repo_id = validate_repo_id(repo_id)
        stored = store.get(ref, verify=True)
        manifest = stored.manifest
        branch = revision or "main"
        version_tag = f"v{manifest.version}"
        with self._translate(f"pushing {manifest.ref} to {repo_id}"):
            self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            tags = {t.name: t.target_commit for t in self.api.list_repo_refs(repo_id).tags}
            if version_tag in tags:
                commit = self._existing_version(repo_id, tags[version_tag], manifest)
            else:
                commit = self._commit_version(repo_id, branch, stored.path, manifest)
                self.api.create_tag(repo_id, tag=version_tag, revision=commit)
            for tag, version in sorted(store.tags(manifest.name).items()):
                if version == manifest.version and tag != "latest" and not _VERSION_TAG.match(tag):
                    if tags.get(tag) not in (None, commit):
                        self.api.delete_tag(repo_id, tag=tag)
                    if tags.get(tag) != commit:
                        self.api.create_tag(repo_id, tag=tag, revision=commit)
        logger.info("pushed %s to %s/%s@%s (%s)", manifest.ref, self.endpoint, repo_id, version_tag, commit)
        return commit

    def _commit_version(self, repo_id: str, branch: str, folder: Path, manifest: Manifest) -> str:
        if branch != "main":
            self.api.create_branch(repo_id, branch=branch, exist_ok=True)
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        remote = self.api.list_repo_files(repo_id, revision=branch)
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in local
        ]
        # The branch shows exactly one version: drop files an earlier version had and this one lacks.
        operations += [
            CommitOperationDelete(path_in_repo=rel)
            for rel in remote
            if rel not in local and rel not in KEEP_ON_REMOTE
        ]
        info = self.api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"adapterdock: push {manifest.ref}",
            commit_description=f"{manifest.task} adapter ({manifest.method}) on {manifest.base.name_or_path}",
            revision=branch,
        )
        return info.oid

    def _existing_version(self, repo_id: str, commit: str, manifest: Manifest) -> str:
        """Accept a `v<N>` tag that already holds this very version; refuse one that holds other content."""
        remote = self._remote_manifest(repo_id, commit)
        if remote is not None and remote.name == manifest.name and remote.files == manifest.files:
            logger.info("%s is already on %s as v%d", manifest.ref, repo_id, manifest.version)
            return commit
        raise HubError(
            f"{repo_id} already has tag v{manifest.version} for other content; version tags never move.",
            "Push to another repo, or pull the remote adapter and push it as a new local version.",
        )

    def _remote_manifest(self, repo_id: str, revision: str) -> Manifest | None:
        with tempfile.TemporaryDirectory(prefix="adapterdock-manifest-") as tmp:
            try:
                path = hf_hub_download(
                    repo_id,
                    MANIFEST_FILE,
                    revision=revision,
                    cache_dir=tmp,
                    endpoint=self.endpoint,
                    token=self.token,
                )
            except EntryNotFoundError:
                return None
            try:
                return Manifest.load(path)
            except ManifestError:
                return None

    # ---- pull ----------------------------------------------------------------------------------
    def revision_commit(self, repo_id: str, revision: str | None = None) -> str:
        """The commit a branch or tag points at now (one small request; nothing is downloaded).

        Raises:
            HubError, HubAuthError, HubTimeoutError: the hub, the repo or the revision cannot be reached.
        """
        repo_id = validate_repo_id(repo_id)
        return str(self._reader().repo_info(repo_id, revision)["sha"])

    def pull(
        self,
        repo_id: str,
        revision: str | None = None,
        store: LocalStore | None = None,
        as_name: str | None = None,
        expected_base: BaseSpec | None = None,
        *,
        keep_version: bool = False,
    ) -> Manifest:
        """Download one adapter version, verify it and register it locally.

        Every request runs under `self.limits` (timeouts, one deadline, byte and file caps, redirects
        kept on the hub).

        Args:
            repo_id: `namespace/name` on the hub.
            revision: branch, tag (`v3`) or commit; default `main`.
            store: the registry to add it to (default: `LocalStore()`).
            as_name: register under this name instead of the manifest's.
            expected_base: the base it must have been trained on; None warns that nothing was checked.
            keep_version: register it as the hub's version (the version its manifest records, which a
                `vN` revision must match) instead of the registry's next one; a version already here with
                the same files is returned without downloading anything.

        Returns:
            The manifest as registered.

        Raises:
            ChecksumMismatchError, BaseMismatchError, ManifestError, HubError, HubAuthError,
            HubTimeoutError, HubLimitError, RegistryError (`keep_version`: that version is here with
            other files).
        """
        repo_id = validate_repo_id(repo_id)
        store = store if store is not None else LocalStore()
        if as_name is not None:
            validate_name(as_name)
        where = f"{repo_id}@{revision or 'main'}"
        reader = self._reader()
        info = reader.repo_info(repo_id, revision)
        commit = str(info["sha"])
        manifest = self._pulled_manifest(reader, repo_id, commit, info, where)
        if as_name is not None:
            manifest = replace(manifest, name=as_name)
        if keep_version:
            _check_hub_version(manifest, revision, where)
            present = _registered_copy(store, manifest)
            if present is not None:
                logger.info("%s is already registered as %s: nothing downloaded", where, present.ref)
                return present
        with tempfile.TemporaryDirectory(prefix="adapterdock-pull-") as tmp:
            files_dir = Path(tmp) / "files"
            for rel, entry in sorted(manifest.files.items()):
                reader.download(repo_id, commit, rel, files_dir / rel, entry.size)
            try:
                verify_files(files_dir, manifest)
            except ChecksumMismatchError as exc:
                raise ChecksumMismatchError(
                    f"Pulled from {where}: {exc.message}",
                    path=exc.path,
                    remedy="The remote copy is corrupt; nothing was registered. Push again from a good copy.",
                ) from exc
            _check_pulled_base(manifest, expected_base, source=where)
            registered = store.put_manifest(files_dir, manifest, keep_version=keep_version)
        logger.info("pulled %s (commit %s) as %s", where, commit, registered.ref)
        return registered

    def _pulled_manifest(
        self, reader: HubReader, repo_id: str, commit: str, info: dict, where: str
    ) -> Manifest:
        """The manifest at `commit`, checked before any file is downloaded: names, count, sizes, presence."""
        siblings = info.get("siblings") or []
        names = {s.get("rfilename") for s in siblings if isinstance(s, dict)}
        if MANIFEST_FILE not in names:
            raise ManifestError(
                f"{where} has no {MANIFEST_FILE}: it was not pushed by adapterdock.",
                "Download it with huggingface_hub and register it with `adapterdock hub import`.",
            )
        raw = reader.file_bytes(repo_id, commit, MANIFEST_FILE, self.limits.max_json_bytes)
        try:
            manifest = Manifest.from_dict(json.loads(raw), source=f"{where}/{MANIFEST_FILE}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where}/{MANIFEST_FILE} is not JSON: {exc}.") from exc
        _check_file_names(manifest, where)
        if len(manifest.files) > self.limits.max_files:
            raise HubLimitError(
                f"{where} lists {len(manifest.files)} files; a pull takes at most {self.limits.max_files}."
            )
        total = sum(max(e.size, 0) for e in manifest.files.values())
        if total > self.limits.max_bytes or any(e.size < 0 for e in manifest.files.values()):
            raise HubLimitError(
                f"{where} is {total} bytes (or lists files of unknown size); a pull takes at most "
                f"{self.limits.max_bytes} bytes."
            )
        missing = sorted(set(manifest.files) - names)
        if missing:
            raise ChecksumMismatchError(
                f"{where} lacks {', '.join(missing)}, which its manifest lists.",
                path=missing[0],
                remedy="Push the adapter again; the remote repo is incomplete.",
            )
        return manifest

    def _reader(self) -> HubReader:
        """A reader for one pull; refuses at once in offline mode, as huggingface_hub's calls do."""
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"Reaching {self.endpoint}: offline mode is on.", "Unset HF_HUB_OFFLINE to reach the hub."
            )
        return HubReader(self.endpoint, self.token, self.limits)

    # ---- errors --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Turn huggingface_hub and transport errors into HubError / HubAuthError with a remedy."""
        try:
            yield
        except AdapterDockError:
            raise
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
            raise _hub_error(action, self.endpoint, exc) from exc
        except Exception as exc:  # httpx2 transport errors are not OSError
            if type(exc).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore"):
                raise HubError(f"{action}: cannot reach {self.endpoint}: {exc}.") from exc
            raise


def _http_cause(exc: BaseException) -> HfHubHTTPError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, HfHubHTTPError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _hub_error(action: str, endpoint: str, exc: BaseException) -> HubError:
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{action}: offline mode is on.", "Unset HF_HUB_OFFLINE to reach the hub.")
    http = _http_cause(exc)
    if http is None:
        return HubError(f"{action}: cannot reach {endpoint}: {exc}.")
    status = http.response.status_code if http.response is not None else None
    server = (http.server_message or "").strip() or str(http).splitlines()[0]
    if status in (401, 403):
        return HubAuthError(f"{action}: {endpoint} answered {status}: {server}")
    if isinstance(http, RepositoryNotFoundError):
        return HubError(
            f"{action}: repo not found at {endpoint}.",
            "Check the repo id and --endpoint; private repos need --token (or HF_TOKEN).",
        )
    if isinstance(http, RevisionNotFoundError):
        return HubError(f"{action}: no such revision.", "Pull a branch, a tag such as v3, or a commit id.")
    return HubError(f"{action}: {endpoint} answered {status}: {server}")


def _check_file_names(manifest: Manifest, source: str) -> None:
    """Refuse manifests whose file names could write outside the download folder."""
    for rel in manifest.files:
        if not rel or "\\" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
            raise ManifestError(
                f"{source}: manifest lists an unsafe file name {rel!r}; nothing was downloaded.",
                "Only pull adapters from hubs you trust; report the repo to its owner.",
            )


def _check_hub_version(manifest: Manifest, revision: str | None, source: str) -> None:
    """Refuse a `vN` revision whose manifest records another version: the hub's N must stay N here."""
    if revision is not None and _VERSION_TAG.match(revision) and manifest.version != int(revision[1:]):
        raise ManifestError(
            f"{source} holds version {manifest.version} of {manifest.name}, not {revision[1:]}; nothing was "
            "registered.",
            "Version tags name the version they hold: report the repo to its owner.",
        )
    if manifest.version < 1:
        raise ManifestError(f"{source} records version {manifest.version}; hub versions start at 1.")


def _registered_copy(store: LocalStore, manifest: Manifest) -> Manifest | None:
    """`manifest.name@manifest.version` when it is registered here with the same files (a pull done once).

    Raises:
        RegistryError: that version is registered here with other files.
    """
    if manifest.version not in store.versions(manifest.name):
        return None
    local = store.get(AdapterRef(manifest.name, manifest.version), verify=False).manifest
    if {k: v for k, v in local.files.items() if k in manifest.files} != manifest.files:
        raise RegistryError(
            f"{manifest.ref} is already registered in {store.root} with other files than the hub's.",
            f"Delete the local {manifest.ref} (`adapterdock hub delete`) to pull the hub's.",
        )
    return local


def _check_pulled_base(manifest: Manifest, expected: BaseSpec | None, source: str) -> None:
    """Refuse an adapter trained on another base than `expected`; warn when no base was named.

    Raises:
        BaseMismatchError: the fingerprints differ.
    """
    if expected is None:
        logger.warning(
            "%s was trained on %s (%s); no base was named, so the base was not checked.",
            source,
            manifest.base.name_or_path,
            manifest.base.fingerprint,
        )
        return
    check_base(
        source,
        manifest.base,
        expected,
        outcome="Nothing was registered.",
        remedy="Pull it for the base it was trained on, or name that base with --base.",
    )
