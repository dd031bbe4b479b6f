"""Who may call what: the API key, the admin key and the rater tokens, and the paths each one opens.

- inference and everything else: the API key (`--api-key`) or the admin key; open without an API key;
- the rating page and endpoints (`RATER_PATHS`): a rater token, the API key or the admin key; open only on
  a server with neither an API key nor rater tokens. A rater token stands for one rater id
  (`Principal.rater`), so a rater's identity comes from the token, never from a field the client sends;
- `POST /v1/feedback/pairs` (it generates text): the API key or the admin key; without an API key, a rater
  token or the admin key once rater tokens exist, so no feedback route is open while feedback credentials do;
- pinning, unpinning and unloading adapters (`is_admin_path`): the admin key (`--admin-key`) when the server
  has one, else the API key; an inference key on an admin path is a 403. `POST /v1/adapters/load` with
  `pin: true` is checked by its route (the body says whether it pins).

Every comparison is constant-time and against every credential (no short-circuit). The page `/feedback`
also accepts HTTP Basic (the token as the password) so a browser can open it. Rater ids and the tokens file
format are `server.feedback.auth`'s. Boundary: the rule only; the ASGI middleware
(`server.middleware.AccessMiddleware`) applies it before any body is read.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from server.config import ServerConfig
from server.errors import AuthenticationError, ForbiddenError
from server.feedback.auth import PAGE_PATH, RATER_PATHS, SINGLE_RATER_ID

ADMIN, USER, RATER, ANONYMOUS = "admin", "user", "rater", "anonymous"
PUBLIC_PATHS = frozenset({"/health"})
"""Served to anyone."""
PAIRS_PATH = "/v1/feedback/pairs"


@dataclass(frozen=True)
class Principal:
    """Who a request is: its role, and for a rater token the rater id it stands for."""

    role: str
    """ADMIN, USER, RATER or ANONYMOUS (a server without credentials for this path)."""
    rater: str | None = None


def is_admin_path(method: str, path: str) -> bool:
    """Pin, unpin and unload: `POST /v1/adapters/{ref}/pin|unpin` and `DELETE /v1/adapters/{ref}`."""
    if not path.startswith("/v1/adapters/"):
        return False
    return method == "DELETE" or (method == "POST" and path.endswith(("/pin", "/unpin")))


class Access:
    """The server's credentials and the rule of which role opens which path."""

    def __init__(self, config: ServerConfig) -> None:
        raters = dict(config.rater_tokens)
        if config.rater_token:
            raters.setdefault(SINGLE_RATER_ID, config.rater_token)
        self._creds: list[tuple[bytes, Principal]] = [
            (token.encode(), Principal(RATER, rater)) for rater, token in raters.items()
        ]
        if config.api_key:
            self._creds.append((config.api_key.encode(), Principal(USER)))
        if config.admin_key:
            self._creds.append((config.admin_key.encode(), Principal(ADMIN)))
        self.has_api_key, self.has_admin_key = bool(config.api_key), bool(config.admin_key)
        self.has_raters = bool(raters)

    @property
    def enabled(self) -> bool:
        """Whether any credential is configured (else every path is open)."""
        return bool(self._creds)

    def identify(self, authorization: str, *, basic: bool = False) -> Principal | None:
        """The principal a bearer credential (or, with `basic`, an HTTP Basic password) stands for; None if
        none matches."""
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "basic" and basic:
            try:
                value = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        given = value.strip().encode()
        found = None
        for secret, principal in self._creds:  # every one compared, in constant time
            if hmac.compare_digest(given, secret) and found is None:
                found = principal
        return found

    def check(self, method: str, path: str, authorization: str) -> Principal:
        """The principal of a request, or the refusal.

        Raises:
            AuthenticationError: no credential, or one that does not open this path (401).
            ForbiddenError: the API key on an admin path of a server with an admin key (403).
        """
        allowed, what = self._allowed(method, path)
        if not allowed:
            return Principal(ANONYMOUS)
        principal = self.identify(authorization, basic=path == PAGE_PATH)
        if principal is not None and principal.role in allowed:
            return principal
        if principal is not None and principal.role == USER and ADMIN in allowed:
            raise ForbiddenError(f"{method} {path} needs the admin key; the API key serves inference only.")
        missing = not authorization.strip()
        raise AuthenticationError(f"{'Missing' if missing else 'Invalid'} {what}.", _remedy(what))

    def _allowed(self, method: str, path: str) -> tuple[frozenset[str], str]:
        """(roles that open this path, the credential a refusal names); no roles: the path is open."""
        if path in PUBLIC_PATHS:
            return frozenset(), ""
        if path in RATER_PATHS:
            if not (self.has_api_key or self.has_raters):
                return frozenset(), ""
            return frozenset({ADMIN, USER, RATER}), "rater token"
        if path == PAIRS_PATH and not self.has_api_key and self.has_raters:
            return frozenset({ADMIN, RATER}), "rater token"
        if is_admin_path(method, path):
            if self.has_admin_key:
                return frozenset({ADMIN}), "admin key"
            return (frozenset({USER}), "API key") if self.has_api_key else (frozenset(), "")
        return (frozenset({ADMIN, USER}), "API key") if self.has_api_key else (frozenset(), "")


def require_admin(principal: Principal | None, config: ServerConfig, action: str) -> None:
    """Refuse `action` (a pin decided by a request body) unless the caller holds the admin key, when the
    server has one.

    Raises:
        ForbiddenError: the server has an admin key and the caller did not present it.
    """
    if config.admin_key and getattr(principal, "role", None) != ADMIN:
        raise ForbiddenError(f"{action} needs the admin key; the API key serves inference only.")


def _remedy(what: str) -> str:
    if what == "rater token":
        return "Send `Authorization: Bearer <token>` with your rater token (or the server's API key)."
    if what == "admin key":
        return "Send `Authorization: Bearer <key>` with the server's admin key (--admin-key)."
    return "Send `Authorization: Bearer <key>` with the key the server was started with."
