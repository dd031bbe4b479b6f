"""Naming a base (built-in, folder, registry model, HF id) resolved to a folder, and its fingerprint.

A base is named by a built-in name (`hub/builtin_bases.py`: `smollm2-135m`, `tiny`, `small`), a local
HF-format folder, `registry:NAME[@VERSION]` (a full fine-tune in the registry) or an HF model id (from the
local HF cache, else downloaded from the Hub). Boundary: numpy and safetensors headers only; no torch. The
fingerprint identifies exact weights cheaply (config, safetensors headers and the weight bytes, sampled for
large models), so the same base gives the same fingerprint on every machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hub.builtin_bases import BUILTIN_BASES, builtin_path
from hub.errors import BaseNotFoundError
from hub.manifest import BaseSpec
from hub.safetensors_header import read_safetensors_header

logger = logging.getLogger(__name__)

_FULL_HASH_LIMIT = 256 << 20
_SAMPLE_CHUNKS, _CHUNK = 64, 64 << 10


@dataclass(frozen=True)
class BaseInfo:
    """A resolved base model: the name it was asked by, its folder, and its fingerprint."""

    name_or_path: str
    path: Path
    fingerprint: str

    @property
    def spec(self) -> BaseSpec:
        """What a manifest records about this base."""
        return BaseSpec(name_or_path=self.name_or_path, fingerprint=self.fingerprint)


# ---- resolution and fingerprint ----------------------------------------------------------------
def resolve_base(name_or_path: str, registry: str | Path | None = None) -> BaseInfo:
    """Find base `name_or_path` and fingerprint it.

    Args:
        name_or_path: built-in name, local folder, `registry:NAME[@V]`, or HF model id.
        registry: the registry root for `registry:` names (default: the default registry).

    Raises:
        BaseNotFoundError: if it cannot be found; the message lists the accepted forms.
    """
    if name_or_path in BUILTIN_BASES:
        path = builtin_path(name_or_path)
    elif name_or_path.startswith("registry:"):
        path = _registry_model_path(name_or_path.removeprefix("registry:"), registry)
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BaseNotFoundError(f"{path} has no config.json; it is not an HF-format model folder.")
    else:
        path = _hf_snapshot(name_or_path)
    return BaseInfo(name_or_path=name_or_path, path=path, fingerprint=base_fingerprint(path))


def _registry_model_path(ref: str, registry: str | Path | None) -> Path:
    from hub.store import LocalStore

    stored = LocalStore(registry).get(ref)
    if stored.manifest.kind != "model":
        raise BaseNotFoundError(
            f"registry:{ref} is an adapter ({stored.manifest.method}), not a full model.",
            "Serve the base it was trained on and request the adapter by name instead.",
        )
    return stored.path


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        pass
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown repo: all one answer to the user
        raise BaseNotFoundError(
            f"Base {repo_id!r} is not built in, not a folder, and not downloadable: {exc}."
        ) from exc


def base_fingerprint(path: str | Path) -> str:
    """A stable `sha256:<hex>` of a base's config and weights; sampled for models over 256 MiB."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BaseNotFoundError(f"{path} has no *.safetensors weights (adapterdock never loads pickles).")
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    config = path / "config.json"
    config_stat = (config.stat().st_size, config.stat().st_mtime_ns) if config.is_file() else (0, 0)
    return _fingerprint(str(path), stats, config_stat)


@functools.lru_cache(maxsize=64)
def _fingerprint(
    path_text: str, stats: tuple[tuple[str, int, int], ...], config_stat: tuple[int, int]
) -> str:
    del config_stat  # part of the cache key only: a changed config.json must be re-read
    path = Path(path_text)
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    full = sum(size for _, size, _ in stats) <= _FULL_HASH_LIMIT
    for name, size, _ in stats:
        file = path / name
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        digest.update(name.encode() + json.dumps(header, sort_keys=True).encode())
        with open(file, "rb") as handle:
            if full:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                continue
            for i in range(_SAMPLE_CHUNKS + 1):
                handle.seek(max(0, (size - _CHUNK) * i // _SAMPLE_CHUNKS))
                digest.update(handle.read(_CHUNK))
    return "sha256:" + digest.hexdigest()


def describe_base(info: BaseInfo) -> dict[str, Any]:
    """Path, parameter count, dtypes and fingerprint of a base, from its headers (no tensors loaded)."""
    params, dtypes = 0, set()
    for file in sorted(info.path.glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            params += int(np.prod(meta["shape"])) if meta["shape"] else 1
            dtypes.add(meta["dtype"])
    config = json.loads((info.path / "config.json").read_text())
    return {
        "name": info.name_or_path,
        "path": str(info.path),
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "parameters": params,
        "dtype": ", ".join(sorted(dtypes)),
        "fingerprint": info.fingerprint,
    }
