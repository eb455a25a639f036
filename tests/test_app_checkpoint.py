"""App checkpoints: copied together with the file offsets, written while ingestion goes on."""

from __future__ import annotations

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
