"""hub.traffic and `hub route`: split parsing (all problems at once), sticky and weighted picks, storage
beside tags.json (atomic, backward compatible), promotion, and what `hub show` prints."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from hub.cli import main as hub_main
from hub.errors import AdapterNotFoundError, InvalidReferenceError, InvalidSplitError, RegistryError
from hub.store import LocalStore
from hub.traffic import ROUTES_FILE, TrafficSplit, parse_split
from tests.hub.test_store import make_adapter, put


def test_parse_split() -> None:
    split = parse_split("4=10, 3=90")
    assert split.weights == ((3, 90), (4, 10)) and split.total == 100 and split.main == 3
    assert split.describe() == "3=90,4=10" and split.to_json() == {"3": 90, "4": 10}
    assert parse_split("1=1,2=1").main == 1  # a tie names the lower version


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("", ["'' is not VERSION=WEIGHT"]),
        ("3", ["'3' is not VERSION=WEIGHT"]),
        (
            "3=0,4=-2,x=1,5=1,5=2",
            ["'3=0': versions start at 1", "'4=-2'", "'x=1' is not", "version 5 appears"],
        ),
        ("3=1.5", ["'3=1.5' is not VERSION=WEIGHT"]),
        ("3=90,3=10", ["version 3 appears twice"]),
        (",".join(f"{v}=1" for v in range(1, 18)), ["17 versions; a split names at most 16"]),
    ],
)
def test_every_problem_of_a_split_is_named(text: str, problems: list[str]) -> None:
    with pytest.raises(InvalidSplitError) as caught:
        parse_split(text)
    for problem in problems:
        assert problem in str(caught.value)
    assert "e.g. 3=90,4=10" in str(caught.value)


def test_picks_are_sticky_per_user_and_follow_the_weights() -> None:
    split = TrafficSplit(((3, 90), (4, 10)))
    users = [f"user-{i}" for i in range(4000)]
    first = [split.pick(u, "support", "prod") for u in users]
    assert first == [split.pick(u, "support", "prod") for u in users]  # the same user, the same version
    # users spread over the buckets like weighted draws: 4 sigma of a binomial(4000, 0.1)
    sigma = math.sqrt(4000 * 0.1 * 0.9)
    assert abs(first.count(4) - 400) < 4 * sigma
    # another tag (or name) hashes independently
    other = [split.pick(u, "support", "beta") for u in users]
    assert other != first
    drawn = Counter(split.pick(None, "support", "prod") for _ in range(4000))
    assert abs(drawn[4] - 400) < 4 * sigma and set(drawn) == {3, 4}


@pytest.fixture
def three(registry: LocalStore, tmp_path: Path) -> LocalStore:
    src = make_adapter(tmp_path / "a")
    for _ in range(3):
        put(registry, src, name="support")
    registry.tag("support@1", "prod")
    return registry


def test_route_is_stored_beside_the_tags_and_readable_as_a_plain_tag(three: LocalStore) -> None:
    three.route("support", "prod", parse_split("2=10,3=90"))
    folder = three.root / "support"
    assert json.loads((folder / ROUTES_FILE).read_text()) == {"prod": {"2": 10, "3": 90}}
    # tags.json names the heaviest version: readers that know only tags see a plain tag on it
    assert json.loads((folder / "tags.json").read_text())["prod"] == 3
    assert str(three.resolve("support@prod")) == "support@3"
    assert three.routes("support") == {"prod": TrafficSplit(((2, 10), (3, 90)))}
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def test_route_validates_versions_and_tags(three: LocalStore) -> None:
    with pytest.raises(AdapterNotFoundError, match="no version 5, 7; it has 1, 2, 3"):
        three.route("support", "prod", parse_split("3=1,5=1,7=1"))
    with pytest.raises(InvalidReferenceError):
        three.route("support", "latest", parse_split("3=1"))
    with pytest.raises(InvalidReferenceError):
        three.route("support", "Bad Tag", parse_split("3=1"))
    assert three.routes("support") == {}


def test_a_plain_tag_promotes_and_deletion_prunes(three: LocalStore) -> None:
    three.route("support", "prod", parse_split("2=50,3=50"))
    three.route("support", "beta", parse_split("1=1,3=1"))
    three.tag("support@3", "prod")  # `hub route --promote 3`
    assert set(three.routes("support")) == {"beta"} and str(three.resolve("support@prod")) == "support@3"
    three.delete("support@1")
    assert three.routes("support") == {}  # beta named a deleted version
    assert not (three.root / "support" / ROUTES_FILE).exists()


def test_a_registry_without_routes_reads_as_before_and_a_broken_file_is_named(three: LocalStore) -> None:
    assert three.routes("support") == {} and str(three.resolve("support@prod")) == "support@1"
    (three.root / "support" / ROUTES_FILE).write_text("[1, 2]")
    with pytest.raises(RegistryError, match="routes.json is unreadable"):
        three.routes("support")


def test_cli_route_show_and_promote(three: LocalStore, capsys: pytest.CaptureFixture[str]) -> None:
    registry = ["--registry", str(three.root)]
    assert hub_main(["route", "support", "prod", "--split", "2=90,3=10", *registry]) == 0
    assert "support@prod -> support@2 90%, support@3 10% (split 2=90,3=10" in capsys.readouterr().out
    assert hub_main(["show", "support@prod", *registry]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("support@prod -> support@2 90%, support@3 10%") and '"version": 2' in shown
    assert hub_main(["route", "support", "prod", "--split", "2=90,9=10", *registry]) == 2
    assert "no version 9" in capsys.readouterr().err
    assert hub_main(["route", "support", "prod", "--split", "2=ninety", *registry]) == 2
    assert "'2=ninety' is not VERSION=WEIGHT" in capsys.readouterr().err
    assert hub_main(["route", "support", "prod", "--promote", "3", *registry]) == 0
    assert "support@prod -> support@3 (all traffic)" in capsys.readouterr().out
    assert three.routes("support") == {}
