"""Traffic splits: a tag that sends requests to several versions by weight (canaries), and where they live.

`adapterdock hub route support prod --split 3=90,4=10` stores `{"prod": {"3": 90, "4": 10}}` in
`<root>/<name>/routes.json`, beside `tags.json`. The tag itself keeps naming one version in `tags.json` (the
heaviest of the split), so a registry with routes stays readable by anything that knows only tags (older
adapterdock, `hub show --resolve`, the vLLM resolver): they see a plain tag on the main version. A request
picks its version with `TrafficSplit.pick`: the same `user` always lands on the same version (a hash of
user, name and tag into the weight buckets), a request without one draws by weight.

Boundary: parsing, picking, and the file's contents. Locking and atomic writes are `hub.store`'s (through
`hub.durable`); serving is the server's.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from hub.durable import fsync_dir, write_atomic
from hub.errors import InvalidSplitError, RegistryError

ROUTES_FILE = "routes.json"
MAX_VERSIONS = 16
"""Most versions one split may name."""
_REMEDY = "Write --split VERSION=WEIGHT[,VERSION=WEIGHT...] with positive integer weights, e.g. 3=90,4=10."


@dataclass(frozen=True)
class TrafficSplit:
    """Versions and their integer weights, in ascending version order."""

    weights: tuple[tuple[int, int], ...]

    @property
    def total(self) -> int:
        return sum(weight for _, weight in self.weights)

    @property
    def versions(self) -> list[int]:
        return [version for version, _ in self.weights]

    @property
    def main(self) -> int:
        """The version with the largest weight (the lowest such version on a tie): what `tags.json` names."""
        return max(self.weights, key=lambda vw: (vw[1], -vw[0]))[0]

    def pick(self, user: str | None, name: str, tag: str) -> int:
        """The version one request goes to: sticky per `user`, else drawn by weight."""
        if user is None:
            point = random.randrange(self.total)
        else:
            digest = hashlib.sha256(f"{name}\0{tag}\0{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") % self.total
        for version, weight in self.weights:
            if point < weight:
                return version
            point -= weight
        raise AssertionError("unreachable: point < total")

    def describe(self) -> str:
        """`3=90,4=10`, the form `--split` takes."""
        return ",".join(f"{version}={weight}" for version, weight in self.weights)

    def to_json(self) -> dict[str, int]:
        return {str(version): weight for version, weight in self.weights}


def parse_split(text: str) -> TrafficSplit:
    """Parse `3=90,4=10`; every problem is reported at once.

    Raises:
        InvalidSplitError: malformed parts, non-positive weights, repeated versions, too many versions.
    """
    problems: list[str] = []
    weights: dict[int, int] = {}
    parts = [p.strip() for p in str(text).split(",")]
    for part in parts:
        version, sep, weight = (x.strip() for x in part.partition("="))
        if not sep or not version.isdigit() or not weight.lstrip("-").isdigit():
            problems.append(f"{part!r} is not VERSION=WEIGHT")
        elif int(version) < 1 or int(weight) < 1:
            problems.append(f"{part!r}: versions start at 1 and weights must be positive integers")
        elif int(version) in weights:
            problems.append(f"version {int(version)} appears twice")
        else:
            weights[int(version)] = int(weight)
    if len(weights) > MAX_VERSIONS:
        problems.append(f"{len(weights)} versions; a split names at most {MAX_VERSIONS}")
    if problems or not weights:
        found = "; ".join(problems or ["it is empty"])
        raise InvalidSplitError(f"Invalid split {text!r}: {found}.", _REMEDY)
    return TrafficSplit(tuple(sorted(weights.items())))


def read_routes(name_dir: Path) -> dict[str, TrafficSplit]:
    """The splits stored for one adapter name (none when the file does not exist: older registries).

    Raises:
        RegistryError: the file exists but is not a valid routes file.
    """
    path = name_dir / ROUTES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            str(tag): TrafficSplit(tuple(sorted((int(v), int(w)) for v, w in split.items())))
            for tag, split in data.items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise RegistryError(
            f"{path} is unreadable: {exc}.",
            f"Fix or delete {path} (tags.json still names each tag's version).",
        ) from exc


def write_routes(name_dir: Path, routes: dict[str, TrafficSplit]) -> None:
    """Replace the stored splits atomically (the file is removed when none are left)."""
    path = name_dir / ROUTES_FILE
    if not routes:
        if path.exists():
            path.unlink()
            fsync_dir(name_dir)
        return
    text = json.dumps({tag: split.to_json() for tag, split in sorted(routes.items())}, indent=2)
    write_atomic(path, text)
