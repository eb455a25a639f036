"""App checkpoints: copied together with the file offsets, written while ingestion goes on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import exporter.persist as persist_module
from exporter.app import App
from exporter.config import Settings
from tests.test_pipeline import lines


def append(path: Path, rows: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(r + "\n" for r in rows))


def test_a_checkpoint_is_written_while_ingestion_goes_on_and_restores_consistently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = Settings(files={"paths": [str(logs / "*.jsonl")], "mode": "poll"}, state={"dir": str(tmp_path / "state")})
    a = App(settings)  # not started: ingestion is driven by hand
    append(logs / "a.jsonl", lines("c1", 5))
    a.tailer.poll_once()
    assert a.pipeline.store["c1"].total == 5

    started, release = threading.Event(), threading.Event()
    real_dump = persist_module.dump

    def slow_dump(state: dict, fh) -> None:
        started.set()
        assert release.wait(10)
        real_dump(state, fh)

    monkeypatch.setattr(persist_module, "dump", slow_dump)
    a.checkpoint(wait=False)
    assert started.wait(10)
    writer = a.checkpointer._writer
    assert writer is not None and writer.is_alive()
    # While it is written, lines are still read and judged ...
    append(logs / "a.jsonl", lines("c2", 3, seed=1))
    a.tailer.poll_once()
    assert a.pipeline.store["c2"].total == 3
    # ... and a checkpoint that comes due meanwhile is skipped.
    a.checkpoint(wait=False)
    assert a.checkpointer._writer is writer
    release.set()
    writer.join(10)
    assert not writer.is_alive()
    assert a.metrics.registry.get_sample_value("monitaur_checkpoint_last_success_timestamp_seconds") > 0

    # The checkpoint holds the state and the offsets of the moment it was copied: a
    # restart has c1, and reads c2's lines again from the saved offsets, once.
    b = App(settings)
    b.restore()
    assert b.pipeline.store["c1"].total == 5 and "c2" not in b.pipeline.store
    b.tailer.poll_once()
    assert b.pipeline.store["c2"].total == 3 and b.pipeline.store["c1"].total == 5


def test_a_blocking_checkpoint_waits_for_the_one_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(files={"paths": []}, state={"dir": str(tmp_path / "state")})
    a = App(settings)
    a.pipeline.ingest_lines(lines("c1", 2))
    order: list[str] = []
    release = threading.Event()
    real_dump = persist_module.dump

    def recording_dump(state: dict, fh) -> None:
        order.append(f"start {len(state['clients'])}")
        if len(order) == 1:
            assert release.wait(10)
        real_dump(state, fh)
        order.append("end")

    monkeypatch.setattr(persist_module, "dump", recording_dump)
    a.checkpoint(wait=False)
    a.pipeline.ingest_lines(lines("c2", 2, seed=1))
    threading.Timer(0.2, release.set).start()
    a.checkpoint()  # as on shutdown: after the running write, then its own
    assert order == ["start 1", "end", "start 2", "end"]
    b = App(settings)
    b.restore()
    assert {c.client_id for c in b.pipeline.store.values()} == {"c1", "c2"}


def test_a_checkpoint_whose_copy_fails_is_counted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = App(Settings(files={"paths": []}, state={"dir": str(tmp_path / "state")}))

    def broken() -> dict:
        raise TypeError("a plugin's state holds objects")

    monkeypatch.setattr(a.pipeline, "snapshot_copy", broken)
    a.checkpoint(wait=False)  # from the ingest loop: must not raise
    assert a.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "state"}) == 1
    assert a.checkpointer._writer is None and not (tmp_path / "state" / "state.npz").exists()


def test_offsets_are_not_saved_ahead_of_a_state_that_could_not_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = Settings(files={"paths": [str(logs / "*.jsonl")], "mode": "poll"}, state={"dir": str(tmp_path / "state")})
    a = App(settings)
    append(logs / "a.jsonl", lines("c1", 4))
    a.tailer.poll_once()
    a.checkpoint()
    saved = (tmp_path / "state" / "offsets.json").read_bytes()
    append(logs / "a.jsonl", lines("c1", 2, seed=1))
    a.tailer.poll_once()

    def full_disk(state: dict, fh) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist_module, "dump", full_disk)
    a.checkpoint()
    a.checkpoint()
    assert (tmp_path / "state" / "offsets.json").read_bytes() == saved  # still matches the state on disk
    assert a.checkpointer.failures == {"state": 2, "offsets": 0}
    assert a.metrics.registry.get_sample_value("monitaur_checkpoint_errors_total", {"kind": "state"}) == 2
    b = App(settings)  # what a crash now restarts from: 4 in the state, and 2 lines to read again
    b.restore()
    b.tailer.poll_once()
    assert b.pipeline.store["c1"].total == 6
    monkeypatch.undo()
    a.checkpoint()
    assert a.checkpointer.failures == {"state": 0, "offsets": 0}


def test_a_rotation_is_recorded_at_once_and_a_kill_then_loses_nothing(tmp_path: Path) -> None:
    """Lines read after the last checkpoint from a file renamed out of the glob, then SIGKILL: read again, once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = Settings(files={"paths": [str(logs / "*.jsonl")], "mode": "poll"}, state={"dir": str(tmp_path / "state")})
    a = App(settings)
    log = logs / "app.jsonl"
    append(log, lines("c1", 5))
    a.tailer.poll_once()
    a.checkpoint()
    append(log, lines("c1", 3, seed=1))
    a.tailer.poll_once()
    os.rename(log, logs / "app.jsonl.1")
    append(log, lines("c2", 2, seed=2))
    a.tailer.poll_once()  # records the rotation in offsets.json before reading c2's lines
    assert a.pipeline.store["c1"].total == 8 and a.pipeline.store["c2"].total == 2
    # SIGKILL: nothing more is saved. The restart has c1's 5 lines in its state ...
    b = App(settings)
    b.restore()
    assert b.pipeline.store["c1"].total == 5 and "c2" not in b.pipeline.store
    # ... and reads the other 3 from the renamed file, and c2's from the new one.
    b.tailer.poll_once()
    assert b.pipeline.store["c1"].total == 8 and b.pipeline.store["c2"].total == 2
    # Its per-client counters count from its own start, as a new process's counters do:
    # never the snapshot's 5 (below the 8 the killed process had exported).
    assert b.metrics.registry.get_sample_value("monitaur_client_queries_total", {"client": "c1", "model": "digits"}) == 3
    assert b.metrics.registry.get_sample_value("monitaur_client_queries_total", {"client": "c2", "model": "digits"}) == 2
