"""Tests of the file tailer against real files: appends, rotation, truncation, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from exporter import reasons, tailer as tailer_mod
from exporter.config import FilesConfig
from exporter.metrics import Metrics
from exporter.tailer import Tailer


class Harness:
    """A Tailer over ``tmp_path/logs`` that records what it delivers and rejects."""

    def __init__(self, tmp_path: Path, metrics: Metrics | None = None, batch_lines: int = 1000, **cfg: object) -> None:
        self.dir = tmp_path / "logs"
        self.dir.mkdir(exist_ok=True)
        cfg.setdefault("paths", [str(self.dir / "*.jsonl")])
        cfg.setdefault("mode", "poll")
        self.cfg = FilesConfig(**cfg)
        self.metrics = metrics or Metrics()
        self.batches: list[list[bytes]] = []
        self.rejects: list[str] = []
        self.tailer = Tailer(self.cfg, self.batches.append, self.metrics, self.rejects.append, batch_lines=batch_lines)

    def poll(self) -> list[bytes]:
        """Poll once; return the lines delivered by this poll (and check the returned count)."""
        before = len(self.lines)
        n = self.tailer.poll_once()
        new = self.lines[before:]
        assert n == len(new)
        return new

    @property
    def lines(self) -> list[bytes]:
        return [line for batch in self.batches for line in batch]

    def sample(self, name: str, path: Path | str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"path": str(path)})


@pytest.fixture
def h(tmp_path: Path):
    harness = Harness(tmp_path)
    yield harness
    harness.tailer.close()


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


@contextmanager
def after_stage(tailer: Tailer, stage: str, action: Callable[[], object]) -> Iterator[list[bool]]:
    """Run ``action`` once, right after the tailer's method ``stage`` first returns: a writer acting in the middle of a poll.

    Yields a list that holds ``True`` once the action ran.
    """
    inner, done = getattr(tailer, stage), []

    def wrapped(*args: object, **kwargs: object) -> object:
        out = inner(*args, **kwargs)
        if not done:
            action()
            done.append(True)
        return out

    setattr(tailer, stage, wrapped)
    try:
        yield done
    finally:
        delattr(tailer, stage)


def test_appends_and_partial_lines(h: Harness) -> None:
    log = h.dir / "app.jsonl"
    append(log, b'{"a":1}\n{"b":2}\n{"par')
    assert h.poll() == [b'{"a":1}', b'{"b":2}']
    assert h.poll() == []
    append(log, b'tial":3}\n\n\n{"c":4}\n')
    assert h.poll() == [b'{"partial":3}', b'{"c":4}']
    size = log.stat().st_size
    assert h.sample("monitaur_file_lines_total", log) == 4
    assert h.sample("monitaur_file_offset_bytes", log) == size
    assert h.sample("monitaur_file_size_bytes", log) == size
    append(log, b"tail-without-newline")
    assert h.poll() == []
    # The checkpointable offset stays after the last complete line.
    assert h.sample("monitaur_file_offset_bytes", log) == size
    assert h.sample("monitaur_file_size_bytes", log) == size + len(b"tail-without-newline")


def test_blank_lines_are_skipped_not_delivered(h: Harness) -> None:
    """Empty and whitespace-only lines (CRLF files' blank lines included) are skipped, as in push."""
    log = h.dir / "app.jsonl"
    append(log, b'{"a":1}\r\n\r\n   \n\t \r\n\x0b\n{"b":2}\n\n')
    assert h.poll() == [b'{"a":1}\r', b'{"b":2}']
    assert h.rejects == []
    assert h.sample("monitaur_file_lines_total", log) == 2
    assert h.sample("monitaur_file_offset_bytes", log) == log.stat().st_size


def test_batches_are_capped(tmp_path: Path) -> None:
    h = Harness(tmp_path, batch_lines=2)
    append(h.dir / "app.jsonl", b"1\n2\n3\n4\n5\n")
    assert h.poll() == [b"1", b"2", b"3", b"4", b"5"]
    assert [len(b) for b in h.batches] == [2, 2, 1]
    h.tailer.close()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 65, 1024 * 1024])
def test_chunk_boundaries_do_not_change_the_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(tailer_mod, "CHUNK_BYTES", chunk)
    h = Harness(tmp_path, max_line_bytes=64)
    long = b"x" * (h.cfg.max_line_bytes + 1)
    data = b"alpha\n\nbeta\n" + long + b"\ngamma\n" + long + long + b"\ndelta\n"
    append(h.dir / "app.jsonl", data)
    assert h.poll() == [b"alpha", b"beta", b"gamma", b"delta"]
    assert h.rejects == [reasons.LINE_TOO_LONG, reasons.LINE_TOO_LONG]
    assert h.sample("monitaur_file_offset_bytes", h.dir / "app.jsonl") == len(data)
    h.tailer.close()


def test_over_long_line_is_rejected_once_and_its_neighbours_delivered(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_line_bytes=64)
    log = h.dir / "app.jsonl"
    append(log, b"before\n" + b"L" * 65 + b"\nafter\n" + b"M" * 80)
    assert h.poll() == [b"before", b"after"]
    assert h.rejects == [reasons.LINE_TOO_LONG, reasons.LINE_TOO_LONG]
    # The rest of the unfinished over-long line is skipped, not buffered, then tailing goes on.
    append(log, b"M" * 500)
    assert h.poll() == []
    assert h.tailer._files[(log.stat().st_dev, log.stat().st_ino)].partial == bytearray()
    append(log, b"M\nnext\n" + b"k" * 64 + b"\n")
    assert h.poll() == [b"next", b"k" * 64]
    assert h.rejects == [reasons.LINE_TOO_LONG, reasons.LINE_TOO_LONG]
    h.tailer.close()


def test_rename_and_create_rotation_loses_and_repeats_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, rotated_idle_seconds=0.3)
    log = h.dir / "app.jsonl"
    with open(log, "ab", buffering=0) as writer:
        writer.write(b"1\n2\n")
        assert h.poll() == [b"1", b"2"]
        os.rename(log, h.dir / "app.jsonl.1")  # no longer matches *.jsonl
        writer.write(b"3\n4")  # the writer has not reopened yet
        append(log, b"new-1\n")
        writer.write(b"\n")  # completes "4" in the old file
        assert h.poll() == [b"3", b"4", b"new-1"]  # old file drained first
        writer.write(b"5\n")  # written to the renamed file after we read it: still followed
    append(log, b"new-2\n")
    assert h.poll() == [b"5", b"new-2"]
    assert h.sample("monitaur_file_rotations_total", log) == 1
    assert h.sample("monitaur_file_lines_total", log) == 7  # every line under the tailed path, across the rotation
    assert h.sample("monitaur_file_lines_total", h.dir / "app.jsonl.1") is None
    assert h.sample("monitaur_file_offset_bytes", h.dir / "app.jsonl.1") == 10  # its own lag, by its current path
    assert len(h.tailer._files) == 2
    time.sleep(0.35)
    assert h.poll() == []
    assert len(h.tailer._files) == 1  # idle for rotated_idle_seconds: the old fd was closed ...
    assert h.sample("monitaur_file_offset_bytes", h.dir / "app.jsonl.1") is None
    assert len(h.tailer._known) == 1  # ... and its position kept while it is still there
    h.tailer.close()


def test_rotation_where_the_rotated_file_still_matches(tmp_path: Path) -> None:
    h = Harness(tmp_path, paths=[str(tmp_path / "logs" / "*.jsonl*")])
    log, rotated = h.dir / "app.jsonl", h.dir / "app.jsonl.1"
    with open(log, "ab", buffering=0) as writer:
        writer.write(b"1\n2\n")
        assert h.poll() == [b"1", b"2"]
        os.rename(log, rotated)
        writer.write(b"3\n")
        append(log, b"new-1\n")
        assert h.poll() == [b"3", b"new-1"]
        writer.write(b"4\n")  # a late write to the rotated file is still followed, by inode
    assert h.poll() == [b"4"]
    assert h.poll() == []
    assert h.sample("monitaur_file_rotations_total", log) == 1
    assert h.sample("monitaur_file_lines_total", log) == 5
    assert h.sample("monitaur_file_rotations_total", rotated) is None
    assert h.sample("monitaur_file_offset_bytes", rotated) == rotated.stat().st_size
    h.tailer.close()


def test_rotated_away_and_deleted_files_are_forgotten(tmp_path: Path) -> None:
    h = Harness(tmp_path, rotated_idle_seconds=0.3)
    a, b = h.dir / "a.jsonl", h.dir / "b.jsonl"
    append(a, b"a1\n")
    append(b, b"b1\n")
    assert h.poll() == [b"a1", b"b1"]
    with open(b, "ab") as fh:  # deleted with a last line we had not read yet
        b.unlink()
        fh.write(b"b2\n")
    assert h.poll() == [b"b2"]
    assert h.sample("monitaur_file_lines_total", b) == 2  # still followed, through its descriptor
    time.sleep(0.35)
    assert h.poll() == []
    assert h.sample("monitaur_file_lines_total", a) == 1
    assert h.sample("monitaur_file_lines_total", b) is None
    assert h.sample("monitaur_file_size_bytes", b) is None
    assert len(h.tailer._files) == 1 and not h.tailer._known  # nothing kept of a deleted file
    h.tailer.close()


def test_copytruncate(h: Harness) -> None:
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    os.truncate(log, 0)
    append(log, b"3\n")
    assert h.poll() == [b"3"]
    assert h.sample("monitaur_file_truncations_total", log) == 1
    assert h.sample("monitaur_file_rotations_total", log) == 0


def test_copytruncate_refilled_past_the_offset_is_noticed_by_fingerprint(h: Harness) -> None:
    log = h.dir / "app.jsonl"
    append(log, b"old-1\nold-2\n")
    assert h.poll() == [b"old-1", b"old-2"]
    os.truncate(log, 0)
    append(log, b"new-1\nnew-2\nnew-3\n")  # already longer than our offset when we look
    assert h.poll() == [b"new-1", b"new-2", b"new-3"]
    assert h.sample("monitaur_file_truncations_total", log) == 1


def test_copytruncate_of_a_long_file_is_counted_once(h: Harness) -> None:
    log = h.dir / "app.jsonl"
    old = [b"old-%03d" % i for i in range(50)]  # over 256 bytes: fingerprinted by its first 256
    new = [b"NEW-%03d" % i for i in range(60)]
    append(log, b"\n".join(old) + b"\n")
    assert h.poll() == old
    os.truncate(log, 0)
    append(log, b"\n".join(new) + b"\n")
    assert h.poll() == new
    assert h.poll() == []
    append(log, b"more\n")
    assert h.poll() == [b"more"]
    assert h.sample("monitaur_file_truncations_total", log) == 1


def test_new_file_is_picked_up_from_the_beginning(tmp_path: Path) -> None:
    h = Harness(tmp_path, start_at="end")
    assert h.poll() == []
    append(h.dir / "late.jsonl", b"x\ny\n")
    append(h.dir / "ignored.txt", b"not matched\n")
    assert h.poll() == [b"x", b"y"]
    h.tailer.close()


def test_start_at_end_skips_existing_lines_only(tmp_path: Path) -> None:
    h = Harness(tmp_path, start_at="end")
    log = h.dir / "app.jsonl"
    append(log, b"old-1\nold-2\nbeing-writ")
    assert h.poll() == []
    append(log, b"ten\nnew\n")
    # The line in progress at start-up is delivered whole, never cut in half.
    assert h.poll() == [b"being-written", b"new"]
    h.tailer.close()


def test_start_at_beginning_reads_existing_lines(h: Harness) -> None:
    append(h.dir / "app.jsonl", b"old-1\nold-2\n")
    assert h.poll() == [b"old-1", b"old-2"]


def test_same_file_matched_twice_is_read_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, paths=[str(tmp_path / "logs" / "*.jsonl"), str(tmp_path / "logs" / "app.*")])
    append(h.dir / "app.jsonl", b"once\n")
    assert h.poll() == [b"once"]
    h.tailer.close()


@pytest.mark.parametrize("start_at", ["beginning", "end"])
def test_restart_from_checkpoint_delivers_exactly_the_rest(tmp_path: Path, start_at: str) -> None:
    ckpt = tmp_path / "state" / "offsets.json"
    first = Harness(tmp_path, start_at="beginning")
    log = first.dir / "app.jsonl"
    append(log, b"1\n2\npart")
    assert first.poll() == [b"1", b"2"]
    first.tailer.save_offsets(ckpt)
    first.tailer.close()
    append(log, b"ial\n3\n")

    second = Harness(tmp_path, start_at=start_at)
    second.tailer.load_offsets(ckpt)
    assert second.poll() == [b"partial", b"3"]
    assert second.poll() == []
    assert second.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "offsets"}) == 0
    second.tailer.close()


def test_checkpoint_after_close_keeps_positions(h: Harness, tmp_path: Path) -> None:
    ckpt = tmp_path / "offsets.json"
    append(h.dir / "app.jsonl", b"1\n2\n")
    assert h.poll() == [b"1", b"2"]
    h.tailer.close()
    h.tailer.save_offsets(ckpt)
    again = Harness(tmp_path)
    again.tailer.load_offsets(ckpt)
    assert again.poll() == []
    again.tailer.close()


def test_inode_reuse_with_a_different_fingerprint_reads_from_the_start(tmp_path: Path) -> None:
    ckpt = tmp_path / "offsets.json"
    first = Harness(tmp_path)
    log = first.dir / "app.jsonl"
    append(log, b"old-1\nold-2\n")
    assert first.poll() == [b"old-1", b"old-2"]
    first.tailer.save_offsets(ckpt)
    first.tailer.close()
    with open(log, "r+b") as fh:  # same inode, different content: what inode reuse looks like
        fh.write(b"NEW-1\nNEW-2\nNEW-3\n")

    second = Harness(tmp_path)
    second.tailer.load_offsets(ckpt)
    assert second.poll() == [b"NEW-1", b"NEW-2", b"NEW-3"]
    second.tailer.close()


def test_fingerprint_of_a_short_file_still_matches_after_growth(tmp_path: Path) -> None:
    ckpt = tmp_path / "offsets.json"
    first = Harness(tmp_path)
    log = first.dir / "app.jsonl"
    append(log, b"short\n")  # fingerprinted by its first line only
    assert first.poll() == [b"short"]
    first.tailer.save_offsets(ckpt)
    first.tailer.close()
    rest = [b"line-%03d" % i for i in range(40)]
    append(log, b"\n".join(rest) + b"\n")  # now well over 256 bytes

    second = Harness(tmp_path)
    second.tailer.load_offsets(ckpt)
    assert second.poll() == rest
    second.tailer.close()


def test_checkpoint_beyond_the_file_size_counts_a_truncation(tmp_path: Path) -> None:
    ckpt = tmp_path / "offsets.json"
    first = Harness(tmp_path)
    log = first.dir / "app.jsonl"
    append(log, b"1\n2\n3\n")
    assert first.poll() == [b"1", b"2", b"3"]
    first.tailer.save_offsets(ckpt)
    first.tailer.close()
    os.truncate(log, 2)  # "1\n" survives: same fingerprint, smaller than the offset

    second = Harness(tmp_path)
    second.tailer.load_offsets(ckpt)
    assert second.poll() == [b"1"]
    assert second.sample("monitaur_file_truncations_total", log) == 1
    second.tailer.close()


def test_saved_checkpoint_is_versioned_json_written_atomically(h: Harness, tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = h.dir / "app.jsonl"
    append(log, b"1\n2\npartial")
    assert h.poll() == [b"1", b"2"]
    h.tailer.save_offsets(state / "offsets.json")
    h.tailer.save_offsets(state / "offsets.json")  # replacing an existing one
    assert sorted(os.listdir(state)) == ["offsets.json"]  # no temp files left behind
    doc = json.loads((state / "offsets.json").read_text())
    st = log.stat()
    assert doc["version"] == 2
    assert len(doc["files"]) == 1
    entry = doc["files"][0]
    assert (entry["dev"], entry["ino"], entry["offset"], entry["path"], entry["origin"]) == (st.st_dev, st.st_ino, 4, str(log), str(log))
    assert isinstance(entry["fingerprint"], str) and entry["fingerprint"]


def test_missing_checkpoint_is_a_fresh_start(h: Harness, tmp_path: Path) -> None:
    h.tailer.load_offsets(tmp_path / "nope.json")
    append(h.dir / "app.jsonl", b"1\n")
    assert h.poll() == [b"1"]
    assert h.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "offsets"}) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"version": 99, "files": []}',
        b'{"version": 1, "files": [{"dev": "x", "ino": 1, "offset": 0, "fingerprint": null, "fingerprint_bytes": 0}]}',
        b'{"version": 1, "files": [{"dev": 1, "ino": 1, "offset": -5, "fingerprint": "ab", "fingerprint_bytes": 3}]}',
        b'{"version": 1, "files": 7}',
    ],
)
def test_corrupt_checkpoint_starts_fresh_and_is_counted(h: Harness, tmp_path: Path, content: bytes, caplog) -> None:
    ckpt = tmp_path / "offsets.json"
    ckpt.write_bytes(content)
    h.tailer.load_offsets(ckpt)
    assert h.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "offsets"}) == 1
    assert any("offset checkpoint" in r.getMessage() for r in caplog.records)
    append(h.dir / "app.jsonl", b"1\n2\n")
    assert h.poll() == [b"1", b"2"]


def test_a_failing_file_does_not_stop_the_others(h: Harness, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    bad, good = h.dir / "bad.jsonl", h.dir / "good.jsonl"
    append(bad, b"secret-input-1\n")
    append(good, b"g1\n")
    (h.dir / "dir.jsonl").mkdir()  # matches the glob, is not a file
    os.symlink(h.dir / "missing", h.dir / "dangling.jsonl")
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path) == str(bad):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tailer_mod.os, "open", deny)
    caplog.set_level(logging.DEBUG, logger="exporter.tailer")
    assert h.poll() == [b"g1"]
    assert h.poll() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0]  # rate-limited
    assert not any("secret-input" in r.getMessage() for r in caplog.records)  # never line contents
    monkeypatch.setattr(tailer_mod.os, "open", real_open)
    assert h.poll() == [b"secret-input-1"]


def test_notify_mode_wakes_on_append(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="notify")
    log = h.dir / "app.jsonl"
    append(log, b"1\n")
    wake = threading.Event()
    h.tailer.watch(wake)
    try:
        assert h.poll() == [b"1"]
        wake.clear()  # our own opening of the file may not count; the append must
        append(log, b"2\n")
        assert wake.wait(timeout=5)
        assert h.poll() == [b"2"]
    finally:
        h.tailer.close()
    assert h.tailer._observer is None


def test_notify_mode_survives_a_missing_directory(tmp_path: Path) -> None:
    h = Harness(tmp_path, mode="notify", paths=[str(tmp_path / "absent" / "*.jsonl")])
    h.tailer.watch(threading.Event())
    assert h.tailer._observer is None
    (tmp_path / "absent").mkdir()
    append(tmp_path / "absent" / "a.jsonl", b"1\n")
    assert h.poll() == [b"1"]  # the periodic rescan is the backstop
    h.tailer.close()


def test_poll_mode_starts_no_observer(h: Harness) -> None:
    wake = threading.Event()
    h.tailer.watch(wake)
    assert h.tailer._observer is None
    append(h.dir / "app.jsonl", b"1\n")
    assert not wake.is_set()
    assert h.poll() == [b"1"]


def test_watch_dirs_for_wildcard_directories(tmp_path: Path) -> None:
    dirs = tailer_mod._watch_dirs([str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "b" / "*" / "x.jsonl"), "rel.jsonl"])
    assert dirs == {str(tmp_path / "a"): False, str(tmp_path / "b"): True, os.path.abspath("."): False}
