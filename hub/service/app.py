"""`create_app(root, token_file)`: the hub service's FastAPI app, and the one place errors become responses.

Errors use the Hugging Face shape, not OpenAI's: body `{"error": message}` plus `X-Error-Code` /
`X-Error-Message` headers, because huggingface_hub reads exactly those to raise RepositoryNotFoundError,
RevisionNotFoundError, EntryNotFoundError and to show the server's message. The message carries its remedy.
Boundary: wiring (state, routers, error mapping). No Xet: nothing here advertises Xet headers or routes, so
clients use the LFS path (they should also set HF_HUB_DISABLE_XET=1; adapterdock's HubClient does).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.service.auth import Authenticator, parse_token_file
from hub.service.deps import ServiceLimits, ServiceState
from hub.service.errors import ServiceError
from hub.service.routes import browse, commits, files, lfs, repos
from hub.service.storage import Storage

logger = logging.getLogger(__name__)


def create_app(root: Path, token_file: Path | None = None, limits: ServiceLimits | None = None) -> FastAPI:
    """Build the hub service over the storage in `root`.

    Args:
        root: folder for blobs and the SQLite index (created if missing).
        token_file: tokens and their rights (see `hub.service.auth`); None runs the service open.
        limits: request size bounds; defaults suit adapters and small models.

    Raises:
        TokenFileError: the token file is malformed (every bad line listed).
    """
    storage = Storage(Path(root))
    if token_file is not None:
        grants = parse_token_file(Path(token_file))
        storage.replace_tokens(
            [(digest, g.user, g.access, ",".join(g.repos)) for digest, g in grants.items()]
        )
        auth = Authenticator(grants)
        logger.info("hub service: %d token(s) from %s", len(grants), token_file)
    else:
        auth = Authenticator(None)
        logger.warning("hub service runs OPEN (no --token-file): anyone can read and write every repo")
    app = FastAPI(title="adapterdock hub", version="1", docs_url="/docs", redoc_url=None)
    app.state.hub = ServiceState(storage=storage, auth=auth, limits=limits or ServiceLimits())
    for module in (repos, commits, lfs, browse, files):  # files last: its /{ns}/{name}/resolve is broad
        app.include_router(module.router)
    _install_error_handlers(app)
    return app


def error_response(
    status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
) -> JSONResponse:
    """An HF-shaped error response; header values are made single-line latin-1 safe."""
    safe = " ".join(message.split()).encode("latin-1", errors="replace").decode("latin-1")[:1000]
    out = {"X-Error-Message": safe, **(headers or {})}
    if code:
        out["X-Error-Code"] = code
    return JSONResponse({**(body or {}), "error": message}, status_code=status, headers=out)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.status, str(exc), exc.hf_code, exc.headers, exc.body)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"Invalid request: {problems}.")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            "Not found. This hub serves model repos only (see docs/hub.md)."
            if exc.status_code == 404
            else str(exc.detail)
        )
        return error_response(exc.status_code, message)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(root: Path, host: str = "127.0.0.1", port: int = 8080, token_file: Path | None = None) -> None:
    """Run the hub service with uvicorn until interrupted (blocking)."""
    import uvicorn

    if token_file is None and host not in LOOPBACK_HOSTS:
        logger.warning(
            "serving on %s without --token-file: anyone who can reach this port can write. "
            "Pass --token-file to require tokens.",
            host,
        )
    uvicorn.run(create_app(root, token_file), host=host, port=port, log_level="info")
