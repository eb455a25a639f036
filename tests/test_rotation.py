"""Rotation without loss: rotated names, renames while stopped, copytruncate's copy, durable records.

Each test drives a real Tailer over real files and checks the exact lines delivered: a
lost or repeated line fails it. A "restart" is a second Tailer loading the offsets the
first one wrote; a SIGKILL is one that loads the *durable* offsets (those written at a
rotation, matching the last committed checkpoint) rather than the current ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from exporter import tailer as tailer_mod
from exporter.tailer import rotated_origins
from tests.test_tailer import Harness, after_stage, append


def restart(tmp_path: Path, ckpt: Path, **cfg: object) -> Harness:
    h = Harness(tmp_path, **cfg)
    h.tailer.load_offsets(ckpt)
    return h


@pytest.mark.parametrize(
    "name, origins",
    [
        ("app.jsonl.1", ["app.jsonl"]),
        ("app.jsonl.12", ["app.jsonl"]),
        ("app.jsonl-20261205", ["app.jsonl"]),
        ("app.jsonl.2026-12-05_10-00-00", ["app.jsonl"]),
        ("app-20261205.jsonl", ["app.jsonl"]),  # logrotate's `extension .jsonl`
        ("app.1.jsonl", ["app.jsonl"]),
        ("app.jsonl.1.gz", []),  # compressed: another inode, not readable as lines anyway
        ("app.jsonl-20261205.gz", []),
        ("app.jsonl", []),
        ("app-errors.jsonl", []),  # another log, not a rotation: the suffix must start with a digit
        ("app.jsonl.bak", []),
    ],
)
def test_rotated_names(name: str, origins: list[str]) -> None:
    assert rotated_origins(name)[:1] == origins


def test_lines_counter_never_drops_at_a_rotation_and_rotations_start_at_zero(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    assert h.sample("monitaur_file_rotations_total", log) == 0  # there from the start, so increase() sees the first
    assert h.sample("monitaur_file_truncations_total", log) == 0
    os.rename(log, h.dir / "app.jsonl.1")
    assert h.poll() == []  # a poll between the rename and the new file: the series stays
    assert h.sample("monitaur_file_lines_total", log) == 2
    append(log, b"3\n")
    assert h.poll() == [b"3"]
    assert h.sample("monitaur_file_lines_total", log) == 3
    assert h.sample("monitaur_file_rotations_total", log) == 1
    h.tailer.close()


@pytest.mark.parametrize("rotated", ["app.jsonl.1", "app.jsonl-20261205", "app-20261205.log"])
def test_renames_while_stopped_are_read_exactly_once(tmp_path: Path, rotated: str) -> None:
    """Stopped cleanly, then two rotations: the unread tail and a file created and rotated away meanwhile are read once."""
    first = Harness(tmp_path, paths=[str(tmp_path / "logs" / "app.*")] if rotated.endswith(".log") else [])
    if rotated.endswith(".log"):
        log = first.dir / "app.log"
    else:
        first = Harness(tmp_path)
        log = first.dir / "app.jsonl"
    ckpt = tmp_path / "offsets.json"
    append(log, b"a1\na2\n")
    assert first.poll() == [b"a1", b"a2"]
    first.tailer.close()
    first.tailer.save_offsets(ckpt)
    append(log, b"a3\n")  # written while stopped: the unread tail
    os.rename(log, first.dir / rotated)
    append(log, b"b1\nb2\n")
    os.rename(log, first.dir / (rotated.replace("1", "0", 1) if "2026" in rotated else "app.jsonl.0"))  # a second rotation
    append(log, b"c1\n")
    second = restart(tmp_path, ckpt, paths=first.cfg.paths)
    assert sorted(second.poll()) == [b"a3", b"b1", b"b2", b"c1"]
    assert second.poll() == []
    assert second.sample("monitaur_file_rotations_total", log) == 1  # seen once: the saved file's path holds a new one
    second.tailer.close()


def test_rotated_dirs_olddir(tmp_path: Path) -> None:
    first = Harness(tmp_path, rotated_dirs=["old"])
    (first.dir / "old").mkdir()
    log, ckpt = first.dir / "app.jsonl", tmp_path / "offsets.json"
    append(log, b"1\n")
    assert first.poll() == [b"1"]
    first.tailer.close()
    first.tailer.save_offsets(ckpt)
    append(log, b"2\n")
    os.rename(log, first.dir / "old" / "app.jsonl.1")
    second = restart(tmp_path, ckpt, rotated_dirs=["old"])
    assert second.poll() == [b"2"]
    second.tailer.close()


def test_rotated_files_present_at_the_first_start_are_history(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    append(h.dir / "app.jsonl.2", b"old-2\n")
    append(h.dir / "app.jsonl.1", b"old-1\n")
    append(h.dir / "app.jsonl", b"now\n")
    assert h.poll() == [b"now"]
    append(h.dir / "other.jsonl.1", b"older\n")  # history of a path first seen later ...
    append(h.dir / "other.jsonl", b"o1\n")
    assert h.poll() == [b"o1"]
    append(h.dir / "app.jsonl.1", b"late\n")  # ... but a history file that grows is read from where it was
    h.tailer._family_due = 0
    assert h.poll() == [b"late"]
    h.tailer.close()


def test_a_file_created_and_rotated_between_two_polls_is_read(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"a1\n")
    assert h.poll() == [b"a1"]
    os.rename(log, h.dir / "app.jsonl-1")
    append(log, b"b1\n")
    os.rename(log, h.dir / "app.jsonl-2")
    append(log, b"c1\n")
    assert h.poll() == [b"b1", b"c1"]
    h.tailer.close()


def test_copytruncate_reads_the_unread_rest_from_the_copy(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    append(log, b"3\n4\n")  # not read yet when logrotate copies and truncates
    shutil.copyfile(log, h.dir / "app.jsonl.1")
    os.truncate(log, 0)
    append(log, b"new-1\n")
    assert h.poll() == [b"3", b"4", b"new-1"]
    assert h.sample("monitaur_file_truncations_total", log) == 1
    assert h.sample("monitaur_file_lines_total", log) == 5
    assert h.poll() == []
    shutil.copyfile(log, h.dir / "app.jsonl.bak")  # a backup: a copy of what we read, never read itself
    append(log, b"new-2\n")
    assert h.poll() == [b"new-2"]
    h.tailer._family_due = 0
    assert h.poll() == []
    h.tailer.close()


def test_copytruncate_while_stopped_reads_the_rest_from_the_copy(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    log, ckpt = first.dir / "app.jsonl", tmp_path / "offsets.json"
    append(log, b"old-1\nold-2\n")
    assert first.poll() == [b"old-1", b"old-2"]
    first.tailer.close()
    first.tailer.save_offsets(ckpt)
    append(log, b"old-3\n")
    shutil.copyfile(log, first.dir / "app.jsonl.1")
    os.truncate(log, 0)
    append(log, b"mid-1\n")
    shutil.copyfile(log, first.dir / "app.jsonl.0")  # a second copytruncate: content we never saw
    os.truncate(log, 0)
    append(log, b"new-1\nnew-2\n")
    second = restart(tmp_path, ckpt)
    assert sorted(second.poll()) == [b"mid-1", b"new-1", b"new-2", b"old-3"]
    assert second.poll() == []
    second.tailer.close()


@pytest.mark.parametrize("caught", [0, 5, 11, 300])  # bytes of the copy written when we look: none, mid-line, a line, 256+
def test_a_copy_caught_half_written_is_never_read(tmp_path: Path, caught: int) -> None:
    h = Harness(tmp_path)
    log, copy = h.dir / "app.jsonl", h.dir / "app.jsonl-20261205"
    lines = [b"line-%03d" % i for i in range(40)]
    append(log, b"\n".join(lines[:30]) + b"\n")
    assert h.poll() == lines[:30]
    append(log, b"\n".join(lines[30:]) + b"\n")  # not read yet when logrotate starts copying
    data = log.read_bytes()
    copy.write_bytes(data[:caught])
    h.tailer._family_due = 0  # the rotated names are listed while the copy is being written
    assert h.poll() == lines[30:]
    append(copy, data[caught:])  # the copy grows: that is not new lines
    os.truncate(log, 0)
    append(log, b"new-1\n")
    h.tailer._family_due = 0
    assert h.poll() == [b"new-1"]
    h.tailer.close()


def test_a_truncation_inside_the_poll_that_found_the_copy_reads_the_copy(tmp_path: Path) -> None:
    """The copy is judged by the live file's bytes, and the truncation lands before those bytes were read or fingerprinted."""
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"0\n")
    assert h.poll() == [b"0"]
    os.rename(log, h.dir / "app.jsonl.1")
    log.touch()
    assert h.poll() == []  # the new file, first seen empty: no fingerprint
    append(log, b"1\n2\n")
    shutil.copyfile(log, h.dir / "app.jsonl-20261205")
    h.tailer._family_due = 0
    with after_stage(h.tailer, "_rotated_names", lambda: os.truncate(log, 0)):
        assert h.poll() == [b"1", b"2"]
    append(log, b"3\n")
    assert h.poll() == [b"3"]
    h.tailer.close()


@pytest.mark.parametrize("read", [0, 2])  # lines of the old content read before: none, or some
def test_a_copytruncate_refilled_between_the_check_and_the_read_hands_over_no_new_bytes_at_old_offsets(tmp_path: Path, read: int) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    old = [b"old-%02d-%s" % (i, b"x" * 40) for i in range(12)]  # over 256 bytes: fingerprinted by its first 256
    new = [b"NEW-%02d" % i for i in range(30)]
    append(log, b"\n".join(old[:read]) + b"\n" if read else b"")
    assert h.poll() == old[:read]
    append(log, b"\n".join(old[read:]) + b"\n")

    def copytruncate() -> None:
        shutil.copyfile(log, h.dir / "app.jsonl-20261205")
        os.truncate(log, 0)
        append(log, b"\n".join(new) + b"\n")  # refilled past the old offsets before the read

    with after_stage(h.tailer, "_check", copytruncate):
        first = h.poll()
    h.tailer._family_due = 0
    assert first + h.poll() == old[read:] + new
    h.tailer.close()


def test_files_renamed_between_the_listing_and_the_look_are_not_mistaken_for_each_other(tmp_path: Path) -> None:
    """Each listed file is read through its own descriptor: its path may hold another file by then."""
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"a-1\n")
    assert h.poll() == [b"a-1"]
    os.rename(log, h.dir / "app.jsonl-1")  # a (followed) ...
    append(log, b"b-1\n")
    os.rename(log, h.dir / "app.jsonl.1")  # ... and b, created and rotated between two polls
    append(log, b"c-1\n")

    def rotate_again() -> None:  # as soon as the names are listed: a onto b's path
        os.rename(h.dir / "app.jsonl.1", h.dir / "app.jsonl-2")
        os.rename(h.dir / "app.jsonl-1", h.dir / "app.jsonl.1")

    with after_stage(h.tailer, "_list_rotated", rotate_again):
        delivered = h.poll()
    h.tailer._family_due = 0
    delivered += h.poll()
    assert sorted(delivered) == [b"b-1", b"c-1"]
    h.tailer.close()


def test_a_copy_of_a_file_first_seen_in_the_same_poll_is_not_read(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"0\n")
    assert h.poll() == [b"0"]
    os.rename(log, h.dir / "app.jsonl.1")
    append(log, b"1\n2\n")  # a new file, then its copy, before the next poll
    shutil.copyfile(log, h.dir / "app.jsonl-20261205")
    assert h.poll() == [b"1", b"2"]
    os.truncate(log, 0)
    assert h.poll() == []
    h.tailer.close()


def test_a_kill_after_a_copytruncate_of_a_file_first_seen_empty_rereads_its_copy(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    durable = tmp_path / "offsets.json"
    Recorder(h, durable)
    log = h.dir / "app.jsonl"
    log.touch()
    assert h.poll() == []  # first seen empty: no fingerprint yet
    h.tailer.offsets_snapshot().commit()  # the last state written holds none of its lines
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]  # its first line is now known, and recorded
    shutil.copyfile(log, h.dir / "app.jsonl-20261205")
    h.tailer._family_due = 0
    assert h.poll() == []  # the copy is seen (and recorded) before the truncation
    os.truncate(log, 0)
    append(log, b"new-1\n")
    killed = restart(tmp_path, durable)  # SIGKILL before the truncation was seen
    assert sorted(killed.poll()) == [b"1", b"2", b"new-1"]
    killed.tailer.close()
    h.tailer.close()


def test_a_copytruncate_while_stopped_refilled_to_the_same_size_is_noticed(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    log, ckpt = first.dir / "app.jsonl", tmp_path / "offsets.json"
    rotated = first.dir / "app.jsonl.1"
    append(log, b"old-1\nold-2\n")
    assert first.poll() == [b"old-1", b"old-2"]
    os.rename(log, rotated)
    assert first.poll() == []
    first.tailer.close()
    first.tailer.save_offsets(ckpt)
    shutil.copyfile(rotated, first.dir / "app.jsonl-20261205")
    with open(rotated, "r+b") as fh:  # truncated and refilled to the very size we had read to
        fh.truncate(0)
        fh.write(b"NEW-1\nNEW-2\n")
    second = restart(tmp_path, ckpt)
    assert second.poll() == [b"NEW-1", b"NEW-2"]
    assert second.poll() == []
    second.tailer.close()


def test_a_copytruncate_while_killed_back_to_the_durable_offset_reads_the_copy(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    durable = tmp_path / "offsets.json"
    Recorder(h, durable)
    log, rotated = h.dir / "app.jsonl", h.dir / "app.jsonl.1"
    assert h.poll() == []
    h.tailer.offsets_snapshot().commit()  # the last state written: none of the lines below
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    os.rename(log, rotated)
    assert h.poll() == []  # the rename is recorded: app.jsonl.1 at offset 0 of its content
    shutil.copyfile(rotated, h.dir / "app.jsonl-20261205")  # SIGKILL, then a copytruncate back to 0 bytes
    os.truncate(rotated, 0)
    killed = restart(tmp_path, durable)
    assert sorted(killed.poll()) == [b"1", b"2"]
    assert killed.sample("monitaur_file_truncations_total", log) == 1
    killed.tailer.close()
    h.tailer.close()


def test_version_1_checkpoints_are_read(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    log, ckpt = first.dir / "app.jsonl", tmp_path / "offsets.json"
    append(log, b"1\n2\n")
    assert first.poll() == [b"1", b"2"]
    first.tailer.close()
    doc = json.loads(first.tailer.offsets_data())
    for e in doc["files"]:
        del e["origin"]
    ckpt.write_text(json.dumps({**doc, "version": 1}))
    append(h_old := first.dir / "app.jsonl.7", b"ancient\n")  # history: never read
    append(log, b"3\n")
    os.rename(log, first.dir / "app.jsonl.1")
    second = restart(tmp_path, ckpt)
    assert second.poll() == [b"3"]
    assert h_old.exists()
    second.tailer.close()


# -- durable records: what a SIGKILL leaves -----------------------------------------------------
class Recorder:
    """Stands in for the Checkpointer: writes the durable offsets whenever the tailer reports a change."""

    def __init__(self, h: Harness, path: Path) -> None:
        self.path = path
        self.calls: list[int] = []
        self.h = h
        h.tailer.on_change = self.record

    def record(self) -> None:
        self.calls.append(len(self.h.lines))
        self.path.write_bytes(self.h.tailer.durable_offsets())


def test_a_rotation_is_recorded_before_its_lines_and_a_kill_rereads_exactly_the_uncommitted(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    durable = tmp_path / "offsets.json"
    rec = Recorder(h, durable)
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    assert rec.calls == [0]  # the new file was recorded before its lines were delivered
    snap = h.tailer.offsets_snapshot()  # a full checkpoint: state + these offsets ...
    append(log, b"3\n")
    assert h.poll() == [b"3"]
    snap.commit()  # ... written: lines 1 and 2 are in the saved state
    os.rename(log, h.dir / "app.jsonl.1")  # renamed out of the glob ...
    append(log, b"new-1\n")
    assert h.poll() == [b"new-1"]
    assert rec.calls == [0, 3]
    # ... then SIGKILL: the state on disk has lines 1-2, the offsets say so.
    killed = restart(tmp_path, durable)
    assert sorted(killed.poll()) == [b"3", b"new-1"]  # exactly what the restored state lacks
    killed.tailer.close()
    h.tailer.close()


def test_a_commit_taken_before_a_copytruncate_applies_to_the_copy(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    durable = tmp_path / "offsets.json"
    Recorder(h, durable)
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    snap = h.tailer.offsets_snapshot()  # copied with the state: lines 1-2
    append(log, b"3\n")
    assert h.poll() == [b"3"]
    shutil.copyfile(log, h.dir / "app.jsonl.1")
    os.truncate(log, 0)
    append(log, b"new-1\n")
    assert h.poll() == [b"new-1"]
    snap.commit()  # written after the truncation: it describes the old content, now in the copy
    append(log, b"new-2\n")
    os.rename(log, h.dir / "app.jsonl-20261206")  # any later change records the durable positions
    assert h.poll() == [b"new-2"]
    killed = restart(tmp_path, durable)
    assert sorted(killed.poll()) == [b"3", b"new-1", b"new-2"]
    killed.tailer.close()
    h.tailer.close()


def test_first_start_history_is_recorded_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    durable = tmp_path / "offsets.json"
    Recorder(h, durable)
    append(h.dir / "app.jsonl.1", b"history\n")
    log = h.dir / "app.jsonl"
    append(log, b"1\n")
    assert h.poll() == [b"1"]
    os.rename(log, h.dir / "app.jsonl.0")  # rotated after our start ...
    append(log, b"2\n")
    assert h.poll() == [b"2"]
    killed = restart(tmp_path, durable)  # ... and killed before any checkpoint: not history, read again
    assert sorted(killed.poll()) == [b"1", b"2"]
    killed.tailer.close()
    h.tailer.close()


def test_progress_reports_a_file_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    log = h.dir / "app.jsonl"
    append(log, b"1\n")
    assert h.poll() == [b"1"]
    assert h.tailer.progress == ()
    real_pread = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        if offset > 0:
            raise OSError(5, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(tailer_mod.os, "pread", failing)
    append(log, b"2\n")
    assert h.poll() == []
    [p] = h.tailer.progress
    assert (p.path, p.unread_bytes) == (str(log), 2)
    monkeypatch.setattr(tailer_mod.os, "pread", real_pread)
    assert h.poll() == [b"2"] and h.tailer.progress == ()
    h.tailer.close()


def test_a_file_that_only_starts_like_a_known_one_is_not_taken_for_a_copy(tmp_path: Path) -> None:
    """Repetitive logs: two files can share their first 256 bytes without one being a copy."""
    header = b"".join(b'{"same":"header line %d"}\n' % i for i in range(12))  # over 256 bytes
    first = Harness(tmp_path)
    log, ckpt = first.dir / "app.jsonl", tmp_path / "offsets.json"
    append(log, header + b"a1\n")
    assert len(first.poll()) == 13
    first.tailer.close()
    first.tailer.save_offsets(ckpt)
    os.rename(log, first.dir / "app.jsonl-1")
    append(log, header + b"b1\n")  # starts alike, different content: created ...
    os.rename(log, first.dir / "app.jsonl-2")  # ... and rotated while stopped
    append(log, b"c1\n")
    second = restart(tmp_path, ckpt)
    assert sorted(second.poll()) == sorted(header.splitlines() + [b"b1", b"c1"])
    second.tailer.close()


def test_a_backlog_is_read_a_budget_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tailer_mod, "POLL_BUDGET_BYTES", 10)
    monkeypatch.setattr(tailer_mod, "CHUNK_BYTES", 4)
    h = Harness(tmp_path)
    rotated, log = h.dir / "app.jsonl.1", h.dir / "app.jsonl"
    append(log, b"old-1\nold-2\nold-3\n")
    assert h.poll() == [b"old-1", b"old-2"]
    assert h.tailer.more
    os.rename(log, rotated)
    append(log, b"new-1\n")
    assert h.poll() == [b"old-3"]  # the rotated file first: older lines
    assert h.poll() == [b"new-1"]
    assert not h.tailer.more and h.tailer.progress == ()
    h.tailer.close()
