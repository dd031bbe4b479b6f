"""The three server hooks the feedback routes need, applied only where the server does not have them yet.

The hooks (see docs/feedback.md): `app.include_router(feedback.router)` in `server.app.create_app`,
`rater_token`/`feedback_db` in `ServerConfig` (flags `--rater-token`, `--feedback-db`), and the rater paths
in the API-key middleware's exemptions (the feedback router authenticates them itself). Tests call
`with_feedback(app, config, ...)`; the real-server tests start `python -m tests.server.feedback_hooks ARGS`,
which is `python -m server ARGS` with the missing hooks added. Once the server has them, both are no-ops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import server.middleware
from server.feedback import routes as feedback
from server.feedback.auth import RATER_PATHS


def has_router(app: Any) -> bool:
    """Whether `app` serves the feedback routes (FastAPI keeps included routers as wrappers)."""
    return any(
        getattr(r, "original_router", None) is feedback.router
        or getattr(r, "path", None) == "/v1/feedback/pairs"
        for r in app.routes
    )


def exempted_paths() -> frozenset[str]:
    """The middleware's public paths plus the rater paths."""
    return frozenset(server.middleware.PUBLIC_PATHS) | RATER_PATHS


def with_feedback(app: Any, *, rater_token: str | None = None, feedback_db: Path | None = None) -> Any:
    """Mount the router on `app` (if missing) and set the feedback settings on its config."""
    if not has_router(app):
        app.include_router(feedback.router)
    config = app.state.server.config
    if rater_token is not None or not hasattr(config, "rater_token"):
        config.rater_token = rater_token
    if feedback_db is not None or not hasattr(config, "feedback_db"):
        config.feedback_db = feedback_db
    return app


def main(argv: list[str]) -> int:
    """`python -m server` with the feedback hooks the server lacks."""
    from server import app as app_module
    from server import cli

    known = cli.build_parser()._option_string_actions
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rater-token", default=None)
    extra.add_argument("--feedback-db", type=Path, default=None)
    settings, rest = extra.parse_known_args(argv)
    if "--rater-token" in known:  # the server has the flags itself
        rest = argv
    server.middleware.PUBLIC_PATHS = exempted_paths()
    original = app_module.create_app

    def create_app(config: Any, **kwargs: Any) -> Any:
        app = original(config, **kwargs)
        if "--rater-token" in known:
            return with_feedback(app)
        return with_feedback(app, rater_token=settings.rater_token, feedback_db=settings.feedback_db)

    app_module.create_app = create_app
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
