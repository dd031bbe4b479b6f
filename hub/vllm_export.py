"""Registry adapters written out for vLLM's `--lora-modules`: plain PEFT folders plus the `vllm serve` line.

For teams that prefer a fixed adapter list to the resolver plugin (`hub.vllm_plugin`). Each reference is
resolved to its immutable `name@version`, verified, and checked with `hub.vllm_resolver.check_servable`
(generation task, plain LoRA, the same base for all); its `adapter_config.json`,
`adapter_model.safetensors` and card are copied to `<out>/<name>@<version>/` and checked again there.
The command line names each module by its immutable reference, so clients send the same `model` string as
they would through the plugin. Run as `adapterdock export vllm REF... --out DIR`.
Boundary: hub code only (no torch, no vLLM); it writes files and prints, it starts nothing.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hub.adapter_format import ADAPTER_CONFIG, WEIGHTS_FILE, load_config
from hub.bases import BaseInfo, resolve_base
from hub.durable import sha256_file
from hub.errors import BaseMismatchError, ChecksumMismatchError
from hub.manifest import Manifest
from hub.store import LocalStore, StoredAdapter
from hub.vllm_resolver import check_servable

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank`."""
EXPORTED_FILES = (ADAPTER_CONFIG, WEIGHTS_FILE, "README.md")
SCRIPT = "vllm-serve.sh"


@dataclass(frozen=True)
class VllmExport:
    """What `export_for_vllm` wrote."""

    modules: dict[str, Path]
    """Immutable `name@version` -> its exported PEFT folder."""
    command: list[str]
    """The `vllm serve` argv that serves them all."""
    script: Path
    """`<out>/vllm-serve.sh`, the same command as a script."""

    @property
    def command_line(self) -> str:
        """The command, one option per line, ready to paste into a shell."""
        head, rest = self.command[:3], self.command[3:]
        pairs = [" ".join(shlex.quote(x) for x in rest[i : i + 2]) for i in range(0, len(rest), 2)]
        return " \\\n  ".join([shlex.join(head), *pairs])


def export_for_vllm(
    store: LocalStore, refs: Sequence[str], out: Path, base: BaseInfo | None = None
) -> VllmExport:
    """Write `refs` as plain PEFT folders under `out` and the `vllm serve` command that serves them.

    Args:
        store: the registry holding the adapters.
        refs: references (`name`, `name@3`, `name@prod`); each is exported as its immutable version.
        out: the folder to write (created; an existing export of the same version is replaced).
        base: the base vLLM will serve; default: the base the first adapter was trained on.

    Raises:
        NotServableError, BaseMismatchError, ChecksumMismatchError, AdapterNotFoundError,
        BaseNotFoundError: nothing is written for a list with any such adapter.
    """
    stored = [store.get(ref, verify=True) for ref in refs]
    base = base or resolve_base(stored[0].manifest.base.name_or_path, registry=store.root)
    for item in stored:
        check_servable(item.manifest, item.path, base)
    out.mkdir(parents=True, exist_ok=True)
    modules = {item.manifest.ref: _copy_version(item, out) for item in stored}
    command = [
        "vllm", "serve", _model_argument(base), "--enable-lora",
        "--max-loras", str(len(modules)), "--max-lora-rank", str(_vllm_rank(stored)),
    ]  # fmt: skip
    for ref, folder in modules.items():
        command += ["--lora-modules", f"{ref}={folder.resolve()}"]
    export = VllmExport(modules=modules, command=command, script=out / SCRIPT)
    export.script.write_text(f"#!/usr/bin/env bash\n{export.command_line}\n", encoding="utf-8")
    export.script.chmod(0o755)
    logger.info("exported %s for vLLM to %s", ", ".join(modules), out)
    return export


def _copy_version(item: StoredAdapter, out: Path) -> Path:
    """Copy one version's PEFT files into `<out>/<name>@<version>/` (staged, checked, then renamed)."""
    manifest = item.manifest
    target = out / f"{manifest.name.replace('/', '__')}@{manifest.version}"
    staging = out / f".{target.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for name in EXPORTED_FILES:
            if (item.path / name).is_file():
                shutil.copyfile(item.path / name, staging / name)
        _verify_copy(staging, manifest)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _verify_copy(folder: Path, manifest: Manifest) -> None:
    for name in EXPORTED_FILES:
        entry = manifest.files.get(name)
        if entry is not None and sha256_file(folder / name) != entry.sha256:
            raise ChecksumMismatchError(f"{manifest.ref}: the exported {name} differs from the registry's.")


def _vllm_rank(stored: Sequence[StoredAdapter]) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that covers every adapter's rank (and rank_pattern)."""
    ranks = [1]
    for item in stored:
        config = load_config(item.path / ADAPTER_CONFIG)
        ranks += [int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    need = max(ranks)
    for rank in VLLM_LORA_RANKS:
        if rank >= need:
            return rank
    raise BaseMismatchError(
        f"A rank of {need} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})."
    )


def _model_argument(base: BaseInfo) -> str:
    """An HF id as given (vLLM fetches or finds it itself); otherwise the folder we fingerprinted."""
    name = base.name_or_path
    looks_like_hf_id = (
        "/" in name and not Path(name).expanduser().exists() and not name.startswith("registry:")
    )
    return name if looks_like_hf_id else str(base.path)
