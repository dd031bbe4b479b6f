"""The server's configuration: one dataclass, the single source of every `adapterdock serve` default.

Boundary: plain data and its validation. `server.cli` turns flags into a `ServerConfig`; `server.app` reads
it. Nothing here loads a model or opens a socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ServerConfigError
from server.keys import ScopedKey, digest

QUANTIZE_CHOICES = ("nf4", "int8", "none")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DTYPE_CHOICES = ("auto", "bf16", "fp32")
DTYPE_ENV = "ADAPTERDOCK_DTYPE"
"""Sets the default of `--dtype` (tests set fp32 to compare with PEFT exactly)."""


def default_dtype() -> str:
    """`--dtype`'s default: $ADAPTERDOCK_DTYPE, else auto."""
    return os.environ.get(DTYPE_ENV) or "auto"


@dataclass
class ServerConfig:
    """How one server process runs: its base, registry, limits and access."""

    base: str = "tiny"
    """Base model: built-in (smollm2-135m, tiny, small), local HF folder, `registry:NAME[@v]`, or HF id."""
    quantize: str = "nf4"
    """Weight quantization of the base: nf4 (4-bit), int8, or none (full precision)."""
    dtype: str = field(default_factory=default_dtype)
    """Compute dtype of activations, KV cache and adapter weights: auto = bf16 on GPUs and on CPUs with
    avx512_bf16 or AMX (1.8x faster decode here), else fp32; fp32 matches PEFT's fp32 outputs exactly.
    Defaults to $ADAPTERDOCK_DTYPE, else auto."""
    threads: int | None = None
    """CPU compute threads (torch intra-op); None: every core this process may use but one, kept for the
    HTTP event loop and tokenizer (as vLLM's CPU build reserves one), or $OMP_NUM_THREADS when set."""
    load_threads: int = 1
    """Threads that load adapters (read, check, copy into pages), in the order asked; one keeps a burst of
    cold loads from all finishing late on a machine whose cores the engine uses."""
    registry: Path | None = None
    """Local registry folder; None uses $ADAPTERDOCK_REGISTRY or ./adapters."""
    hub: str | None = None
    """Remote hub URL to pull adapters from on a local miss; None never contacts a hub."""
    hub_token: str | None = field(default=None, repr=False)
    """Token for the remote hub (the CLI reads it from $HF_TOKEN); never logged."""
    hub_refresh: float = 60.0
    """Seconds between checks that a tag pulled from --hub has not moved (0: each request, -1: never)."""
    hub_timeout: float = 300.0
    """Seconds one pull from --hub may take in all; a hub silent for 30 s (or this, if less) fails sooner."""
    hub_max_pulls: int = 2
    """Requests inside pulls from --hub at once (a stalled hub holds no more threads); more get 503."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """TCP port to listen on."""
    max_adapters: int = 16
    """Adapters resident at once (engine slots); more are loaded and evicted LRU."""
    max_adapter_memory_mb: float | None = None
    """Cap on resident adapter weights in MiB; None caps by count only."""
    max_rank: int = 64
    """Highest LoRA rank the engine accepts."""
    memory_budget_mb: float | None = None
    """MiB for adapter weights and the KV cache together, one budget with no fixed split (either may use
    what the other has not taken; idle adapters are evicted LRU by their real size before sequences wait);
    None: half the memory free after the base loads."""
    preload: tuple[str, ...] = ()
    """Adapter references loaded (and pinned) at start; a failure stops the start."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer key every endpoint but /health requires; None disables auth."""
    rater_token: str | None = field(default=None, repr=False)
    """One rater's bearer token (rater id `rater`): opens only the rating page and endpoints; never logged."""
    rater_tokens: dict[str, str] = field(default_factory=dict, repr=False)
    """Rater id -> bearer token, one per rater (`--rater-tokens-file`: `rater_id:token` lines); not logged."""
    admin_key: str | None = field(default=None, repr=False)
    """Bearer key for pinning, unpinning and unloading adapters (and all the API key opens); None leaves
    those to the API key."""
    keys: tuple[ScopedKey, ...] = field(default=(), repr=False)
    """Scoped keys, read from a JSON list (each: a name, adapter globs, rights among infer, feedback and
    admin, optional requests/tokens per minute); never logged."""
    max_judgements_per_rater: int = 10000
    """Most judgements one rater may record (changing one does not count); beyond it 429."""
    feedback_db: Path | None = None
    """Human feedback database (answer pairs and judgements); None uses <registry>/feedback.sqlite."""
    max_batch_size: int = 16
    """Most sequences one forward pass serves."""
    max_queue: int = 256
    """Most requests waiting for the scheduler; beyond it requests get 503 with Retry-After."""
    max_input_tokens: int = 768
    """Longest prompt (or task input) in tokens; longer ones get 400."""
    max_new_tokens: int = 256
    """Largest `max_tokens` / `max_new_tokens` a request may ask for; larger get 400."""
    default_max_tokens: int = 16
    """Tokens generated when a request does not say (OpenAI's default), capped by max_new_tokens."""
    max_inputs_per_request: int = 64
    """Most texts (or prompts) in one request body."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; larger get 413."""
    adapter_wait_timeout: float = 30.0
    """Seconds a request waits for an adapter slot when every slot is pinned or in use (then 503)."""
    log_level: str = "info"
    """Logging level of the server and uvicorn."""

    def _access_problems(self) -> list[str]:
        """Empty or shared secrets: every credential must be distinct, or one role would open another's."""
        problems = []
        if self.admin_key is not None and not self.admin_key.strip():
            problems.append("admin_key is empty")
        keys = (self.api_key, self.admin_key, self.rater_token, *self.rater_tokens.values())
        secrets = [key for key in keys if key]
        if len(set(secrets)) != len(secrets):
            problems.append("api_key, admin_key and the rater tokens must all differ")
        if any(not token.strip() for token in self.rater_tokens.values()):
            problems.append("a rater token is empty")
        if {digest(s) for s in secrets} & {key.digest for key in self.keys}:
            problems.append("a scoped key (--keys-file) equals the api_key, the admin_key or a rater token")
        if self.rater_token and "rater" in self.rater_tokens:
            problems.append("rater_token (rater id 'rater') and rater_tokens both name rater 'rater'")
        return problems

    @property
    def max_adapter_bytes(self) -> int | None:
        """`max_adapter_memory_mb` in bytes."""
        if self.max_adapter_memory_mb is None:
            return None
        return int(self.max_adapter_memory_mb * 1024 * 1024)

    def validate(self) -> ServerConfig:
        """Check every field and report all problems at once.

        Raises:
            ServerConfigError: listing each invalid field.
        """
        problems: list[str] = []
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(f"quantize={self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.dtype not in DTYPE_CHOICES:
            problems.append(f"dtype={self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.log_level.lower() not in LOG_LEVELS:
            problems.append(f"log_level={self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port={self.port} is not in 0..65535")
        for name in (
            "max_adapters",
            "max_rank",
            "max_batch_size",
            "max_queue",
            "max_input_tokens",
            "max_new_tokens",
            "default_max_tokens",
            "max_inputs_per_request",
            "max_body_bytes",
            "max_judgements_per_rater",
            "hub_max_pulls",
            "load_threads",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads} must be at least 1")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            problems.append(f"memory_budget_mb={self.memory_budget_mb} must be positive")
        if self.max_adapter_memory_mb is not None and self.max_adapter_memory_mb <= 0:
            problems.append(f"max_adapter_memory_mb={self.max_adapter_memory_mb} must be positive")
        if not self.hub_timeout > 0:
            problems.append(f"hub_timeout={self.hub_timeout} must be positive")
        if self.adapter_wait_timeout <= 0:
            problems.append(f"adapter_wait_timeout={self.adapter_wait_timeout} must be positive")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty")
        if self.rater_token is not None and not self.rater_token.strip():
            problems.append("rater_token is empty")
        if self.rater_token and self.rater_token == self.api_key:
            problems.append("rater_token equals api_key; raters would get full access")
        problems += self._access_problems()
        if problems:
            raise ServerConfigError("Invalid server configuration: " + "; ".join(problems) + ".")
        return self
