"""Adapter resolution: a client's reference string -> an immutable `name@version` with its manifest, checked.

Boundary: names and manifests only; nothing is loaded into the model here. The resolver never accepts raw
paths (every reference must pass `hub.ref` naming rules), resolves movable refs (`name`, `name@prod`) to a
concrete version on every call so a moved tag is never served stale, checks the base fingerprint, the
adapter kind and the task against the endpoint, and pulls from a remote hub on a local miss only when the
server was started with --hub. `ns/name@N` is the hub's version N, and is registered here as N (pulled
once: asking again is a local hit). A movable reference pulled from the hub (`ns/name@prod`, `ns/name`) is
re-checked there every `hub_refresh_s` seconds and pulled again when it has moved. At most `max_pulls`
requests are inside a pull at once (pulling, or waiting for the same adapter's pull), so a stalled hub holds
at most that many worker threads: the next request gets `HubBusyError` (503) at once, and a wait longer than
the pull deadline `HubTimeoutError` (504). Calls touch the disk (and maybe the network): run them off the
event loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hub.adapter_format import check_base
from hub.bases import BaseInfo
from hub.errors import (
    AdapterDockError,
    AdapterNotFoundError,
    HubBusyError,
    HubTimeoutError,
    InvalidReferenceError,
)
from hub.manifest import Manifest
from hub.ref import AdapterRef
from hub.store import LocalStore
from hub.version_folder import verify_files
from server.errors import FullModelError, HubNotConfiguredError, WrongTaskError
from server.hub_pulls import HubPullRecord, PulledAt

if TYPE_CHECKING:
    from hub.remote import HubClient

logger = logging.getLogger(__name__)

GENERATE = "generate"
CLASSIFY = "classify"
NER = "ner"
SCORE = "score"

ENDPOINT_TASKS: dict[str, tuple[str, ...]] = {
    GENERATE: ("instruction", "dpo", "ppo"),
    CLASSIFY: ("classification",),
    NER: ("ner",),
    SCORE: ("reward",),
}
"""Which manifest tasks each family of endpoints serves."""

TASK_ENDPOINTS: dict[str, str] = {
    "instruction": "POST /v1/completions, /v1/chat/completions or /generate",
    "dpo": "POST /v1/completions, /v1/chat/completions or /generate",
    "ppo": "POST /v1/completions, /v1/chat/completions or /generate",
    "classification": "POST /v1/classify",
    "ner": "POST /v1/ner",
    "reward": "POST /v1/score",
}
"""Where to send an adapter of each task (used in wrong-task errors)."""

_PATH_MARKERS = ("\\", "~", ":")


@dataclass(frozen=True)
class ResolvedAdapter:
    """One registered adapter version, checked against this server."""

    key: str
    """The immutable `name@version` the cache and the metrics use."""
    path: Path
    """Its folder in the local registry."""
    manifest: Manifest


class Resolver:
    """Resolves references against a local registry (and optionally a remote hub) for one served base.

    Args:
        store: the local registry.
        base: the base model this server serves.
        hub: the client of the remote hub pulled from on a local miss; None never contacts a hub.
        hub_refresh_s: seconds between checks that a pulled tag has not moved on the hub (0: every
            call; negative: never).
        max_pulls: requests allowed inside a hub pull at once (pulling or waiting for one); more get
            `HubBusyError` without waiting.
    """

    def __init__(
        self,
        store: LocalStore,
        base: BaseInfo,
        *,
        hub: HubClient | None = None,
        hub_refresh_s: float = 60.0,
        max_pulls: int = 2,
    ) -> None:
        self.store = store
        self.base = base
        self.hub = hub
        self.hub_endpoint = hub.endpoint if hub is not None else None
        self.hub_refresh_s = hub_refresh_s
        self._pulls = HubPullRecord(store.root, hub.endpoint) if hub is not None else None
        self._pull_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.max_pulls = max(1, max_pulls)
        self._pull_slots = threading.BoundedSemaphore(self.max_pulls)

    # ---- public --------------------------------------------------------------------------------
    def resolve(
        self,
        text: str,
        *,
        endpoint: str | None = None,
        source: str | None = None,
        user: str | None = None,
    ) -> ResolvedAdapter:
        """Resolve `text` (`name`, `name@3`, `name@tag`) to a checked, immutable version.

        A tag split between versions (`adapterdock hub route`) picks one per request: the same `user`
        always the same version, no user by weight. The split is read from the registry on every call, so a
        change reaches the next request.

        Args:
            text: the reference a client sent.
            endpoint: GENERATE, CLASSIFY, NER or SCORE to check the task; None accepts any task.
            source: "local" never pulls; "hub" requires --hub; None pulls on a miss when --hub is set.
            user: who the request is for (OpenAI's `user`), for sticky traffic splits.

        Raises:
            InvalidReferenceError: malformed reference or a path. AdapterNotFoundError: unknown here
            (and on the hub). HubNotConfiguredError: `source="hub"` without --hub.
            FullModelError, BaseMismatchError, WrongTaskError: see `check`. ManifestError.
        """
        ref = parse_reference(text)
        if source == "hub" and not self.hub_endpoint:
            raise HubNotConfiguredError(f"Adapter {text!r} was asked from the hub, but no hub is configured.")
        try:
            concrete = self.store.resolve(ref)
        except AdapterNotFoundError as exc:
            if not self.hub_endpoint or source == "local" or "/" not in ref.name:
                hint = (
                    "; no remote hub is configured (--hub URL)."
                    if not self.hub_endpoint
                    else "; only NAMESPACE/NAME adapters are pulled from the hub."
                    if "/" not in ref.name and source != "local"
                    else "."
                )
                raise AdapterNotFoundError(
                    exc.message, "Run `adapterdock hub list` to see what is registered" + hint
                ) from exc
            concrete = self._pull(ref)
        else:
            if source != "local" and self._from_hub(ref):
                recorded = self._recorded(ref)
                concrete = self._pull(ref) if recorded is None else self._refresh(ref, recorded)
            elif ref.tag not in (None, "latest"):
                split = self.store.routes(ref.name).get(ref.tag)
                if split is not None:
                    concrete = AdapterRef(ref.name, version=split.pick(user, ref.name, ref.tag))
        stored = self.store.get(concrete, verify=False)
        resolved = ResolvedAdapter(key=str(concrete), path=stored.path, manifest=stored.manifest)
        self.check(resolved.manifest, endpoint)
        return resolved

    def check(self, manifest: Manifest, endpoint: str | None) -> None:
        """Check that `manifest` can be served by this server at `endpoint`.

        Raises:
            FullModelError: a full fine-tuned model (409). BaseMismatchError: trained on another base (409).
            WrongTaskError: the endpoint does not serve its task (400).
        """
        if manifest.kind == "model":
            raise FullModelError(
                f"{manifest.ref} is a full fine-tuned model, not a swappable adapter.",
                f"Serve it as the base: `adapterdock serve --base registry:{manifest.ref}`.",
            )
        check_base(
            manifest.ref,
            manifest.base,
            self.base.spec,
            expected_as="this server's base ",
            remedy=f"Serve it with `adapterdock serve --base {manifest.base.name_or_path}`, "
            f"or retrain it on {self.base.name_or_path!r}.",
        )
        if endpoint is not None and manifest.task not in ENDPOINT_TASKS[endpoint]:
            right = TASK_ENDPOINTS.get(manifest.task, "no endpoint of this server")
            raise WrongTaskError(
                f"{manifest.ref} is a {manifest.task} adapter; this endpoint serves "
                f"{' / '.join(ENDPOINT_TASKS[endpoint])} adapters.",
                f"Send it to {right}.",
            )

    def verify(self, resolved: ResolvedAdapter) -> None:
        """Check every file's sha256 before the adapter is loaded (blocking).

        Raises:
            ChecksumMismatchError: naming the changed file.
        """
        verify_files(resolved.path, resolved.manifest)

    def registered(self) -> list[Manifest]:
        """Every registered version (blocking)."""
        return self.store.list(all_versions=True)

    def plain_name_target(self, name: str) -> str | None:
        """`name@V` a plain `name` resolves to when it is a hub name pulled at the hub's main (its recorded
        version, which versions pulled by number may exceed); None for any other name (blocking)."""
        if self._pulls is None or "/" not in name:
            return None
        recorded = self._recorded(AdapterRef(name))
        return None if recorded is None else str(recorded)

    # ---- remote --------------------------------------------------------------------------------
    def _pull(self, ref: AdapterRef) -> AdapterRef:
        """Pull `ref` (a `namespace/name`) from the hub into the local registry, once.

        The copy is registered under the requested name, and a requested tag is set on it locally, so the
        next request is a local hit. Hub versions are addressed by the hub's `vN` tags and keep their number
        here. A movable ref is pulled at the commit its tag names, which is recorded for `_refresh`.

        Raises:
            HubBusyError: `max_pulls` requests are already inside pulls. HubTimeoutError: the same adapter's
            pull by another request outlasted the pull deadline. HubError and the pull's own errors.
        """
        if not self._pull_slots.acquire(blocking=False):
            raise HubBusyError(
                f"{ref} is not here yet and {self.max_pulls} hub pull(s) are already in progress; "
                "this request was not queued behind them."
            )
        try:
            lock = self._lock_for(ref.name)
            if not lock.acquire(timeout=self._pull_wait_s()):
                raise HubTimeoutError(f"Another request's pull of {ref.name} from the hub is still running.")
            try:
                done = self._pulled_meanwhile(ref)
                return done if done is not None else self._pull_now(ref)
            finally:
                lock.release()
        finally:
            self._pull_slots.release()

    def _pulled_meanwhile(self, ref: AdapterRef) -> AdapterRef | None:
        """What another request pulled while this one waited for the lock (None: pull it now)."""
        if ref.version is None and self._pulls is not None and self._pulls.pulled(ref.name):
            return self._recorded(ref)
        try:
            return self.store.resolve(ref)
        except AdapterNotFoundError:
            return None

    def _pull_now(self, ref: AdapterRef, commit: str | None = None) -> AdapterRef:
        """Pull `ref` now; a movable one at `commit` (looked up when not given) and recorded."""
        client, revision = self._client(), hub_revision(ref)
        logger.info("pulling %s from hub %s", ref, self.hub_endpoint)
        if ref.version is not None:
            commit = revision
        elif commit is None:
            commit = client.revision_commit(ref.name, revision)
        manifest = client.pull(
            ref.name, commit, self.store, as_name=ref.name, expected_base=self.base.spec, keep_version=True
        )
        pulled = AdapterRef(manifest.name, version=manifest.version)
        assert self._pulls is not None
        if ref.version is not None:
            self._pulls.put(ref.name, str(revision), PulledAt(str(revision), manifest.version))
        else:
            if ref.tag not in (None, "latest"):
                self.store.tag(pulled, ref.tag)
            assert self._pulls is not None
            self._pulls.put(ref.name, revision or "main", PulledAt(str(commit), manifest.version))
        logger.info("pulled %s from hub %s as %s", ref, self.hub_endpoint, pulled)
        return pulled

    def _from_hub(self, ref: AdapterRef) -> bool:
        """A tag or plain name of an adapter pulled from this hub before (local adapters never reach it)."""
        if self._pulls is None or ref.version is not None or "/" not in ref.name:
            return False
        return self._pulls.pulled(ref.name)

    def _recorded(self, ref: AdapterRef) -> AdapterRef | None:
        """The local version the hub's `ref` was last pulled or confirmed as; None if never (or deleted).

        A plain name is the hub's main, not the highest version pulled here (`ns/name@3` may be ahead of it).
        """
        assert self._pulls is not None
        recorded = self._pulls.get(ref.name, hub_revision(ref) or "main")
        if recorded is None or recorded.version not in self.store.versions(ref.name):
            return None
        return AdapterRef(ref.name, version=recorded.version)

    def _refresh(self, ref: AdapterRef, concrete: AdapterRef) -> AdapterRef:
        """Ask the hub where `ref` points now (at most every `hub_refresh_s`); pull again if it moved.

        A hub that cannot be reached, or a new version that fails its checks, leaves the local copy
        served and is logged as a warning.
        """
        assert self._pulls is not None
        key = hub_revision(ref) or "main"
        if not self._pulls.due(ref.name, key, self.hub_refresh_s):
            return concrete
        if not self._pull_slots.acquire(blocking=False):  # pulls are busy: the local copy serves now
            return concrete
        try:
            return self._refresh_now(ref, concrete, key)
        finally:
            self._pull_slots.release()

    def _refresh_now(self, ref: AdapterRef, concrete: AdapterRef, key: str) -> AdapterRef:
        assert self._pulls is not None
        lock = self._lock_for(ref.name)
        if not lock.acquire(blocking=False):  # another request is refreshing it: serve the local copy
            return concrete
        try:
            if not self._pulls.due(ref.name, key, self.hub_refresh_s):  # refreshed meanwhile
                return self._recorded(ref) or concrete
            recorded = self._pulls.get(ref.name, key)
            try:
                commit = self._client().revision_commit(ref.name, hub_revision(ref))
                if recorded is not None and commit == recorded.commit:
                    self._pulls.checked(ref.name, key)
                    return concrete
                pulled = self._pull_now(ref, commit)
            except AdapterDockError as exc:
                self._pulls.checked(ref.name, key)
                logger.warning(
                    "could not refresh %s from hub %s (%s); serving the local copy %s",
                    ref, self.hub_endpoint, exc.message, concrete,
                )  # fmt: skip
                return concrete
            logger.info(
                "%s moved on hub %s: now serving %s (was %s)", ref, self.hub_endpoint, pulled, concrete
            )
            return pulled
        finally:
            lock.release()

    def _pull_wait_s(self) -> float:
        """How long a request waits for another request's pull of the same adapter: the pull deadline."""
        limits = getattr(self.hub, "limits", None)
        return float(getattr(limits, "deadline", 600.0))

    def _client(self) -> HubClient:
        assert self.hub is not None, "only called when a hub is configured"
        return self.hub

    def _lock_for(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._pull_locks.setdefault(name, threading.Lock())


def hub_revision(ref: AdapterRef) -> str | None:
    """The hub revision a reference names: `vN` for a version, its tag, or None (the main branch)."""
    if ref.version is not None:
        return f"v{ref.version}"
    return None if ref.tag in (None, "latest") else ref.tag


def parse_reference(text: str) -> AdapterRef:
    """Parse a client's reference, refusing anything that looks like a filesystem path.

    Raises:
        InvalidReferenceError: for paths and malformed references.
    """
    if not isinstance(text, str) or not text:
        raise InvalidReferenceError("Adapter reference is empty.")
    if text.startswith(("/", ".")) or any(marker in text for marker in _PATH_MARKERS):
        raise InvalidReferenceError(
            f"{text[:120]!r} looks like a path; this server only serves registered adapters by reference.",
            "Register the folder with `adapterdock hub import`, then ask for NAME, NAME@VERSION or NAME@TAG.",
        )
    return AdapterRef.parse(text)
