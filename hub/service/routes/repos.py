"""Repo routes of the HF Hub API subset: create/delete/settings, info, refs, tags, branches, tree, whoami.

Shapes follow what huggingface_hub 2.x parses (`ModelInfo`, `RepoFile`/`RepoFolder`, `GitRefs`).
Boundary: validation, auth checks and JSON shaping; storage does the work.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import parse_qs

import yaml
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from hub.service.auth import Grant
from hub.service.catalog import read_card, repo_tags, split_front_matter
from hub.service.deps import (
    Caller,
    JsonBody,
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
    ConflictError,
    EntryNotFoundError,
    RepoNotFoundError,
    UnauthorizedError,
)
from hub.service.names import validate_folder, validate_path, validate_repo_id, validate_revision
from hub.service.records import CommitRecord, FileRecord, RepoRecord

router = APIRouter()

REPO = "/api/models/{namespace}/{name}"
VERSION_TAG = re.compile(r"v\d+")
"""Tags `adapterdock hub push` makes for each version: immutable once made."""


def readable_repo(state: State, caller: Grant | None, repo_id: str) -> RepoRecord:
    """The repo, after checking the caller may read it (a private repo it may not read is "not found")."""
    try:
        repo = state.storage.get_repo(repo_id)
    except RepoNotFoundError:
        raise RepoNotFoundError(f"Repository {repo_id} not found.") from None
    state.auth.check_read(caller, repo_id, repo.private)
    return repo


def writable_repo(state: State, caller: Grant | None, repo_id: str) -> RepoRecord:
    """The repo, after checking the caller may write it (auth first: no existence leak to strangers)."""
    state.auth.check_write(caller, repo_id)
    return state.storage.get_repo(repo_id)


def _only_models(repo_type: Any) -> None:
    if repo_type not in (None, "model"):
        raise BadRequestError(
            f"Repo type {repo_type!r} is not supported.", "This hub hosts model repos only."
        )


@router.post("/api/repos/create")
def create_repo(body: WriterJsonBody, request: Request, state: State, caller: Caller) -> dict[str, Any]:
    _only_models(body.get("type"))
    name, organization = body.get("name"), body.get("organization")
    if not isinstance(name, str):
        raise BadRequestError("Field 'name' is required.")
    if organization is None:
        if caller is None:
            state.auth.check_write(None, name)  # 401: writing needs a token
        if state.auth.open:
            raise BadRequestError(
                f"Repo {name!r} has no namespace.", "Create it as NAMESPACE/NAME (e.g. acme/my-adapter)."
            )
        organization = caller.user
    repo_id = validate_repo_id(f"{organization}/{name}")
    state.auth.check_write(caller, repo_id)
    private = body.get("visibility") == "private" or body.get("private") is True
    url = f"{base_url(request)}/{repo_id}"
    try:
        state.storage.create_repo(repo_id, private=private, owner=caller.user if caller else None)
    except ConflictError as exc:
        exc.body = {"url": url}  # huggingface_hub's create_repo(exist_ok=True) reads it
        raise
    return {"url": url, "name": repo_id, "id": repo_id}


@router.delete("/api/repos/delete")
def delete_repo(body: WriterJsonBody, state: State, caller: Caller) -> dict[str, Any]:
    _only_models(body.get("type"))
    repo_id = validate_repo_id(f"{body.get('organization')}/{body.get('name')}")
    writable_repo(state, caller, repo_id)
    state.storage.delete_repo(repo_id)
    return {}


@router.put(REPO + "/settings")
def update_settings(namespace: str, name: str, body: WriterJsonBody, state: State, caller: Caller) -> dict:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    visibility = body.get("visibility")
    private = body.get("private") if visibility is None else visibility == "private"
    if isinstance(private, bool):
        state.storage.set_private(repo_id, private)
    return {}


@router.get("/api/whoami-v2")
def whoami(state: State, caller: Caller) -> dict[str, Any]:
    if caller is None:
        raise UnauthorizedError("Invalid user token: no token was sent.")
    return {
        "type": "user",
        "id": caller.user,
        "name": caller.user,
        "fullname": caller.user,
        "email": None,
        "orgs": [],
        "isPro": False,
        "auth": {"type": "access_token", "accessToken": {"displayName": caller.user, "role": caller.access}},
    }


@router.post("/api/validate-yaml")
def validate_yaml(body: JsonBody) -> dict[str, Any]:
    try:
        split_front_matter(str(body.get("content", "")))
    except (ValueError, yaml.YAMLError) as exc:
        raise BadRequestError(f"Invalid metadata in README.md: {exc}") from exc
    return {"errors": [], "warnings": []}


@router.get("/api/models")
def list_models(
    state: State, caller: Caller, search: str | None = None, author: str | None = None
) -> list[dict[str, Any]]:
    out = []
    for repo in state.storage.list_repos():
        if repo.private and (caller is None or not caller.can_read(repo.repo_id)):
            continue
        if author and repo.repo_id.split("/")[0] != author:
            continue
        if search and search.lower() not in repo.repo_id.lower():
            continue
        out.append({"id": repo.repo_id, "modelId": repo.repo_id, "private": repo.private})
    return out


def _repo_info(state: State, request: Request, repo: RepoRecord, commit: CommitRecord) -> dict[str, Any]:
    files = state.storage.files(commit.oid)
    card = read_card(state.storage, files)
    info: dict[str, Any] = {
        "_id": repo.repo_id,
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.oid,
        "lastModified": commit.created_at,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": repo_tags(card),
        "library_name": card.meta.get("library_name"),
        "pipeline_tag": card.meta.get("pipeline_tag"),
        "cardData": card.meta or None,
        "siblings": [_sibling(f) for f in files.values()],
        "usedStorage": sum(f.size for f in files.values()),
    }
    if card.manifest is not None:
        info["adapterdock"] = card.manifest.to_dict()
    return info


def _sibling(record: FileRecord) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": record.path, "size": record.size, "blobId": record.git_oid}
    if record.lfs:
        sibling["lfs"] = {"size": record.size, "sha256": record.sha256, "pointerSize": record.pointer_size}
    return sibling


@router.get(REPO)
def repo_info(namespace: str, name: str, request: Request, state: State, caller: Caller) -> dict[str, Any]:
    repo = readable_repo(state, caller, repo_id_of(namespace, name))
    return _repo_info(state, request, repo, state.storage.resolve(repo.repo_id, "main"))


@router.get(REPO + "/revision/{revision}")
def repo_info_at(
    namespace: str, name: str, revision: str, request: Request, state: State, caller: Caller
) -> dict[str, Any]:
    repo = readable_repo(state, caller, repo_id_of(namespace, name))
    commit = state.storage.resolve(repo.repo_id, validate_revision(revision))
    return _repo_info(state, request, repo, commit)


@router.get(REPO + "/refs")
def list_refs(namespace: str, name: str, state: State, caller: Caller) -> dict[str, Any]:
    repo = readable_repo(state, caller, repo_id_of(namespace, name))
    refs = state.storage.refs(repo.repo_id)

    def fmt(kind: str, prefix: str) -> list[dict[str, str]]:
        return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": oid} for n, oid in refs[kind]]

    return {
        "branches": fmt("branch", "refs/heads/"),
        "tags": fmt("tag", "refs/tags/"),
        "converts": [],
        "pullRequests": [],
    }


@router.post(REPO + "/tag/{revision}")
def create_tag(
    namespace: str, name: str, revision: str, body: WriterJsonBody, state: State, caller: Caller
) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    tag = validate_revision(str(body.get("tag", "")))
    commit = state.storage.resolve(repo_id, validate_revision(revision))
    state.storage.create_ref(repo_id, "tag", tag, commit.oid)
    return {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.oid}


@router.delete(REPO + "/tag/{tag}")
def delete_tag(namespace: str, name: str, tag: str, state: State, caller: Caller) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    if VERSION_TAG.fullmatch(tag):
        raise ConflictError(
            f"Tag {tag!r} of {repo_id} names an adapter version; version tags never move or go away.",
            "Push the new content as a new version (a new v<N>), or delete the whole repo.",
        )
    state.storage.delete_ref(repo_id, "tag", validate_revision(tag))
    return {}


@router.post(REPO + "/branch/{branch}")
def create_branch(
    namespace: str, name: str, branch: str, body: WriterJsonBody, state: State, caller: Caller
) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    start = validate_revision(str(body.get("startingPoint") or "main"))
    commit = state.storage.resolve(repo_id, start)
    state.storage.create_ref(repo_id, "branch", validate_revision(branch), commit.oid)
    return {}


@router.delete(REPO + "/branch/{branch}")
def delete_branch(namespace: str, name: str, branch: str, state: State, caller: Caller) -> dict[str, Any]:
    repo_id = repo_id_of(namespace, name)
    writable_repo(state, caller, repo_id)
    if branch == "main":
        raise BadRequestError("The main branch cannot be deleted.")
    state.storage.delete_ref(repo_id, "branch", validate_revision(branch))
    return {}


def _file_entry(record: FileRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": record.git_oid, "size": record.size, "path": record.path}
    if record.lfs:
        entry["lfs"] = {"oid": record.sha256, "size": record.size, "pointerSize": record.pointer_size}
    return entry


def _folder_entry(path: str, files: dict[str, FileRecord]) -> dict[str, Any]:
    prefix = path + "/"
    listing = "".join(f"{p}\0{f.git_oid}\n" for p, f in files.items() if p.startswith(prefix))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def tree_entries(files: dict[str, FileRecord], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under `folder` ("" for the root), as `/tree` lists them.

    Raises:
        EntryNotFoundError: `folder` is not a folder of this commit.
    """
    prefix = folder + "/" if folder else ""
    under = [p for p in files if p.startswith(prefix)]
    if folder and not under:
        raise EntryNotFoundError(f"Folder {folder!r} not found.")
    folders: set[str] = set()
    entries: list[dict[str, Any]] = []
    for path in under:
        rest = path[len(prefix) :].split("/")
        for depth in range(1, len(rest)):
            if recursive or depth == 1:
                folders.add(prefix + "/".join(rest[:depth]))
        if recursive or len(rest) == 1:
            entries.append(_file_entry(files[path]))
    return [_folder_entry(f, files) for f in sorted(folders)] + entries


@router.get(REPO + "/tree/{revision}")
@router.get(REPO + "/tree/{revision}/{path:path}")
def list_tree(
    namespace: str,
    name: str,
    revision: str,
    state: State,
    caller: Caller,
    path: str = "",
    recursive: str | None = None,
) -> list[dict[str, Any]]:
    repo = readable_repo(state, caller, repo_id_of(namespace, name))
    commit = state.storage.resolve(repo.repo_id, validate_revision(revision))
    folder = validate_folder(path) if path.strip("/") else ""
    return tree_entries(state.storage.files(commit.oid), folder, truthy(recursive))


@router.post(REPO + "/paths-info/{revision}")
async def paths_info(
    namespace: str, name: str, revision: str, request: Request, state: State, caller: Caller
) -> list[dict[str, Any]]:
    repo = await run_in_threadpool(readable_repo, state, caller, repo_id_of(namespace, name))
    body = await read_body(request, state.limits.max_json_body)  # only once the caller may read the repo
    return await run_in_threadpool(_paths_info, state, repo, revision, body)


def _paths_info(state: ServiceState, repo: RepoRecord, revision: str, body: bytes) -> list[dict[str, Any]]:
    form = parse_qs(body.decode("utf-8", errors="replace"))
    commit = state.storage.resolve(repo.repo_id, validate_revision(revision))
    files = state.storage.files(commit.oid)
    out: list[dict[str, Any]] = []
    for raw in form.get("paths", []):
        path = validate_path(raw.strip("/"))
        if path in files:
            out.append(_file_entry(files[path]))
        elif any(p.startswith(path + "/") for p in files):
            out.append(_folder_entry(path, files))
    return out


@router.get(REPO + "/commits/{revision}")
def list_commits(namespace: str, name: str, revision: str, state: State, caller: Caller) -> list[dict]:
    repo = readable_repo(state, caller, repo_id_of(namespace, name))
    head = state.storage.resolve(repo.repo_id, validate_revision(revision))
    return [
        {
            "id": c.oid,
            "title": c.summary,
            "message": c.description,
            "date": c.created_at,
            "authors": [{"user": c.author}] if c.author else [],
        }
        for c in state.storage.history(head.oid)
    ]
