"""The hub-pull record: persisted per hub endpoint, read once, and when to ask the hub again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from server.hub_pulls import RECORD_FILE, HubPullRecord, PulledAt

HUB, OTHER = "http://hub.test", "http://other.test"


def test_a_pull_is_recorded_per_endpoint_and_survives_a_restart(tmp_path: Path):
    record = HubPullRecord(tmp_path, HUB)
    assert record.get("acme/chat", "prod") is None
    record.put("acme/chat", "prod", PulledAt("abc", 3))
    assert record.get("acme/chat", "prod") == PulledAt("abc", 3)
    assert record.get("acme/chat", "main") is None
    restarted = HubPullRecord(tmp_path, HUB)
    assert restarted.get("acme/chat", "prod") == PulledAt("abc", 3)
    assert HubPullRecord(tmp_path, OTHER).get("acme/chat", "prod") is None
    on_disk = json.loads((tmp_path / RECORD_FILE).read_text())
    assert on_disk == {HUB: {"acme/chat": {"prod": {"commit": "abc", "version": 3}}}}


def test_due_follows_the_interval_and_a_negative_one_never_asks(tmp_path: Path):
    record = HubPullRecord(tmp_path, HUB)
    assert record.due("acme/chat", "prod", 3600)  # never asked in this process
    record.checked("acme/chat", "prod")
    assert not record.due("acme/chat", "prod", 3600)
    assert record.due("acme/chat", "prod", 0)
    assert not record.due("acme/chat", "other", -1)
    record.put("acme/chat", "main", PulledAt("def", 1))  # a pull counts as a check
    assert not record.due("acme/chat", "main", 3600)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_an_unreadable_record_is_treated_as_empty(tmp_path: Path, content: str, caplog):
    (tmp_path / RECORD_FILE).write_text(content)
    with caplog.at_level(logging.WARNING, logger="server.hub_pulls"):
        assert HubPullRecord(tmp_path, HUB).get("acme/chat", "prod") is None
    assert ("ignoring unreadable" in caplog.text) == (content == "{not json")


def test_a_malformed_entry_reads_as_missing(tmp_path: Path):
    bad = {HUB: {"acme/chat": {"prod": {"commit": "abc"}, "main": "not-a-dict", "v": {"version": "x"}}}}
    (tmp_path / RECORD_FILE).write_text(json.dumps(bad))
    record = HubPullRecord(tmp_path, HUB)
    assert [record.get("acme/chat", r) for r in ("prod", "main", "v")] == [None, None, None]
