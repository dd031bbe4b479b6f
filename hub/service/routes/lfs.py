"""Git LFS routes: the batch endpoint, the signed upload URL it hands out, and the verify step.

huggingface_hub PUTs file bytes to the `href` of the batch answer without any Authorization header (on the
real Hub it is a pre-signed S3 URL), so our href carries its own HMAC signature over repo, oid, size and
expiry, made with the root's secret. Uploaded bytes are hashed while they stream to a tmp file and only
enter the blob store when they match the oid and size the batch call announced.
Boundary: the LFS wire protocol; `Storage` keeps the blobs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hub.service.deps import Caller, State, WriterJsonBody, base_url, repo_id_of
from hub.service.errors import (
    BadRequestError,
    ForbiddenError,
    PayloadTooLargeError,
    UnprocessableError,
)
from hub.service.names import SHA256_HEX
from hub.service.routes.commits import check_operation_count
from hub.service.routes.repos import writable_repo

router = APIRouter()

LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"
_FLUSH_BYTES = 1 << 20


def sign(secret: bytes, repo_id: str, oid: str, size: int, expires: int) -> str:
    """HMAC-SHA256 of what an upload URL allows, so only the batch endpoint can mint one."""
    message = f"{repo_id}\n{oid}\n{size}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch")
def lfs_batch(
    namespace: str, name: str, body: WriterJsonBody, request: Request, state: State, caller: Caller
) -> JSONResponse:
    repo_id = repo_id_of(namespace, name)
    if body.get("operation") != "upload":
        raise BadRequestError(
            f"LFS operation {body.get('operation')!r} is not supported.",
            "Download files through /{repo_id}/resolve/{revision}/{path}.",
        )
    if body.get("hash_algo", "sha256") != "sha256":
        raise BadRequestError("Only sha256 LFS objects are supported.")
    writable_repo(state, caller, repo_id)
    objects = body.get("objects")
    if not isinstance(objects, list):
        raise BadRequestError("Field 'objects' must be a list.")
    check_operation_count(len(objects), state.limits.max_commit_operations)
    answers = [_answer(state, request, repo_id, obj) for obj in objects]
    return JSONResponse(
        {"transfer": "basic", "objects": answers, "hash_algo": "sha256"}, media_type=LFS_MEDIA_TYPE
    )


def _answer(state: State, request: Request, repo_id: str, obj: Any) -> dict[str, Any]:
    oid = obj.get("oid") if isinstance(obj, dict) else None
    size = obj.get("size") if isinstance(obj, dict) else None
    if not isinstance(oid, str) or not SHA256_HEX.match(oid) or not isinstance(size, int) or size < 0:
        return {
            "oid": str(oid),
            "size": size if isinstance(size, int) else 0,
            "error": {
                "code": 422,
                "message": "oid must be a sha256 (64 lowercase hex) and size an integer >= 0",
            },
        }
    if size > state.limits.max_lfs_object:
        return {
            "oid": oid,
            "size": size,
            "error": {
                "code": 413,
                "message": f"object is over the limit of {state.limits.max_lfs_object} bytes",
            },
        }
    if state.storage.is_claimed(repo_id, oid) and state.storage.has_blob(oid, size):
        return {"oid": oid, "size": size, "authenticated": True}  # no actions: already here
    expires = int(time.time()) + state.limits.upload_url_ttl
    query = urlencode(
        {"size": size, "expires": expires, "sig": sign(state.storage.secret, repo_id, oid, size, expires)}
    )
    root = base_url(request)
    return {
        "oid": oid,
        "size": size,
        "authenticated": True,
        "actions": {
            "upload": {
                "href": f"{root}/api/lfs/upload/{repo_id}/{oid}?{query}",
                "expires_in": state.limits.upload_url_ttl,
            },
            "verify": {"href": f"{root}/api/lfs/verify/{repo_id}", "header": {}},
        },
    }


@router.put("/api/lfs/upload/{namespace}/{name}/{oid}")
async def lfs_upload(
    namespace: str, name: str, oid: str, request: Request, state: State, size: int, expires: int, sig: str
) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    if not SHA256_HEX.match(oid):
        raise BadRequestError(f"Invalid LFS oid {oid!r}.")
    expected = sign(state.storage.secret, repo_id, oid, size, expires)
    # bytes, not str: compare_digest raises TypeError on a str with non-ASCII characters
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", errors="replace")):
        raise ForbiddenError(
            "The upload URL's signature is invalid.", "Ask the LFS batch endpoint for a new URL."
        )
    if expires < time.time():
        raise ForbiddenError("The upload URL has expired.", "Ask the LFS batch endpoint for a new URL.")
    upload = await run_in_threadpool(state.storage.begin_upload)
    try:
        buffer = bytearray()
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > size:
                raise PayloadTooLargeError(
                    f"Upload of sha256:{oid} sends more than the announced {size} bytes."
                )
            buffer += chunk
            if len(buffer) >= _FLUSH_BYTES:
                await run_in_threadpool(upload.write, bytes(buffer))
                buffer.clear()
        await run_in_threadpool(upload.write, bytes(buffer))
        if received != size:
            raise UnprocessableError(f"Upload of sha256:{oid} sent {received} bytes, {size} were announced.")
    except BaseException:
        await run_in_threadpool(upload.discard)
        raise
    await run_in_threadpool(state.storage.finish_upload, upload, oid)
    await run_in_threadpool(state.storage.claim, repo_id, oid)
    return {"oid": oid, "size": size}


@router.post("/api/lfs/verify/{namespace}/{name}")
def lfs_verify(namespace: str, name: str, body: WriterJsonBody, state: State, caller: Caller) -> dict:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    oid, size = body.get("oid"), body.get("size")
    if not isinstance(oid, str) or not SHA256_HEX.match(oid) or not isinstance(size, int):
        raise BadRequestError("Verify needs a sha256 'oid' and an integer 'size'.")
    present = state.storage.has_blob(oid, size)
    if not present or not state.storage.is_claimed(repo_id, oid):
        raise UnprocessableError(
            f"LFS object sha256:{oid} ({size} bytes) was not received.", "Upload it again."
        )
    return {"oid": oid, "size": size}
