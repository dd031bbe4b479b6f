"""Content-addressed blob files of the hub service: `blobs/<aa>/<bb>/<sha256>` under the service root.

A blob is received into `tmp/` while it is hashed, fsynced, checked against the sha256 it should have and
renamed into place, so a file under `blobs/` is always complete. `tmp/` is wiped at start-up (uploads cut
short by a crash); blobs found corrupted are moved to `quarantine/`. Also keeps the key that signs LFS
upload URLs (`secret`, mode 0600).
Boundary: files only; which blobs exist for the service is the SQLite index's business (`blob_index.py`,
`storage.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from hub.durable import fsync_dir, make_dirs, sha256_file
from hub.service.errors import CorruptBlobError, UnprocessableError

logger = logging.getLogger(__name__)


class BlobUpload:
    """A blob being received: bytes go to a tmp file while their sha256 is computed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._handle: BinaryIO = open(tmp_path, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._handle.write(chunk)
        self._digest.update(chunk)
        self.size += len(chunk)

    def close(self) -> str:
        """Flush and fsync; return the hex sha256 of what was written."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return self._digest.hexdigest()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink()


class BlobStore:
    """The blob files of one service root. Thread-safe."""

    def __init__(self, root: Path, *, clean_tmp: bool = True) -> None:
        """Open (creating) the blob folders under `root`; `clean_tmp` wipes uploads cut short by a crash
        (only the service itself at start-up: another process, such as `hub gc`, must leave them)."""
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        for folder in (self.root, self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            make_dirs(folder)
        for leftover in self.tmp_dir.iterdir() if clean_tmp else ():  # uploads cut short by a crash
            with contextlib.suppress(OSError):
                leftover.unlink()
        self.secret = self._load_secret()
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._verified_lock = threading.Lock()

    def _load_secret(self) -> bytes:
        path = self.root / "secret"
        if not path.exists():
            tmp = self.root / f".secret.{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # first writer wins, never overwritten
            tmp.unlink()
        return path.read_bytes()

    def path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256[2:4] / sha256

    def begin(self) -> BlobUpload:
        return BlobUpload(self.tmp_dir / f"{uuid.uuid4().hex}.part")

    def seal(self, upload: BlobUpload, expected_sha256: str | None = None) -> str:
        """Close an upload (its bytes fsynced) and check it against `expected_sha256`; return its sha256.

        Raises:
            UnprocessableError: the bytes do not hash to `expected_sha256` (the upload is discarded).
        """
        try:
            sha256 = upload.close()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise UnprocessableError(
                    f"Uploaded bytes hash to sha256 {sha256}, not {expected_sha256}.",
                    "The upload was truncated or altered in transit; upload the file again.",
                )
        except BaseException:
            upload.discard()
            raise
        return sha256

    def place(self, upload: BlobUpload, sha256: str) -> int:
        """Rename a sealed upload into `blobs/` (durably, new folders included); return its size."""
        try:
            target = self.path(sha256)
            make_dirs(target.parent)  # blobs/aa/ and blobs/aa/bb/, each fsynced into its parent
            os.replace(upload.tmp_path, target)
            fsync_dir(target.parent)
        except BaseException:
            upload.discard()
            raise
        with self._verified_lock:
            self._verified.pop(sha256, None)
        return upload.size

    def check_size(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        """Return the blob's path after checking only that it exists with `size` bytes.

        Raises:
            CorruptBlobError: the blob is missing or has another size.
        """
        path = self.path(sha256)
        try:
            actual = path.stat().st_size
        except FileNotFoundError as exc:
            raise CorruptBlobError(f"The stored bytes of {_what(sha256, path_in_repo)} are missing.") from exc
        if actual != size:
            raise CorruptBlobError(
                f"The stored bytes of {_what(sha256, path_in_repo)} are corrupted: "
                f"{actual} bytes on disk, {size} expected."
            )
        return path

    def verify(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        """Return the blob's path after checking its bytes against `sha256` (cached per inode and mtime).

        Raises:
            CorruptBlobError: the blob is missing, has another size, or other bytes.
        """
        path = self.check_size(sha256, size, path_in_repo)
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._verified_lock:
            if self._verified.get(sha256) == key:
                return path
        actual = sha256_file(path)
        if actual != sha256:
            raise CorruptBlobError(
                f"The stored bytes of {_what(sha256, path_in_repo)} are corrupted: "
                f"they hash to sha256:{actual}."
            )
        with self._verified_lock:
            self._verified[sha256] = key
        return path

    def remove(self, sha256: str) -> None:
        """Delete a blob's file (garbage collection; the index entry is the caller's)."""
        path = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)
        with self._verified_lock:
            self._verified.pop(sha256, None)

    def quarantine(self, sha256: str) -> None:
        """Move a corrupted blob aside (for inspection) so a new upload can replace it."""
        with contextlib.suppress(OSError):
            os.replace(self.path(sha256), self.quarantine_dir / f"{sha256}.{int(time.time())}")
        logger.error("blob sha256:%s was corrupted; moved to %s", sha256, self.quarantine_dir)


def _what(sha256: str, path_in_repo: str | None) -> str:
    return f"file {path_in_repo!r} (blob sha256:{sha256})" if path_in_repo else f"blob sha256:{sha256}"
