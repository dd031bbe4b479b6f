"""Which hub commit each movable reference was pulled at, so a tag moved on the hub is pulled again.

Boundary: a small JSON file in the registry root (`.hub-pulls.json`, ignored by the registry's
listing), keyed by hub endpoint, adapter name and hub revision (a tag, `main` for a plain name, or `vN`
for a pinned version, recorded so that a plain name is never answered by a version pulled by number).
It survives restarts, so a replica started on an old local copy still notices a moved tag. It
knows nothing about HTTP or the hub client; `server.resolver` does the checking and pulling.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hub.durable import write_atomic

logger = logging.getLogger(__name__)

RECORD_FILE = ".hub-pulls.json"


@dataclass(frozen=True)
class PulledAt:
    """The hub commit a (name, revision) was last pulled or confirmed at, and its local version."""

    commit: str
    version: int


class HubPullRecord:
    """Thread-safe record of pulls from one hub endpoint, persisted next to the registry."""

    def __init__(self, registry_root: Path, endpoint: str) -> None:
        self.path = Path(registry_root) / RECORD_FILE
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, str], float] = {}  # in memory: when the hub was last asked
        self._data: dict | None = None  # the file's content, read once (requests consult it often)

    def get(self, name: str, revision: str) -> PulledAt | None:
        with self._lock:
            entry = self._loaded().get(self.endpoint, {}).get(name, {}).get(revision)
        if not isinstance(entry, dict):
            return None
        try:
            return PulledAt(commit=str(entry["commit"]), version=int(entry["version"]))
        except (KeyError, TypeError, ValueError):
            return None

    def pulled(self, name: str) -> bool:
        """Whether any revision of `name` was pulled from this hub (a `vN` too)."""
        with self._lock:
            return bool(self._loaded().get(self.endpoint, {}).get(name))

    def put(self, name: str, revision: str, pulled: PulledAt) -> None:
        with self._lock:
            data = self._loaded()
            data.setdefault(self.endpoint, {}).setdefault(name, {})[revision] = {
                "commit": pulled.commit,
                "version": pulled.version,
            }
            write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True))
            self._checked[(name, revision)] = time.monotonic()

    def due(self, name: str, revision: str, every_s: float) -> bool:
        """Whether the hub should be asked again (never, for a negative `every_s`)."""
        if every_s < 0:
            return False
        last = self._checked.get((name, revision))
        return last is None or time.monotonic() - last >= every_s

    def checked(self, name: str, revision: str) -> None:
        self._checked[(name, revision)] = time.monotonic()

    def _loaded(self) -> dict:
        if self._data is None:
            self._data = self._read()
        return self._data

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s (%s); moved hub tags are checked afresh", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}
