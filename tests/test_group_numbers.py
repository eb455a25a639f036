"""Group numbers stay unique across restarts and crashes (exporter.group_numbers)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exporter.group_numbers import BLOCK, NumberReservations
from exporter.groups import GroupBook


def issue(book: GroupBook, n: int) -> list[int]:
    return [book._number() for _ in range(n)]


def test_numbers_are_reserved_before_use_and_a_new_process_starts_past_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "group_numbers.json"
    book = GroupBook(lambda c, m: 0)
    book.keep_numbers(NumberReservations(path))
    assert issue(book, 3) == [1, 2, 3]
    assert NumberReservations(path).load() == 1 + BLOCK  # reserved before the first was used
    issue(book, BLOCK)  # into the next block: reserved again before its first number
    assert NumberReservations(path).load() == 1 + 2 * BLOCK
    crashed = GroupBook(lambda c, m: 0)  # no snapshot since: a crash
    crashed.keep_numbers(NumberReservations(path))
    assert issue(crashed, 1) == [1 + 2 * BLOCK]
    assert book._next <= 1 + 2 * BLOCK  # nothing the first process issued is issued again


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"next": "7"}', b'{"next": 0}', b'{"next": true}', b"\xff",
                                     b'{"next": 1000000000000000000}'])
def test_an_unreadable_reservation_file_is_logged_and_the_snapshot_decides(tmp_path: Path, content: bytes,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "group_numbers.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="monitaur.groups"):
        assert NumberReservations(path).load() == 1
    assert "cannot read the reserved group numbers" in caplog.text


def test_a_reservation_that_cannot_be_written_is_logged_once_a_minute_and_groups_go_on(tmp_path: Path,
                                                                                        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    book = GroupBook(lambda c, m: 0)
    book.keep_numbers(NumberReservations(blocker / "group_numbers.json"))
    with caplog.at_level(logging.ERROR, logger="monitaur.groups"):
        assert issue(book, 2 * BLOCK + 1)[-1] == 2 * BLOCK + 1
    assert caplog.text.count("cannot reserve group numbers") == 1
