"""adapterdock's vLLM general plugin: a LoRA resolver that serves adapters from our registry and hub.

Installed with adapterdock (entry point `adapterdock` in group `vllm.general_plugins`). vLLM calls
`register()` in each of its processes; it registers `AdapterDockLoRAResolver` under the name `adapterdock`.
With `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` (and `VLLM_PLUGINS` unset or naming `adapterdock`), a request
whose `model` is an adapter vLLM does not know yet (`sentiment@3`, `sentiment@prod`, `acme/chat@2`) is
resolved here: found, verified and checked by `hub.vllm_resolver`, then loaded by vLLM from the immutable
version folder. A refused or unknown adapter is logged with its reason and answered 404 by vLLM.

Boundary: this module imports only the standard library at import time; hub code (torch-free) and vLLM are
imported inside `register()`, and no error there ever reaches vLLM's startup: it is logged and vLLM starts
without the resolver. See docs/scaling.md for the command lines.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

RESOLVER_NAME = "adapterdock"


def register() -> None:
    """The `vllm.general_plugins` entry point: register the resolver; log, never raise, on any failure."""
    try:
        _ensure_log_output()
        from vllm.lora.resolver import LoRAResolverRegistry

        resolver = build_resolver()
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
        logger.info("adapterdock: LoRA resolver registered (registry %s)", resolver.inner.store.root)
    except Exception:  # noqa: BLE001 - a broken plugin must never stop vLLM from serving
        logger.exception("adapterdock: the LoRA resolver was not registered; vLLM serves without it")


def build_resolver(settings: Any | None = None) -> Any:
    """An `AdapterDockLoRAResolver` (a `vllm.lora.resolver.LoRAResolver`) over `settings` (default: env)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from hub.vllm_resolver import ResolverSettings, VllmAdapterResolver

    class AdapterDockLoRAResolver(LoRAResolver):
        """Resolves a request's adapter name through adapterdock's registry; None (404) when refused."""

        def __init__(self, inner: VllmAdapterResolver) -> None:
            self.inner = inner

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            adapter = await asyncio.to_thread(resolve_or_none, self.inner, base_model_name, lora_name)
            if adapter is None:
                return None
            # vLLM keys its cache by the name the request used, and numbers the slot itself.
            return LoRARequest(
                lora_name=lora_name, lora_int_id=adapter.lora_int_id, lora_path=str(adapter.path)
            )

    return AdapterDockLoRAResolver(VllmAdapterResolver(settings or ResolverSettings.from_env()))


def resolve_or_none(inner: Any, base_model_name: str, lora_name: str) -> Any | None:
    """`inner.resolve(...)`, with every refusal logged (reason and remedy) and turned into None."""
    from hub.errors import AdapterDockError, AdapterNotFoundError, InvalidReferenceError

    try:
        adapter = inner.resolve(base_model_name, lora_name)
    except (AdapterNotFoundError, InvalidReferenceError) as exc:
        logger.info("adapterdock: %r is not a registry adapter: %s", lora_name, exc)
        return None
    except AdapterDockError as exc:
        logger.warning("adapterdock: refused %r: %s", lora_name, exc)
        return None
    except Exception:  # noqa: BLE001 - vLLM would answer 500; a refusal (404) with the trace logged is clearer
        logger.exception("adapterdock: resolving %r failed", lora_name)
        return None
    logger.info("adapterdock: %r -> %s (%s)", lora_name, adapter.ref, adapter.path)
    return adapter


def _ensure_log_output() -> None:
    """vLLM configures only its own loggers: give ours a handler at INFO unless the host app set one up."""
    hub_logger = logging.getLogger("hub")
    if hub_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    hub_logger.addHandler(handler)
    hub_logger.setLevel(logging.INFO)
