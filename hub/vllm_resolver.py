"""Registry adapters for vLLM: a reference a client sent -> a checked, immutable PEFT folder and a stable id.

`VllmAdapterResolver.resolve(base_model_name, "sentiment@prod")` resolves the reference in the local registry
(pulling `namespace/name[@N|@tag]` from a hub on a local miss when one is configured), verifies every file's
sha256, and checks what vLLM can run exactly: a generation task (instruction, dpo, ppo), a plain LoRA
(no DoRA, no task head), trained on the very base vLLM serves (by fingerprint). `check_servable` is the
same check for `adapterdock export vllm`.
Boundary: hub code only, no torch and no vLLM; `hub.vllm_plugin` wraps this in vLLM's `LoRAResolver`.
Calls touch the disk (and maybe the network): vLLM's event loop runs them in a thread.

Environment (read by `ResolverSettings.from_env`):
    ADAPTERDOCK_REGISTRY   the local registry (default ./adapters)
    ADAPTERDOCK_BASE_PATH  the base folder vLLM serves, when `--model` is not a folder we can fingerprint
    ADAPTERDOCK_HUB        a hub URL to pull `namespace/name` adapters from on a local miss
    ADAPTERDOCK_HUB_TOKEN  its token (default $HF_TOKEN)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hub.adapter_format import ADAPTER_CONFIG, check_base, load_config
from hub.bases import BaseInfo, resolve_base
from hub.compat import check_peft_fits_base
from hub.errors import AdapterNotFoundError, BaseNotFoundError, NotServableError
from hub.manifest import GENERATION_TASKS, Manifest
from hub.peft_config import check_peft_options
from hub.ref import AdapterRef
from hub.store import DEFAULT_REGISTRY, REGISTRY_ENV, LocalStore

logger = logging.getLogger(__name__)

BASE_PATH_ENV = "ADAPTERDOCK_BASE_PATH"
HUB_ENV = "ADAPTERDOCK_HUB"
HUB_TOKEN_ENV = "ADAPTERDOCK_HUB_TOKEN"
LORA_METHODS = ("lora", "qlora")
"""Methods whose result is a plain PEFT LoRA folder (QLoRA trains a LoRA on a quantized base)."""
_MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class ResolverSettings:
    """Where the resolver finds adapters and the base; see the module docstring for the variables."""

    registry: Path
    """The local registry root."""
    base_path: Path | None = None
    """The base folder vLLM serves; None: fingerprint vLLM's `--model` (a folder or cached HF id)."""
    hub_endpoint: str | None = None
    """A hub to pull `namespace/name` adapters from on a local miss; None never contacts one."""
    hub_token: str | None = None
    """The hub's token."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ResolverSettings:
        env = os.environ if environ is None else environ
        base = env.get(BASE_PATH_ENV)
        return cls(
            registry=Path(env.get(REGISTRY_ENV) or DEFAULT_REGISTRY),
            base_path=Path(base) if base else None,
            hub_endpoint=env.get(HUB_ENV) or None,
            hub_token=env.get(HUB_TOKEN_ENV) or env.get("HF_TOKEN") or None,
        )


@dataclass(frozen=True)
class VllmAdapter:
    """One adapter version vLLM may load."""

    ref: str
    """The immutable `name@version` the reference resolved to."""
    path: Path
    """Its version folder in the local registry (checksums verified)."""
    lora_int_id: int
    """A positive int32, the same for the same `ref` in every process."""
    manifest: Manifest


def stable_lora_id(ref: str) -> int:
    """A positive int32 derived from an immutable `name@version` (sha256, folded), never 0."""
    value = int.from_bytes(hashlib.sha256(ref.encode()).digest()[:8], "big") % _MAX_ID
    return value + 1


def check_servable(manifest: Manifest, folder: Path, base: BaseInfo) -> None:
    """Check that vLLM can apply this adapter exactly on `base`.

    Raises:
        NotServableError: a full model, a non-generation task (task heads), a bottleneck adapter, or a PEFT
            option vLLM does not implement (DoRA, bias, extra modules_to_save).
        BaseMismatchError: trained on another base. CorruptAdapterError: a tensor that does not fit the base.
    """
    if manifest.kind == "model":
        raise NotServableError(
            f"{manifest.ref} is a full fine-tuned model, not a LoRA adapter.",
            f"Serve its folder as vLLM's model instead: `vllm serve {folder}`.",
        )
    if manifest.task not in GENERATION_TASKS:
        raise NotServableError(
            f"{manifest.ref} is a {manifest.task} adapter: its task head is not something vLLM's "
            "completion endpoints run.",
            _serve_with_us(manifest),
        )
    if manifest.method not in LORA_METHODS or manifest.adapter_format != "peft":
        raise NotServableError(
            f"{manifest.ref} is a {manifest.method} adapter ({manifest.adapter_format}); "
            "vLLM loads LoRA adapters only.",
            _serve_with_us(manifest),
        )
    config = load_config(folder / ADAPTER_CONFIG)
    if config.get("use_dora"):
        raise NotServableError(
            f"{manifest.ref} is a DoRA adapter; vLLM does not implement DoRA.",
            "Retrain it as a plain LoRA (method lora or qlora, use_dora off).",
        )
    if config.get("modules_to_save"):
        raise NotServableError(
            f"{manifest.ref} saves whole modules ({config['modules_to_save']}) beside its LoRA; "
            "vLLM's completion endpoints do not apply them.",
            "Retrain it without modules_to_save, or serve it with `adapterdock serve` if it is a task head.",
        )
    check_peft_options(folder / ADAPTER_CONFIG, config)
    check_base(
        manifest.ref,
        manifest.base,
        base.spec,
        expected_as="the base vLLM serves, ",
        remedy=f"Request it from a vLLM serving {manifest.base.name_or_path}, or retrain it on this base.",
    )
    check_peft_fits_base(folder, base.path)


def _serve_with_us(manifest: Manifest) -> str:
    return f"Serve it with `adapterdock serve --base {manifest.base.name_or_path}` (see docs/scaling.md)."


class VllmAdapterResolver:
    """Resolves client references for vLLM against one local registry (and optionally a hub).

    Args:
        settings: the registry, base override and hub; see `ResolverSettings`.
    """

    def __init__(self, settings: ResolverSettings) -> None:
        self.settings = settings
        self.store = LocalStore(settings.registry)
        self._bases: dict[str, BaseInfo] = {}
        self._ids: dict[int, str] = {}
        self._lock = threading.Lock()
        self._pull_locks: dict[str, threading.Lock] = {}

    def resolve(self, base_model_name: str, text: str) -> VllmAdapter:
        """Resolve `text` (`name`, `name@3`, `name@tag`, `ns/name@3`) to a checked adapter for vLLM.

        Args:
            base_model_name: vLLM's `--model` (a folder or HF id), fingerprinted unless
                ADAPTERDOCK_BASE_PATH names the folder.
            text: the adapter name the request sent as `model`.

        Raises:
            InvalidReferenceError, AdapterNotFoundError, ChecksumMismatchError, ManifestError,
            NotServableError, BaseMismatchError, BaseNotFoundError, HubError.
        """
        ref = AdapterRef.parse(text)  # refuses paths: names never contain ':' '~' '..' or a leading '/'
        base = self.base_for(base_model_name)
        try:
            concrete = self.store.resolve(ref)
        except AdapterNotFoundError as exc:
            if not self.settings.hub_endpoint or "/" not in ref.name:
                hint = (
                    "; no hub is configured (ADAPTERDOCK_HUB)."
                    if not self.settings.hub_endpoint
                    else "; only NAMESPACE/NAME adapters are pulled from the hub."
                )
                raise AdapterNotFoundError(
                    exc.message, "Run `adapterdock hub list` to see what is registered" + hint
                ) from exc
            concrete = self._pull(ref, base)
        stored = self.store.get(concrete, verify=True)
        check_servable(stored.manifest, stored.path, base)
        return VllmAdapter(str(concrete), stored.path, self._id_for(str(concrete)), stored.manifest)

    def base_for(self, base_model_name: str) -> BaseInfo:
        """The base vLLM serves (ADAPTERDOCK_BASE_PATH, else its `--model`), fingerprinted once.

        Raises:
            BaseNotFoundError: with the remedy of setting ADAPTERDOCK_BASE_PATH.
        """
        key = str(self.settings.base_path or base_model_name)
        with self._lock:
            if key in self._bases:
                return self._bases[key]
        try:
            info = resolve_base(key)
        except BaseNotFoundError as exc:
            raise BaseNotFoundError(
                f"Cannot fingerprint the base vLLM serves ({key!r}): {exc.message}",
                f"Set {BASE_PATH_ENV} to the local folder of the model vLLM loads.",
            ) from exc
        with self._lock:
            self._bases[key] = info
        logger.info("adapterdock: vLLM's base %s has fingerprint %s", key, info.fingerprint)
        return info

    def _id_for(self, ref: str) -> int:
        """`stable_lora_id(ref)`, moved on by one past any id this process already gave another ref."""
        candidate = stable_lora_id(ref)
        with self._lock:
            while self._ids.get(candidate, ref) != ref:
                candidate = candidate % _MAX_ID + 1
            self._ids[candidate] = ref
        return candidate

    def _pull(self, ref: AdapterRef, base: BaseInfo) -> AdapterRef:
        """Pull `namespace/name` at `vN`, a tag or main from the hub, register it here, and return it."""
        with self._lock:
            lock = self._pull_locks.setdefault(ref.name, threading.Lock())
        with lock:
            try:  # pulled by another request while this one waited
                return self.store.resolve(ref)
            except AdapterNotFoundError:
                pass
            from hub.remote import HubClient  # huggingface_hub: imported only when a pull is needed

            client = HubClient(self.settings.hub_endpoint, self.settings.hub_token)
            revision = f"v{ref.version}" if ref.version is not None else ref.tag
            if revision == "latest":
                revision = None
            logger.info("adapterdock: pulling %s from hub %s", ref, client.endpoint)
            manifest = client.pull(  # the hub's version N is registered as N: `ns/name@N` means one thing
                ref.name, revision, self.store, as_name=ref.name, expected_base=base.spec, keep_version=True
            )
            pulled = AdapterRef(manifest.name, version=manifest.version)
            if ref.tag not in (None, "latest"):
                self.store.tag(pulled, ref.tag)
            logger.info("adapterdock: pulled %s from hub %s as %s", ref, client.endpoint, pulled)
            return pulled
