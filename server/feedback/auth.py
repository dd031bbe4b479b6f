"""Raters: which paths are the rating paths, the rater tokens file, and whose judgement a request records.

A rater token stands for one rater id: `--rater-token` for one rater (`SINGLE_RATER_ID`), or a tokens file
(`read_rater_tokens`) for many. `rater_for` takes the rater of a request from its token, never from what the
client sends; the API key (an operator's script) names the rater in the request. Checking credentials is
`server.access`'s (applied by the middleware before any body is read). Boundary: the rule only; no routes,
no storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.errors import ForbiddenError, ServerConfigError
from server.feedback.records import MAX_RATER_LENGTH, InvalidJudgementError, check_rater

PAGE_PATH = "/feedback"
RATER_PATHS = frozenset({PAGE_PATH, "/v1/feedback", "/v1/feedback/next", "/v1/feedback/progress"})
"""The rating page and the endpoints it calls: a rater token, the API key or the admin key opens them."""
SINGLE_RATER_ID = "rater"
"""The rater id of the one token given with `--rater-token` (a tokens file names each rater)."""


def read_rater_tokens(path: Path) -> dict[str, str]:
    """Parse a rater tokens file: one `rater_id:token` per line; blank lines and `#` comments are skipped.

    Returns:
        rater id -> token.

    Raises:
        ServerConfigError: listing every bad line by number (never showing a token).
    """
    tokens: dict[str, str] = {}
    problems = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rater, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or not token:
            problems.append(f"line {number} is not `rater_id:token`")
        elif not rater or len(rater) > MAX_RATER_LENGTH or not rater.isprintable():
            problems.append(f"line {number}: the rater id is not 1 to {MAX_RATER_LENGTH} printable chars")
        elif rater in tokens:
            problems.append(f"line {number}: rater {rater!r} appears twice")
        else:
            tokens[rater] = token
    if problems:
        raise ServerConfigError(f"Rater tokens file {path}: " + "; ".join(problems) + ".")
    return tokens


def rater_for(principal: Any, given: str | None) -> str:
    """The rater a request acts as: its token's rater id, else the name it sends (API key, open server).

    Args:
        principal: the request's `server.access.Principal` (None on an app without the middleware).
        given: the `rater` the client sent, if any.

    Raises:
        ForbiddenError: a rater token used to act as another rater.
        InvalidJudgementError: no rater named where the credential names none.
    """
    token_rater = getattr(principal, "rater", None)
    if token_rater is not None:
        if given is not None and given.strip() != token_rater:
            raise ForbiddenError(
                f"This rater token belongs to rater {token_rater!r}; it cannot act as {given.strip()!r}.",
                "Leave `rater` out (the token says who you are), or send your own rater id.",
            )
        return token_rater
    if given is None:
        raise InvalidJudgementError("Name the rater: send `rater` (rater tokens name themselves).")
    return check_rater(given)
