"""File download: `HEAD`/`GET /{repo_id}/resolve/{revision}/{path}` with the headers huggingface_hub needs.

Headers: `ETag` (sha256 for LFS files, git oid otherwise), `X-Repo-Commit` (the resolved commit),
`X-Linked-Etag` and `X-Linked-Size` for LFS files, `Content-Length`, `Accept-Ranges`; a single
`Range: bytes=...` is answered with 206. A GET checks the bytes against their sha256 before serving them
(cached per blob inode and mtime), so a damaged blob gives a 500 naming the file, never wrong weights;
HEAD only checks the size, because huggingface_hub retries a failed HEAD for ~20 s.
Boundary: reading; nothing here writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hub.service.deps import Caller, State, repo_id_of
from hub.service.errors import EntryNotFoundError, RangeNotSatisfiableError
from hub.service.names import validate_path, validate_revision
from hub.service.records import FileRecord
from hub.service.routes.repos import readable_repo

router = APIRouter()

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, None for the whole file.

    Raises:
        RangeNotSatisfiableError: a range outside the file, or several ranges.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiableError(f"Unsupported Range {header!r}; use a single bytes=START-END.")
    start_s, end_s = match.groups()
    if start_s == "":
        length = int(end_s)
        if length == 0:
            raise RangeNotSatisfiableError(f"Range {header!r} asks for no bytes.")
        start, end = max(size - length, 0), size - 1
    else:
        start = int(start_s)
        end = min(int(end_s), size - 1) if end_s else size - 1
    if start >= size or start > end:
        err = RangeNotSatisfiableError(f"Range {header!r} is outside the file of {size} bytes.")
        err.headers = {"Content-Range": f"bytes */{size}"}
        raise err
    return start, end


def _stream(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
async def resolve_file(
    namespace: str, name: str, revision: str, path: str, request: Request, state: State, caller: Caller
) -> Response:
    repo = await run_in_threadpool(readable_repo, state, caller, repo_id_of(namespace, name))
    commit = await run_in_threadpool(state.storage.resolve, repo.repo_id, validate_revision(revision))
    path = validate_path(path)
    try:
        record: FileRecord = await run_in_threadpool(state.storage.file, commit.oid, path)
    except EntryNotFoundError as exc:
        exc.headers = {"X-Repo-Commit": commit.oid}
        raise
    if request.method == "HEAD":  # metadata only: a cheap size check (clients retry 5xx on HEAD)
        blob = await run_in_threadpool(state.storage.check_blob_size, record.sha256, record.size, path)
    else:
        blob = await run_in_threadpool(state.storage.verify_blob, record.sha256, record.size, path)
    headers = {
        "ETag": f'"{record.etag}"',
        "X-Repo-Commit": commit.oid,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(Path(path).name)}",
    }
    if record.lfs:
        headers["X-Linked-Etag"] = f'"{record.sha256}"'
        headers["X-Linked-Size"] = str(record.size)
    byte_range = parse_range(request.headers.get("range"), record.size)
    start, end = byte_range if byte_range else (0, record.size - 1)
    status = 200
    if byte_range:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{record.size}"
    headers["Content-Length"] = str(max(end - start + 1, 0))
    if request.method == "HEAD" or record.size == 0:
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_stream(blob, start, end), status_code=status, headers=headers)
