"""Units of the hub service without a server: name rules, token files and access decisions, the storage's
atomic commits and refs, blob integrity, ranges and upload modes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hub.errors import AdapterDockError
from hub.service.auth import Authenticator, TokenFileError, hash_token, parse_token_file
from hub.service.errors import (
    BadRequestError,
    ConflictError,
    CorruptBlobError,
    EntryNotFoundError,
    ForbiddenError,
    RangeNotSatisfiableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnauthorizedError,
    UnprocessableError,
)
from hub.service.names import validate_path, validate_repo_id, validate_revision
from hub.service.records import AddFile, DeleteFile, DeleteFolder, git_blob_oid
from hub.service.routes.commits import upload_mode
from hub.service.routes.files import parse_range
from hub.service.storage import Storage


@pytest.mark.parametrize("repo_id", ["acme/x", "a1/b-2.c_3", "Org/Name"])
def test_good_repo_ids(repo_id: str) -> None:
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id",
    ["x", "a/b/c", "acme/..", "acme/a..b", "/x", "acme/-x", "acme/x-", "api/x", "a\nb/x", "a/" + "x" * 97],
)
def test_bad_repo_ids(repo_id: str) -> None:
    with pytest.raises(BadRequestError) as info:
        validate_repo_id(repo_id)
    assert (
        isinstance(info.value, ValueError)
        and info.value.status == 400
        and "NAMESPACE/NAME" in str(info.value)
    )


@pytest.mark.parametrize("path", ["a.json", "sub/dir/b.safetensors", ".gitattributes", "x y.txt"])
def test_good_paths(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "..",
        "a/../b",
        "./a",
        "a//b",
        "a\\b",
        "a\x00b",
        "a\x1fb",
        ".git/HEAD",
        "x" * 1025,
        "a/" + "b" * 256,
    ],
)
def test_bad_paths(path: str) -> None:
    with pytest.raises(BadRequestError):
        validate_path(path)


@pytest.mark.parametrize("revision", ["main", "v3", "a1b2c3d", "release-1.0"])
def test_good_revisions(revision: str) -> None:
    assert validate_revision(revision) == revision


@pytest.mark.parametrize("revision", ["", "a/b", "..", "x..y", "b.lock", "-x", "a b"])
def test_bad_revisions(revision: str) -> None:
    with pytest.raises(BadRequestError):
        validate_revision(revision)


def test_token_file_lines_json_and_hashed_entries(tmp_path: Path) -> None:
    lines = tmp_path / "tokens.txt"
    digest = hash_token("s3cret")
    lines.write_text(f"# comment\nplain-token write acme/*,shared/* alice\nsha256:{digest} read\n\n")
    grants = parse_token_file(lines)
    assert grants[hash_token("plain-token")].user == "alice"
    assert grants[hash_token("plain-token")].repos == ("acme/*", "shared/*")
    assert grants[digest].access == "read" and grants[digest].repos == ("*",)
    assert "plain-token" not in repr(grants)  # only hashes are kept
    as_json = tmp_path / "tokens.json"
    as_json.write_text('[{"token": "t1", "access": "write", "repos": ["x/*"], "user": "u"}]')
    assert parse_token_file(as_json)[hash_token("t1")].can_write("x/y")


def test_token_file_errors_list_every_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.txt"
    bad.write_text("good write\nt2 admin\nsha256:abc read\n")
    with pytest.raises(TokenFileError) as info:
        parse_token_file(bad)
    assert "line 2" in str(info.value) and "line 3" in str(info.value) and "line 1" not in str(info.value)
    assert isinstance(info.value, AdapterDockError)


def test_access_decisions(tmp_path: Path) -> None:
    file = tmp_path / "t.txt"
    file.write_text("w write acme/*\nr read *\n")
    auth = Authenticator(parse_token_file(file))
    writer, reader = auth.identify("Bearer w"), auth.identify("bearer r")
    assert auth.identify(None) is None and auth.identify("Basic abc") is None
    with pytest.raises(UnauthorizedError):
        auth.identify("Bearer nope")
    auth.check_write(writer, "acme/x")
    with pytest.raises(ForbiddenError):
        auth.check_write(writer, "other/x")
    with pytest.raises(ForbiddenError):
        auth.check_write(reader, "acme/x")
    with pytest.raises(UnauthorizedError):
        auth.check_write(None, "acme/x")
    auth.check_read(None, "acme/x", private=False)
    auth.check_read(reader, "other/x", private=True)
    with pytest.raises(RepoNotFoundError):  # issue 20: unreadable private repos answer as missing ones
        auth.check_read(None, "acme/x", private=True)
    with pytest.raises(RepoNotFoundError):
        auth.check_read(writer, "other/x", private=True)
    open_auth = Authenticator(None)
    open_auth.check_write(open_auth.identify(None), "any/repo")


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage(tmp_path / "root")
    store.create_repo("acme/r", private=False, owner="alice")
    return store


def add(storage: Storage, path: str, data: bytes, lfs: bool = False) -> AddFile:
    sha, size = storage.put_bytes(data)
    return AddFile(path, sha, size, lfs, git_blob_oid(data))


def test_commit_moves_the_branch_and_keeps_history(storage: Storage) -> None:
    first = storage.resolve("acme/r", "main")
    second = storage.commit(
        "acme/r", "main", [add(storage, "a/x.txt", b"x"), add(storage, "a/y.txt", b"y")], "two"
    )
    assert second.parent == first.oid and storage.resolve("acme/r", "main") == second
    third = storage.commit("acme/r", "main", [DeleteFolder("a")], "drop")
    assert sorted(storage.files(third.oid)) == [".gitattributes"]
    assert sorted(storage.files(second.oid)) == [".gitattributes", "a/x.txt", "a/y.txt"]
    assert storage.resolve("acme/r", second.oid[:8]) == second
    assert [c.summary for c in storage.history(third.oid)] == ["drop", "two", "initial commit"]


def test_failed_commits_change_nothing(storage: Storage) -> None:
    head = storage.resolve("acme/r", "main")
    never_uploaded = AddFile("w.bin", "0" * 64, 10, True, "1" * 40)
    with pytest.raises(UnprocessableError):
        storage.commit("acme/r", "main", [add(storage, "ok.txt", b"ok"), never_uploaded], "bad")
    with pytest.raises(EntryNotFoundError):
        storage.commit("acme/r", "main", [DeleteFile("missing.txt")], "bad")
    with pytest.raises(ConflictError):
        storage.commit("acme/r", "main", [add(storage, "ok.txt", b"ok")], "bad", parent_commit="f" * 40)
    with pytest.raises(RevisionNotFoundError):
        storage.commit("acme/r", "nobranch", [add(storage, "ok.txt", b"ok")], "bad")
    assert storage.resolve("acme/r", "main") == head and list(storage.files(head.oid)) == [".gitattributes"]


def test_tags_never_move_and_repos_are_unique(storage: Storage) -> None:
    head = storage.resolve("acme/r", "main").oid
    storage.create_ref("acme/r", "tag", "v1", head)
    storage.commit("acme/r", "main", [add(storage, "b.txt", b"b")], "next")
    with pytest.raises(ConflictError):
        storage.create_ref("acme/r", "tag", "v1", storage.resolve("acme/r", "main").oid)
    assert storage.resolve("acme/r", "v1").oid == head
    with pytest.raises(ConflictError):
        storage.create_repo("acme/r", private=True, owner=None)


def test_corrupt_blobs_are_caught_and_quarantined(storage: Storage) -> None:
    data = b"weights" * 1000
    sha, size = storage.put_bytes(data)
    assert storage.verify_blob(sha, size).read_bytes() == data
    path = storage.blobs.path(sha)
    path.write_bytes(data[:-1] + b"!")
    with pytest.raises(CorruptBlobError, match="corrupted"):
        storage.verify_blob(sha, size, "w.safetensors")
    assert storage.has_blob(sha, size) is False  # quarantined, so a client will upload it again
    assert not path.exists() and list(storage.blobs.quarantine_dir.iterdir())
    upload = storage.begin_upload()
    upload.write(b"something else")
    with pytest.raises(UnprocessableError):
        storage.finish_upload(upload, expected_sha256=hashlib.sha256(data).hexdigest())
    assert list(storage.blobs.tmp_dir.iterdir()) == []


def test_ranges() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    for bad in ("bytes=100-", "bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiableError):
            parse_range(bad, 100)


def test_upload_modes() -> None:
    assert upload_mode("adapter_config.json", 300, b"{}", 1 << 20) == "regular"
    assert upload_mode("adapter_model.safetensors", 300, b"x", 1 << 20) == "lfs"
    assert upload_mode("blob.dat", 300, b"a\0b", 1 << 20) == "lfs"
    assert upload_mode("big.txt", 2 << 20, b"text", 1 << 20) == "lfs"
