"""Bounded reads from a hub for pulls: timeouts, a deadline, byte caps and redirects kept on the hub.

`HubReader` does the GETs a pull needs (repo info at a revision, then each file) with httpx directly rather
than through huggingface_hub, so that every limit a pull promises holds: a connect and a read timeout on
each request, one deadline for the whole pull (a hub that sends a byte every few seconds cannot hold a
worker forever), a cap on the bytes of each answer and of the pull, and redirects followed only to the
configured hub's own origin (huggingface.co may also send files to its CDN hosts). The token is sent to
the hub's origin only.
Boundary: HTTP only; what to fetch and what to check is `hub.remote`'s business. Errors are `HubError`,
`HubAuthError`, `HubTimeoutError` and `HubLimitError`, each with its remedy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from hub.errors import HubAuthError, HubError, HubLimitError, HubTimeoutError

logger = logging.getLogger(__name__)

HF_HOSTS = ("huggingface.co", "hf.co")
"""huggingface.co serves LFS and Xet files from sub-domains of these (its CDN); no other hub does."""
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class PullLimits:
    """What one pull may cost; the defaults suit adapters and small models."""

    connect_timeout: float = 10.0
    """Seconds to open a connection to the hub."""
    read_timeout: float = 30.0
    """Seconds the hub may go without sending a byte."""
    deadline: float = 600.0
    """Seconds for the whole pull (every request of it together)."""
    max_bytes: int = 4 * 1024**3
    """Bytes of all the files of one pull together."""
    max_files: int = 256
    """Files in one adapter version."""
    max_json_bytes: int = 8 * 1024 * 1024
    """Bytes of one JSON answer (repo info) or of the manifest."""
    max_redirects: int = 5
    """Redirects followed per request (only within the hub)."""


class HubReader:
    """GETs against one hub endpoint under `PullLimits`; one instance per pull (it holds the deadline)."""

    def __init__(self, endpoint: str, token: str | None, limits: PullLimits) -> None:
        self.name = endpoint.rstrip("/")
        """The endpoint as errors name it."""
        self.endpoint = httpx.URL(self.name + "/")
        self.token = token
        self.limits = limits
        self.started = time.monotonic()
        self.received = 0

    # ---- what a pull asks for -------------------------------------------------------------------
    def repo_info(self, repo_id: str, revision: str | None) -> dict[str, Any]:
        """The hub's JSON about `repo_id` at `revision` (main when None): `sha`, `siblings`, ...

        Raises:
            HubError (repo or revision not found, bad JSON), HubAuthError, HubTimeoutError, HubLimitError.
        """
        path = f"api/models/{repo_id}/revision/{quote(revision or 'main', safe='')}"
        data = self._get(path, None, self.limits.max_json_bytes, what=f"{repo_id}@{revision or 'main'}")
        try:
            info = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(f"{self.name} answered {repo_id}'s info with something not JSON: {exc}.") from exc
        if not isinstance(info, dict) or not isinstance(info.get("sha"), str):
            raise HubError(f"{self.name} answered {repo_id}'s info without a commit sha.")
        return info

    def file_bytes(self, repo_id: str, commit: str, rel: str, limit: int) -> bytes:
        """One small file of `repo_id` at `commit`, at most `limit` bytes."""
        return self._get(self._file_path(repo_id, commit, rel), None, limit, what=rel)

    def download(self, repo_id: str, commit: str, rel: str, target: Path, size: int) -> None:
        """Stream one file into `target`: at most `size` bytes (its manifest size) and the pull's budget."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as sink:
            self._get(self._file_path(repo_id, commit, rel), sink, size, what=rel)

    @staticmethod
    def _file_path(repo_id: str, commit: str, rel: str) -> str:
        return f"{repo_id}/resolve/{quote(commit, safe='')}/{quote(rel)}"

    # ---- one bounded GET ------------------------------------------------------------------------
    def _remaining(self) -> float:
        left = self.limits.deadline - (time.monotonic() - self.started)
        if left <= 0:
            raise HubTimeoutError(
                f"The pull from {self.name} did not finish within {self.limits.deadline:g} s."
            )
        return left

    def _timeout(self) -> httpx.Timeout:
        left = self._remaining()
        return httpx.Timeout(
            connect=min(self.limits.connect_timeout, left),
            read=min(self.limits.read_timeout, left),
            write=min(self.limits.read_timeout, left),
            pool=min(self.limits.connect_timeout, left),
        )

    def _get(self, path: str, sink: Any, limit: int, *, what: str) -> bytes:
        """GET `path` under the hub, following redirects within it; the body into `sink` or returned."""
        url = self.endpoint.join(path)
        for _ in range(self.limits.max_redirects + 1):
            headers = {"user-agent": "adapterdock"}
            if self.token and _same_origin(url, self.endpoint):
                headers["authorization"] = f"Bearer {self.token}"
            try:
                with httpx.Client(timeout=self._timeout(), follow_redirects=False) as client:
                    with client.stream("GET", url, headers=headers) as response:
                        if response.status_code in _REDIRECTS:
                            url = self._redirect_target(url, response)
                            continue
                        if response.status_code >= 400:
                            response.read()
                            raise _status_error(what, self.name, response)
                        return self._read(response, sink, limit, what)
            except httpx.TimeoutException as exc:
                raise HubTimeoutError(
                    f"{self.name} stopped answering while sending {what} "
                    f"({type(exc).__name__}; read timeout {self.limits.read_timeout:g} s)."
                ) from exc
            except httpx.HTTPError as exc:
                raise HubError(f"Cannot reach {self.name} for {what}: {exc}.") from exc
        raise HubLimitError(f"{self.name} redirected {what} more than {self.limits.max_redirects} times.")

    def _redirect_target(self, url: httpx.URL, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location", "")
        target = url.join(location)
        if not self._allowed(target):
            raise HubLimitError(
                f"{self.name} redirected a download to {target.scheme}://{target.host}, which is not "
                "the hub; the redirect was not followed.",
                "Pull from the hub that holds the files, or put them on it.",
            )
        return target

    def _allowed(self, target: httpx.URL) -> bool:
        if _same_origin(target, self.endpoint):
            return True
        hub_host = self.endpoint.host
        if target.scheme != "https" or not any(hub_host == h for h in HF_HOSTS):
            return False
        return any(target.host == h or target.host.endswith("." + h) for h in HF_HOSTS)

    def _read(self, response: httpx.Response, sink: Any, limit: int, what: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HubLimitError(f"{self.name} sends {declared} bytes for {what}; at most {limit} expected.")
        chunks: list[bytes] = []
        got = 0
        for chunk in response.iter_bytes():  # as it arrives: the deadline is checked per read
            got += len(chunk)
            self.received += len(chunk)
            if got > limit:
                raise HubLimitError(f"{self.name} sends more than {limit} bytes for {what}.")
            if self.received > self.limits.max_bytes:
                raise HubLimitError(
                    f"The pull from {self.name} is over its cap of {self.limits.max_bytes} bytes.",
                    "Raise the pull's byte cap if this adapter is really that large.",
                )
            self._remaining()  # a hub that drips bytes still meets the deadline
            if sink is not None:
                sink.write(chunk)
            else:
                chunks.append(chunk)
        return b"".join(chunks)


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _status_error(what: str, endpoint: str, response: httpx.Response) -> HubError:
    """The typed error for a hub's 4xx/5xx, with the hub's own message (HF's `X-Error-Message`)."""
    status = response.status_code
    code = response.headers.get("x-error-code", "")
    message = response.headers.get("x-error-message") or _json_error(response) or response.reason_phrase
    if status in (401, 403):
        return HubAuthError(f"{what}: {endpoint} answered {status}: {message}")
    if code == "RepoNotFound" or (status == 404 and not code):
        return HubError(
            f"{what}: repo not found at {endpoint}.",
            "Check the repo id and --endpoint; private repos need --token (or HF_TOKEN).",
        )
    if code == "RevisionNotFound":
        return HubError(f"{what}: no such revision.", "Pull a branch, a tag such as v3, or a commit id.")
    if code == "EntryNotFound":
        return HubError(f"{what}: the file is not in the repo at {endpoint}.", "Push the adapter again.")
    return HubError(f"{what}: {endpoint} answered {status}: {message}")


def _json_error(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return str(error)[:500] if error else None
