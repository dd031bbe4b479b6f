"""Who may call what: the API key, the admin key and the rater tokens, and the paths each one opens.

- inference and everything else: the API key (`--api-key`) or the admin key; open without an API key;
- the rating page and endpoints (`RATER_PATHS`): a rater token, the API key or the admin key; open only on
  a server with neither an API key nor rater tokens. A rater token stands for one rater id
  (`Principal.rater`), so a rater's identity comes from the token, never from a field the client sends;
- `POST /v1/feedback/pairs` (it generates text): the API key or the admin key; without an API key, a rater
  token or the admin key once rater tokens exist, so no feedback route is open while feedback credentials do;
- pinning, unpinning and unloading adapters (`is_admin_path`): the admin key (`--admin-key`) when the server
  has one, else the API key; an inference key on an admin path is a 403. `POST /v1/adapters/load` with
  `pin: true` is checked by its route (the body says whether it pins);
- scoped keys (`--keys-file`, `server.keys`): each opens the paths of its rights (`infer`: everything but
  feedback and adapter management; `feedback`: `RATER_PATHS` and `/v1/feedback/pairs`; `admin`: load, pin,
  unpin, unload) and nothing else (403 naming the missing right); the adapters it may use are checked where
  references resolve (`check_scope`). A server with scoped keys opens nothing but `/health` to anonymous
  callers, as with an API key.

Every comparison is constant-time and against every credential (no short-circuit). The page `/feedback`
also accepts HTTP Basic (the token as the password) so a browser can open it. Rater ids and the tokens file
format are `server.feedback.auth`'s. Boundary: the rule only; the ASGI middleware
(`server.middleware.AccessMiddleware`) applies it before any body is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from hub.errors import AdapterNotFoundError
from server.config import ServerConfig
from server.errors import AuthenticationError, ForbiddenError
from server.feedback.auth import PAGE_PATH, RATER_PATHS, SINGLE_RATER_ID
from server.keys import ADMIN_RIGHT, FEEDBACK, INFER, ScopedKey

ADMIN, USER, RATER, SCOPED, ANONYMOUS = "admin", "user", "rater", "scoped", "anonymous"
PUBLIC_PATHS = frozenset({"/health"})
"""Served to anyone."""
PAIRS_PATH = "/v1/feedback/pairs"


@dataclass(frozen=True)
class Principal:
    """Who a request is: its role, and for a rater token the rater id it stands for."""

    role: str
    """ADMIN, USER, RATER or ANONYMOUS (a server without credentials for this path)."""
    rater: str | None = None
    key: ScopedKey | None = None
    """The scoped key (role SCOPED) a request presented: its adapters, rights and limits."""


def is_admin_path(method: str, path: str) -> bool:
    """Pin, unpin and unload: `POST /v1/adapters/{ref}/pin|unpin` and `DELETE /v1/adapters/{ref}`."""
    if not path.startswith("/v1/adapters/"):
        return False
    return method == "DELETE" or (method == "POST" and path.endswith(("/pin", "/unpin")))


def scoped_right(method: str, path: str) -> str:
    """The right a scoped key needs for a path: loading joins pin/unpin/unload under `admin` (a key must
    not fill the shared adapter slots at will), the feedback routes need `feedback`, the rest `infer`."""
    if is_admin_path(method, path) or (method == "POST" and path == "/v1/adapters/load"):
        return ADMIN_RIGHT
    if path in RATER_PATHS or path == PAIRS_PATH:
        return FEEDBACK
    return INFER


def check_scope(principal: object, name: str) -> None:
    """Refuse an adapter (or base) name outside the scope of the request's scoped key.

    Out of scope is answered exactly like an unknown adapter (404), and decided before the registry is
    read, so a key learns nothing about the adapters of other keys (they are not listed to it either).

    Raises:
        AdapterNotFoundError: `name` matches none of the key's adapter globs.
    """
    key = getattr(principal, "key", None)
    if key is not None and not key.may_use(name):
        raise AdapterNotFoundError(
            f"No adapter {name!r} is available to key {key.name!r}.",
            f"This key may use adapters matching {', '.join(key.adapters)}; GET /v1/models lists them.",
        )


def visible(principal: object, name: str) -> bool:
    """Whether listings show `name` to the request's principal (everything, without a scoped key)."""
    key = getattr(principal, "key", None)
    return key is None or key.may_use(name)


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
        self._scoped = [(key.digest, Principal(SCOPED, key=key)) for key in config.keys]
        # A scoped key locks the server as the API key does: nothing but /health stays open.
        self.has_api_key = bool(config.api_key) or bool(config.keys)
        self.has_admin_key, self.has_raters = bool(config.admin_key), bool(raters)

    @property
    def enabled(self) -> bool:
        """Whether any credential is configured (else every path is open)."""
        return bool(self._creds or self._scoped)

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
        given_digest = hashlib.sha256(given).digest()
        found = None
        for secret, principal in self._creds:  # every one compared, in constant time
            if hmac.compare_digest(given, secret) and found is None:
                found = principal
        for secret, principal in self._scoped:  # scoped keys are kept as sha256 digests only
            if hmac.compare_digest(given_digest, secret) and found is None:
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
        if principal is not None and principal.key is not None:
            right = scoped_right(method, path)
            if right not in principal.key.rights:
                raise ForbiddenError(
                    f"{method} {path} needs the {right!r} right; key {principal.key.name!r} has "
                    f"{', '.join(sorted(principal.key.rights))}.",
                    "Use a key with that right (the operator grants rights in --keys-file).",
                )
            return principal
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
    server has one, or a scoped key with the `admin` right.

    Raises:
        ForbiddenError: the server has an admin key and the caller did not present it; a scoped key
        without the `admin` right.
    """
    key = getattr(principal, "key", None)
    if key is not None and ADMIN_RIGHT in key.rights:
        return
    if key is not None or (config.admin_key and getattr(principal, "role", None) != ADMIN):
        raise ForbiddenError(f"{action} needs the admin key; the API key serves inference only.")


def _remedy(what: str) -> str:
    if what == "rater token":
        return "Send `Authorization: Bearer <token>` with your rater token (or the server's API key)."
    if what == "admin key":
        return "Send `Authorization: Bearer <key>` with the server's admin key (--admin-key)."
    return "Send `Authorization: Bearer <key>` with the key the server was started with."
