"""Errors of the self-hosted hub service, each bound to an HTTP status and a Hugging Face error code.

Boundary: storage, auth and routes raise these; only `hub.service.app` turns them into responses. They
subclass `hub.errors.AdapterDockError` (so `str(err)` carries the remedy) and the closest builtin. `hf_code`
is the `X-Error-Code` huggingface_hub maps to its own exceptions (RepoNotFound -> RepositoryNotFoundError).
"""

from __future__ import annotations

from hub.errors import AdapterDockError


class ServiceError(AdapterDockError):
    """Base of the service's errors: an HTTP status, an optional HF error code, a message with its remedy."""

    status: int = 500
    hf_code: str | None = None
    headers: dict[str, str] | None = None
    """Extra response headers (e.g. `X-Repo-Commit` on a missing file), set on the instance."""
    body: dict[str, object] | None = None
    """Extra JSON fields (e.g. the `url` HF sends with "repo exists"), set on the instance."""


class BadRequestError(ServiceError, ValueError):
    """A malformed request: bad repo or file name, bad JSON, unknown operation."""

    status = 400


class UnauthorizedError(ServiceError, PermissionError):
    """No token where one is needed, or a token the service does not know."""

    status = 401
    default_remedy = "Pass a valid token (HF_TOKEN, --token, or `Authorization: Bearer TOKEN`)."


class ForbiddenError(ServiceError, PermissionError):
    """A valid token without the rights the request needs."""

    status = 403
    default_remedy = "Ask the hub's operator for a token with access to this repo (see --token-file)."


class RepoNotFoundError(ServiceError, LookupError):
    """No repo by that id."""

    status = 404
    hf_code = "RepoNotFound"
    default_remedy = "Check the repo id, or create it first (HfApi.create_repo)."


class RevisionNotFoundError(ServiceError, LookupError):
    """No branch, tag or commit by that name in the repo."""

    status = 404
    hf_code = "RevisionNotFound"
    default_remedy = "List the repo's branches and tags with HfApi.list_repo_refs."


class EntryNotFoundError(ServiceError, LookupError):
    """No file or folder by that path at the revision."""

    status = 404
    hf_code = "EntryNotFound"
    default_remedy = "List the files with HfApi.list_repo_files."


class ConflictError(ServiceError, ValueError):
    """The repo, branch or tag already exists, or the branch moved under a commit that named its parent."""

    status = 409


class PayloadTooLargeError(ServiceError, ValueError):
    """A request body larger than the service accepts."""

    status = 413
    default_remedy = "Upload large files through LFS (huggingface_hub does so for binary files)."


class RangeNotSatisfiableError(ServiceError, ValueError):
    """A Range header outside the file."""

    status = 416


class UnprocessableError(ServiceError, ValueError):
    """A well-formed request the service cannot act on, e.g. a commit naming an LFS object never uploaded."""

    status = 422


class CorruptBlobError(ServiceError, OSError):
    """A stored blob whose bytes no longer match its sha256: the disk was damaged or edited."""

    status = 500
    hf_code = "CorruptedBlob"
    default_remedy = (
        "Restore the service root from a backup, or push the file again (a new commit re-uploads it)."
    )
