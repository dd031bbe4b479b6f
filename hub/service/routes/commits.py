"""Commit routes: `preupload` (regular or LFS for each file) and `commit` (NDJSON operations, atomic).

A commit body is read whole (bounded), every inline file is stored as a blob first, every LFS file must have
been uploaded by this repo, and only then one storage transaction moves the branch. A request cut off at any
point leaves the branch where it was.
Boundary: parsing and validation of the NDJSON; `Storage.commit` does the atomic part.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from hub.service.auth import Grant
from hub.service.deps import (
    Caller,
    ServiceState,
    State,
    WriterJsonBody,
    base_url,
    read_body,
    repo_id_of,
    truthy,
)
from hub.service.errors import (
    BadRequestError,
    PayloadTooLargeError,
    RevisionNotFoundError,
    UnprocessableError,
)
from hub.service.names import SHA256_HEX, validate_folder, validate_path, validate_revision
from hub.service.records import (
    AddFile,
    CommitRecord,
    DeleteFile,
    DeleteFolder,
    FileRecord,
    Operation,
    git_blob_oid,
    lfs_pointer,
)
from hub.service.routes.repos import REPO, writable_repo

router = APIRouter()

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".png")


def upload_mode(path: str, size: int, sample: bytes, threshold: int) -> str:
    """`lfs` for weights, binary files and big files; `regular` for small text (configs, cards)."""
    if size >= threshold or b"\0" in sample or PurePosixPath(path).suffix.lower() in LFS_SUFFIXES:
        return "lfs"
    return "regular"


@router.post(REPO + "/preupload/{revision}")
def preupload(
    namespace: str, name: str, revision: str, body: WriterJsonBody, state: State, caller: Caller
) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    revision = validate_revision(revision)
    try:
        head = state.storage.resolve(repo_id, revision).oid
        existing = state.storage.files(head)
    except RevisionNotFoundError:
        head, existing = None, {}
    files = body.get("files")
    if not isinstance(files, list):
        raise BadRequestError("Field 'files' must be a list.")
    check_operation_count(len(files), state.limits.max_commit_operations)
    out = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("size"), int) or item["size"] < 0:
            raise BadRequestError("Each file needs a 'path' and a non-negative integer 'size'.")
        path = validate_path(item.get("path", ""))
        try:
            sample = base64.b64decode(item.get("sample") or "", validate=True)[:512]
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"Sample of {path!r} is not base64.") from exc
        mode = upload_mode(path, item["size"], sample, state.limits.lfs_threshold)
        out.append(
            {"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": _oid(existing.get(path), mode)}
        )
    return {"files": out, "commitOid": head}


def check_operation_count(count: int, limit: int) -> None:
    """Refuse a commit, preupload or LFS batch of more than `limit` operations (413)."""
    if count > limit:
        raise PayloadTooLargeError(
            f"A commit may hold at most {limit} operations.", "Split the upload into several commits."
        )


def _oid(record: FileRecord | None, mode: str) -> str | None:
    """The oid huggingface_hub compares with its local one to skip unchanged files."""
    if record is None:
        return None
    if mode == "lfs":
        return record.sha256
    return None if record.lfs else record.git_oid


@router.post(REPO + "/commit/{revision}")
async def commit(
    namespace: str, name: str, revision: str, request: Request, state: State, caller: Caller
) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    await run_in_threadpool(writable_repo, state, caller, repo_id)  # rights before reading the body
    branch = validate_revision(revision)
    if truthy(request.query_params.get("create_pr")):
        raise BadRequestError("Pull requests are not supported by this hub.", "Commit to a branch instead.")
    body = await read_body(request, state.limits.max_commit_body)
    record = await run_in_threadpool(_apply_commit, state, repo_id, branch, body, caller)
    return {
        "success": True,
        "commitOid": record.oid,
        "commitUrl": f"{base_url(request)}/{repo_id}/commit/{record.oid}",
        "commitMessage": record.summary,
        "hookOutput": "",
        "pullRequestUrl": None,
    }


def _apply_commit(
    state: ServiceState, repo_id: str, branch: str, body: bytes, caller: Grant | None
) -> CommitRecord:
    """Parse the NDJSON, store inline files as blobs, then commit everything in one transaction."""
    header: dict[str, Any] | None = None
    operations: list[Operation] = []
    for lineno, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if not isinstance(value, dict):
                raise TypeError("value is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise BadRequestError(
                f"Commit line {lineno} is not a {{key, value}} JSON object: {exc}."
            ) from exc
        if key == "header":
            header = value
        else:
            check_operation_count(len(operations) + 1, state.limits.max_commit_operations)
            operations.append(_operation(state, repo_id, key, value, lineno))
    if header is None or not str(header.get("summary", "")).strip():
        raise BadRequestError("The commit has no header with a non-empty 'summary'.")
    parent = header.get("parentCommit")
    if parent is not None and (not isinstance(parent, str) or not 5 <= len(parent) <= 40):
        raise BadRequestError(f"Invalid parentCommit {parent!r}.")
    return state.storage.commit(
        repo_id,
        branch,
        operations,
        summary=str(header["summary"])[:1000],
        description=str(header.get("description") or "")[:65536],
        author=caller.user if caller else None,
        parent_commit=parent,
    )


def _operation(state: ServiceState, repo_id: str, key: str, value: dict[str, Any], lineno: int) -> Operation:
    if key == "file":
        path = validate_path(value.get("path", ""))
        data = _decode_inline(value, path, state.limits.max_regular_file)
        sha256, size = state.storage.put_bytes(data)
        return AddFile(path, sha256, size, lfs=False, git_oid=git_blob_oid(data))
    if key == "lfsFile":
        path = validate_path(value.get("path", ""))
        oid = value.get("oid")
        if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_HEX.match(oid):
            raise BadRequestError(f"LFS file {path!r} needs a sha256 'oid' (64 lowercase hex).")
        size = value.get("size")
        if not state.storage.is_claimed(repo_id, oid):
            raise UnprocessableError(
                f"LFS object sha256:{oid} for {path!r} was not uploaded to {repo_id}.",
                "Upload it through the LFS batch endpoint first (create_commit in huggingface_hub does).",
            )
        known = state.storage.blob_size(oid)
        if known is None or (size is not None and size != known):
            raise UnprocessableError(f"LFS object sha256:{oid} for {path!r} is missing or has another size.")
        return AddFile(path, oid, known, lfs=True, git_oid=git_blob_oid(lfs_pointer(oid, known)))
    if key == "deletedFile":
        return DeleteFile(validate_path(value.get("path", "")))
    if key == "deletedFolder":
        return DeleteFolder(validate_folder(value.get("path", "")))
    raise BadRequestError(f"Commit line {lineno}: unknown operation {key!r}.")


def _decode_inline(value: dict[str, Any], path: str, limit: int) -> bytes:
    content = value.get("content", "")
    if not isinstance(content, str):
        raise BadRequestError(f"Content of {path!r} must be a string.")
    if len(content) > limit * 4 // 3 + 4:
        raise PayloadTooLargeError(f"Inline content of {path!r} is over {limit} bytes.")
    encoding = value.get("encoding", "utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"Content of {path!r} is not valid base64.") from exc
    if encoding in ("utf-8", "utf8"):
        return content.encode("utf-8")
    raise BadRequestError(f"Unknown encoding {encoding!r} for {path!r}.")
