"""Who may use the rating paths: the API key, or the separate rater token that opens nothing else.

The API-key middleware (`server.middleware`) lets `RATER_PATHS` through without the API key; the rating
routes then call `check_rater_access`, which accepts either token. Boundary: the rule only (which paths,
which tokens); no routes, no storage, so the middleware can import it without importing a route.
"""

from __future__ import annotations

import hmac

from server.config import ServerConfig
from server.errors import AuthenticationError

RATER_PATHS = frozenset({"/feedback", "/v1/feedback", "/v1/feedback/next", "/v1/feedback/progress"})
"""The rating page and the endpoints it calls: authenticated by `check_rater_access`, not the middleware."""


def rater_token(config: ServerConfig) -> str | None:
    """The separate rater token the server runs with, if any."""
    return config.rater_token or None


def check_rater_access(authorization: str, config: ServerConfig) -> None:
    """Accept the API key or the rater token as a bearer token (open when the server has neither).

    Args:
        authorization: the request's `Authorization` header ("" when absent).
        config: the server's settings (`api_key`, `rater_token`).

    Raises:
        AuthenticationError: a missing or wrong bearer token.
    """
    keys = [k.encode() for k in (config.api_key, rater_token(config)) if k]
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    # Compare against every key (no short-circuit), in constant time.
    matches = [hmac.compare_digest(given, key) for key in keys]
    if scheme.lower() == "bearer" and any(matches):
        return
    problem = "Invalid rater token." if authorization else "Missing rater token."
    raise AuthenticationError(
        problem, "Send `Authorization: Bearer <token>` with the server's rater token (or API key)."
    )
