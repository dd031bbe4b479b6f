"""The server's own errors, and the one place where any error becomes an HTTP response.

Boundary: the library layers (hub, resolver, cache, scheduler, engine) raise typed errors with
remedies, the server's own ones defined here (torch-free, so the HTTP layer imports them normally); this
module maps them, by class, to statuses and OpenAI's error body
`{"error": {"message", "type", "code"}}`. No route builds an error body by hand, and no request ever
gets a bare 500 with a traceback.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.errors import (
    AdapterDockError,
    AdapterNotFoundError,
    BaseMismatchError,
    BaseNotFoundError,
    ChecksumMismatchError,
    CorruptAdapterError,
    HubAuthError,
    HubBusyError,
    HubError,
    HubLimitError,
    HubTimeoutError,
    InvalidReferenceError,
    ManifestError,
)
from server.feedback.store import RaterLimitError

logger = logging.getLogger(__name__)


class ServerConfigError(AdapterDockError, ValueError):
    """Invalid `adapterdock serve` settings."""

    default_remedy = "Fix the listed settings; `adapterdock serve --help` describes each."


class WrongTaskError(AdapterDockError, ValueError):
    """An adapter sent to an endpoint that does not serve its task."""


class FullModelError(AdapterDockError, ValueError):
    """A full fine-tuned model named where a swappable adapter is expected."""


class NotCombinableError(AdapterDockError, ValueError):
    """A weighted adapter set with a part that is no plain generation LoRA (DoRA, bottleneck, task head)."""

    default_remedy = (
        "Combine only LoRA / QLoRA adapters of generation tasks (instruction, dpo, ppo); "
        "request the others alone."
    )


class AdapterSetTooLargeError(AdapterDockError, ValueError):
    """A weighted adapter set whose summed LoRA rank does not fit the engine's slots (`--max-rank`)."""


class InputTooLongError(AdapterDockError, ValueError):
    """A request over one of the server's size limits (tokens, inputs, max_tokens)."""


class InvalidInputError(AdapterDockError, ValueError):
    """Request input that is well-formed JSON but cannot be served (token ids outside the vocabulary, ...)."""


class UnsupportedParameterError(AdapterDockError, ValueError):
    """A request parameter this server does not implement, set to a value that would change the result."""

    default_remedy = "Leave the parameter unset; docs/server.md lists what each endpoint honours."


class AdapterBusyError(AdapterDockError, RuntimeError):
    """No adapter slot freed up within the wait limit: every slot is pinned or serving requests."""

    default_remedy = "Retry shortly, unpin adapters, or start the server with a larger --max-adapters."


class AdapterInUseError(AdapterDockError, RuntimeError):
    """An unload asked for an adapter that in-flight requests still use."""

    default_remedy = "Retry when its requests have finished."


class PinLimitError(AdapterDockError, RuntimeError):
    """Pinning this adapter would leave no adapter slot for anything else."""

    default_remedy = "Unpin another adapter first, or restart with a larger --max-adapters."


class ForbiddenError(AdapterDockError, PermissionError):
    """Valid credentials without the right for this route (an inference key on an admin route, a rater
    acting as another rater)."""

    default_remedy = "Use a key with this right (the admin key for pins and unloads)."


class AdapterTooLargeError(AdapterDockError, MemoryError):
    """One adapter larger than the whole memory budget (or --max-adapter-memory): it can never load."""

    default_remedy = "Start the server with a larger --memory-budget (or --max-adapter-memory, if set)."


class MemoryBudgetError(AdapterDockError, MemoryError):
    """A sequence whose KV cache the memory budget cannot hold, even with every idle adapter evicted and
    no other sequence running: the rest is held by pinned adapters or adapters other requests use."""

    default_remedy = (
        "Raise --memory-budget, lower --max-batch-size or the context (--max-input-tokens / "
        "--max-new-tokens, or this request's max_tokens), or unpin adapters."
    )


class HubNotConfiguredError(AdapterDockError, LookupError):
    """A request for a hub adapter on a server started without --hub."""

    default_remedy = "Start the server with --hub URL, or register the adapter locally."


class NotReadyError(AdapterDockError, RuntimeError):
    """The base model is not loaded yet, or the server is shutting down."""

    default_remedy = "Retry after a few seconds; GET /ready says when the server serves."


class AuthenticationError(AdapterDockError, PermissionError):
    """A missing or wrong API key."""

    default_remedy = "Send `Authorization: Bearer <key>` with the key the server was started with."


class BodyTooLargeError(AdapterDockError, ValueError):
    """A request body over --max-body-bytes."""

    default_remedy = "Send fewer or shorter inputs per request."


class QueueFullError(AdapterDockError, RuntimeError):
    """The scheduler's queue is full; the request was not accepted."""

    default_remedy = "Retry after a short wait, or raise --max-queue."
    retry_after: float = 1.0


class QuotaExceededError(AdapterDockError, RuntimeError):
    """A scoped key over its requests or tokens per minute (`--keys-file`)."""

    default_remedy = "Retry after the seconds in Retry-After, or ask the operator for a higher limit."

    def __init__(self, message: str, retry_after: float, remedy: str | None = None) -> None:
        super().__init__(message, remedy)
        self.retry_after = max(1, math.ceil(retry_after))
        """Whole seconds until the key's allowance has recovered (the Retry-After header)."""


class SchedulerStoppedError(AdapterDockError, RuntimeError):
    """The scheduler is stopping or stopped and takes no more work."""

    default_remedy = "The server is shutting down; retry against a running server."


class EngineCapacityError(AdapterDockError, RuntimeError):
    """Every adapter slot or batch row is taken."""

    default_remedy = "Unload an adapter, or restart with a larger --max-adapters / --max-batch-size."


class SequenceTooLongError(AdapterDockError, ValueError):
    """A prompt (plus the tokens it asks for) that does not fit the engine's context window."""

    default_remedy = "Shorten the input or ask for fewer new tokens."


class NonFiniteOutputError(AdapterDockError, ArithmeticError):
    """A forward pass produced NaN or infinite logits or hidden states for one request's row."""

    default_remedy = (
        "The adapter's weights (or its lora_alpha) overflow on this input; retrain or re-export it with "
        "sane values, or try another prompt. Other requests are not affected."
    )


class ConcurrentForwardError(AdapterDockError, RuntimeError):
    """A forward pass started while another one runs: the engine runs one forward at a time."""

    default_remedy = "Call the engine's forward methods only from the scheduler's worker thread."


@dataclass(frozen=True)
class ErrorSpec:
    """How one error class looks on the wire."""

    status: int
    code: str
    type: str = "invalid_request_error"
    retry_after: int | None = None


# Most specific first: the first class in an error's MRO found here decides.
_SPECS: dict[type[BaseException], ErrorSpec] = {
    AuthenticationError: ErrorSpec(401, "invalid_api_key", "authentication_error"),
    InvalidReferenceError: ErrorSpec(400, "invalid_reference"),
    AdapterNotFoundError: ErrorSpec(404, "adapter_not_found"),
    BaseNotFoundError: ErrorSpec(404, "base_not_found"),
    BaseMismatchError: ErrorSpec(409, "base_mismatch"),
    FullModelError: ErrorSpec(409, "adapter_is_full_model"),
    AdapterInUseError: ErrorSpec(409, "adapter_in_use"),
    PinLimitError: ErrorSpec(409, "pin_limit"),
    ForbiddenError: ErrorSpec(403, "forbidden", "permission_error"),
    RaterLimitError: ErrorSpec(429, "rater_limit", "rate_limit_error"),
    QuotaExceededError: ErrorSpec(429, "rate_limit_exceeded", "rate_limit_error", retry_after=1),
    WrongTaskError: ErrorSpec(400, "wrong_task"),
    InputTooLongError: ErrorSpec(400, "input_too_long"),
    InvalidInputError: ErrorSpec(400, "invalid_input"),
    UnsupportedParameterError: ErrorSpec(400, "unsupported_parameter"),
    AdapterTooLargeError: ErrorSpec(413, "adapter_too_large"),
    AdapterSetTooLargeError: ErrorSpec(400, "adapter_set_too_large"),
    NotCombinableError: ErrorSpec(422, "not_combinable"),
    HubNotConfiguredError: ErrorSpec(400, "hub_not_configured"),
    BodyTooLargeError: ErrorSpec(413, "body_too_large"),
    ChecksumMismatchError: ErrorSpec(422, "corrupt_adapter"),
    CorruptAdapterError: ErrorSpec(422, "corrupt_adapter"),
    ManifestError: ErrorSpec(422, "corrupt_adapter"),
    AdapterBusyError: ErrorSpec(503, "adapter_slots_busy", "server_overloaded", retry_after=1),
    NotReadyError: ErrorSpec(503, "not_ready", "server_overloaded", retry_after=2),
    HubBusyError: ErrorSpec(503, "hub_busy", "server_overloaded", retry_after=2),
    HubTimeoutError: ErrorSpec(504, "hub_timeout", "server_error", retry_after=5),
    HubLimitError: ErrorSpec(502, "hub_refused", "server_error"),
    HubAuthError: ErrorSpec(502, "hub_auth_failed", "server_error"),
    HubError: ErrorSpec(502, "hub_unavailable", "server_error"),
    ServerConfigError: ErrorSpec(500, "server_misconfigured", "server_error"),
    QueueFullError: ErrorSpec(503, "queue_full", "server_overloaded", retry_after=1),
    SchedulerStoppedError: ErrorSpec(503, "not_ready", "server_overloaded", retry_after=2),
    EngineCapacityError: ErrorSpec(503, "engine_full", "server_overloaded", retry_after=1),
    MemoryBudgetError: ErrorSpec(503, "memory_budget_full", "server_overloaded", retry_after=1),
    SequenceTooLongError: ErrorSpec(400, "input_too_long"),
    NonFiniteOutputError: ErrorSpec(422, "non_finite_output"),
}
_INTERNAL = ErrorSpec(500, "internal_error", "server_error")


def spec_for(exc: BaseException) -> ErrorSpec:
    """The wire spec of `exc`: by class, then by builtin family, else a 500."""
    for cls in type(exc).__mro__:
        if cls in _SPECS:
            return _SPECS[cls]
    if isinstance(exc, AdapterDockError):
        if isinstance(exc, LookupError):
            return ErrorSpec(404, "not_found")
        if isinstance(exc, ValueError):
            return ErrorSpec(400, "invalid_request")
    return _INTERNAL


def error_body(message: str, *, type_: str, code: str) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


def error_response(exc: BaseException) -> JSONResponse:
    """The HTTP response for `exc`; internal errors are logged with their traceback, never sent."""
    spec = spec_for(exc)
    if spec is _INTERNAL:
        logger.exception("internal error while serving a request", exc_info=exc)
        message = "Internal server error; the server log has the details."
    else:
        message = str(exc)
    retry_after = exc.retry_after if isinstance(exc, QuotaExceededError) else spec.retry_after
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if spec.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        error_body(message, type_=spec.type, code=spec.code), status_code=spec.status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Malformed request: " + "; ".join(parts[:10]) + ("; ..." if len(parts) > 10 else "")


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        error_body(_validation_message(exc), type_="invalid_request_error", code="invalid_body"),
        status_code=422,
    )


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a body FastAPI could not parse (it only says "error parsing the body")."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"Request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset "
            f"{cause.start}); send JSON encoded as UTF-8."
        )
    if isinstance(cause, RecursionError):
        return "Request body JSON is nested too deeply to parse; send flatter JSON."
    return None


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    code = codes.get(exc.status_code, "http_error")
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = _unparsable_body(exc)
    if message is not None:
        code = "invalid_json"
    return JSONResponse(
        error_body(message or str(exc.detail), type_=type_, code=code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a request can raise through `error_response`."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(AdapterDockError, _on_error)
    app.add_exception_handler(Exception, _on_error)
