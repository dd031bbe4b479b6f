"""Durable files: written all or nothing, fsynced into their folders, checked by sha256.

`write_atomic` (a temporary file beside the target, fsynced, renamed over it), `make_dirs` (`mkdir -p` with
each new folder fsynced into its parent), `fsync_dir`, `fsync_tree` and `sha256_file`. The local registry
(`hub.store`), the hub service's blobs (`hub.service.blobs`) and the server's small state files use them.
Boundary: the os and hashlib only; no manifests, no registry layout.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p path`, durably: each folder created is fsynced into its parent, so it survives a crash.

    A rename into a new folder is only durable once that folder's own entry in its parent is.
    """
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` all or nothing: a hidden temporary file beside it, fsynced, renamed over it.

    Readers see the old content or the new, never a torn file; on any error the temporary file is removed.
    """
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """Make a file's bytes durable; for a folder, every file below it and every folder's entries."""
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
        fsync_dir(path)  # the entries of a sub-folder, not only its files' bytes
        return
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
