"""One registered version's folder: its files' entries (size + sha256), copied in, checked; its card.

`copy_files` copies an adapter folder into a staging folder and returns the manifest's file entries;
`verify_files` checks a folder against the entries its manifest lists; `render_card` writes the minimal model
card of a version registered without one. Boundary: one folder and its manifest; naming, versions, tags,
locking and the atomic rename into the registry are `hub.store`'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hub.durable import make_dirs, sha256_file
from hub.errors import ChecksumMismatchError, CorruptAdapterError
from hub.manifest import MANIFEST_FILE, FileEntry, Manifest


def file_entry(path: Path) -> FileEntry:
    """The manifest entry of one file: its sha256 and size."""
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def copy_files(src: Path, dst: Path) -> dict[str, FileEntry]:
    """Copy every file below `src` (but a top-level manifest.json) into `dst`; return their entries.

    Raises:
        CorruptAdapterError: a symbolic link in `src`.
    """
    files: dict[str, FileEntry] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_symlink():
            raise CorruptAdapterError(f"{path} is a symbolic link.", "Copy the real file into the folder.")
        if path.is_dir() or rel.name == MANIFEST_FILE and len(rel.parts) == 1:
            continue
        target = dst / rel
        make_dirs(target.parent)
        shutil.copyfile(path, target)
        files[rel.as_posix()] = file_entry(target)
    return files


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its size and sha256.

    Raises:
        ChecksumMismatchError: naming the first file that is missing or differs.
    """
    for fname, entry in sorted(manifest.files.items()):
        path = folder / fname
        if not path.is_file():
            raise ChecksumMismatchError(f"{manifest.ref}: file {fname} is missing.", path=str(path))
        size = path.stat().st_size
        if entry.size >= 0 and size != entry.size:
            raise ChecksumMismatchError(
                f"{manifest.ref}: file {fname} is {size} bytes, the manifest says {entry.size}.",
                path=str(path),
            )
        if sha256_file(path) != entry.sha256:
            raise ChecksumMismatchError(
                f"{manifest.ref}: file {fname} does not match its sha256.", path=str(path)
            )


def render_card(manifest: Manifest) -> str:
    """A minimal model card for a version registered without one."""
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted(manifest.metrics.items())) or "| - | - |"
    labels = ", ".join(manifest.labels) if manifest.labels else "-"
    return (
        f"---\nlibrary_name: peft\nbase_model: {manifest.base.name_or_path}\ntags:\n- adapterdock\n"
        f"- {manifest.task}\n- {manifest.method}\n---\n\n"
        f"# {manifest.name} v{manifest.version}\n\n"
        f"{manifest.description or 'A ' + manifest.task + ' adapter registered with adapterdock.'}\n\n"
        f"- task: {manifest.task}\n- method: {manifest.method}\n"
        f"- base: {manifest.base.name_or_path} ({manifest.base.fingerprint})\n- labels: {labels}\n\n"
        f"| metric | value |\n|---|---|\n{metrics}\n"
    )
