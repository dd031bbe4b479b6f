"""hub.durable: files written all or nothing."""

from __future__ import annotations

import pytest

from hub.durable import write_atomic


def test_write_atomic_keeps_the_old_content_and_no_temporary_file_on_failure(tmp_path) -> None:
    path = tmp_path / "deep" / "tags.json"
    write_atomic(path, '{"prod": 1}')
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\udc80")  # a lone surrogate cannot be encoded: fails mid-write
    assert path.read_text() == '{"prod": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["tags.json"]
