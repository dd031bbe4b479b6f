"""Every error the hub raises, and `AdapterDockError`, the base of every adapterdock error.

Training's own errors (bad data, bad options, a diverged run) live in trainers (`trainers.errors`,
`trainers.configs`), since the hub knows nothing about training.

Each error subclasses `AdapterDockError` and the closest builtin, so callers can catch either, and carries a
`remedy` that says how to fix the problem. Mapping to HTTP statuses happens only at the server's edge.
"""

from __future__ import annotations


class AdapterDockError(Exception):
    """Base of every adapterdock error; `str(err)` is the problem followed by its remedy."""

    default_remedy: str = ""

    def __init__(self, message: str, remedy: str | None = None) -> None:
        self.message = message
        self.remedy = remedy if remedy is not None else self.default_remedy
        super().__init__(f"{message} {self.remedy}".strip() if self.remedy else message)


class InvalidReferenceError(AdapterDockError, ValueError):
    """An adapter name, reference or tag that breaks the naming rules."""

    default_remedy = (
        "Names use lowercase letters, digits, '-', '_' and '.', optionally with one 'namespace/'; "
        "references are NAME, NAME@VERSION or NAME@TAG."
    )


class AdapterNotFoundError(AdapterDockError, LookupError):
    """No adapter, version or tag by that reference."""

    default_remedy = "Run `adapterdock hub list` to see what is registered."


class InvalidSplitError(AdapterDockError, ValueError):
    """A traffic split (`hub route --split`) that is malformed or names versions that do not exist."""

    default_remedy = "Write --split VERSION=WEIGHT[,VERSION=WEIGHT...], e.g. 3=90,4=10."


class ChecksumMismatchError(AdapterDockError, ValueError):
    """A file's bytes no longer match the sha256 its manifest recorded."""

    def __init__(self, message: str, path: str | None = None, remedy: str | None = None) -> None:
        self.path = path
        super().__init__(
            message,
            remedy
            if remedy is not None
            else "The file was changed or corrupted after registration: re-register or re-pull it.",
        )


class CorruptAdapterError(AdapterDockError, ValueError):
    """Adapter files that cannot be read or do not fit their declared format."""

    default_remedy = "Re-export the adapter with `save_pretrained(..., safe_serialization=True)`."


class ManifestError(AdapterDockError, ValueError):
    """A manifest.json that is missing, unreadable or fails validation."""

    default_remedy = "Fix the listed fields, or re-register the adapter with `adapterdock hub import`."


class BaseMismatchError(AdapterDockError, ValueError):
    """An adapter trained on another base model than the one it is used with."""

    default_remedy = "Use the base the adapter was trained on (see `adapterdock hub show REF`)."


class BaseNotFoundError(AdapterDockError, LookupError):
    """A base model name that is neither built in, a local folder, a registry model nor a cached HF id."""

    default_remedy = (
        "Use a built-in base (smollm2-135m, tiny, small), a local HF-format folder, registry:NAME, "
        "or an HF model id present in the local HF cache."
    )


class RegistryError(AdapterDockError, OSError):
    """The registry folder cannot be written or read as a registry."""

    default_remedy = (
        "Check that the registry folder exists and is writable (--registry or ADAPTERDOCK_REGISTRY)."
    )


class HubError(AdapterDockError, ConnectionError):
    """A remote hub refused a request or could not be reached."""

    default_remedy = "Check --endpoint (or HF_ENDPOINT) and that the hub is running."


class HubTimeoutError(HubError, TimeoutError):
    """A hub that stopped answering, or answered too slowly to finish a pull within its deadline."""

    default_remedy = "Retry later; if the hub is slow but healthy, raise the pull deadline (--hub-timeout)."


class HubBusyError(HubError):
    """Every concurrent hub pull is in use: the request was not queued behind them."""

    default_remedy = "Retry shortly (see Retry-After), or raise --hub-max-pulls."


class HubLimitError(HubError, ValueError):
    """A hub answer over a pull's limits: too many bytes, too many files, or a redirect off the hub."""

    default_remedy = "Only pull adapters from hubs you trust; report the repo to its owner."


class HubAuthError(HubError, PermissionError):
    """A remote hub refused our token, or the token lacks rights to the repo."""

    default_remedy = "Pass a token with access to the repo via --token or HF_TOKEN."


class NotServableError(AdapterDockError, ValueError):
    """An adapter another serving engine (vLLM) cannot apply exactly: a task head, a bottleneck, DoRA."""

    default_remedy = "Serve it with `adapterdock serve`, which runs every adapter kind adapterdock trains."
