"""Persistence: snapshots of client and model state, restore, and the checkpoint writer.

A snapshot holds everything worth keeping across a restart: what the decoder learned
about each model, each model's scaling, references, live baseline and shared detector
state, every tracked client with its flag (:mod:`exporter.verdict`), detector and fusion
state, and the recently-flagged record of evicted flagged clients.

Versions: 3 adds flags and the recently-flagged record. A version 2 snapshot is
migrated (a client flagged then stays flagged, its flag dated at its last event, with
no detectors recorded); version 1 keeps counters and verdicts only. It is written with
:mod:`exporter.snapshot` (JSON + one binary blob, no pickle).

:func:`copy_state` takes a private copy under the pipeline's lock, a chunk of clients at
a time, so that ingestion and scrapes wait for one chunk (milliseconds), not for the
whole snapshot; :class:`Checkpointer` then writes the copy, with the file offsets taken
at the same moment, from a writer thread while ingestion goes on. It also writes the
offsets alone when the tailer records a rotation (positions that match the state on disk).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Protocol

import numpy as np

from exporter.atomic import atomic_write, atomic_write_bytes
from exporter.detectors.kit import Scaling
from exporter.groups import SOURCE, links_params
from exporter.names import MAX_CLIENT_LENGTH, MAX_MODEL_LENGTH, is_valid_name
from exporter.snapshot import dump, unpack
from exporter.state import ClientState, ClientStore
from exporter.verdict import FlagRecord, RecentlyFlagged, Release

if TYPE_CHECKING:
    from exporter.events import Decoder
    from exporter.detectors.links import LinksParams
    from exporter.groups import GroupBook
    from exporter.metrics import Metrics
    from exporter.runtime import Runtimes

log = logging.getLogger("monitaur.persist")
SNAPSHOT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_CHUNK = 200  # clients copied per hold of the lock
STATE_FILE = "state.npz"
OFFSETS_FILE = "offsets.json"


def copy_state(lock: threading.RLock, store: ClientStore, runtimes: "Runtimes", decoder: "Decoder", now: float,
               recent: RecentlyFlagged | None = None, groups: "GroupBook | None" = None) -> dict[str, Any]:
    """A private copy of all state worth keeping across a restart.

    Clients are saved in LRU order as of the start; one evicted meanwhile is left out,
    one arriving meanwhile waits for the next checkpoint.
    """
    with lock:
        ids = [c.client_id for c in store.values()]
        models = {}
        for name, rt in runtimes:
            scaling = rt.context.scaling
            models[name] = {
                "scaling": scaling.state() if scaling is not None else None,
                "references": rt.references,
                "baseline": rt.baseline.state() if rt.baseline is not None else None,
                "shared": {d.name: {"version": rt.versions[d.name], "state": st} for d in rt.detectors if (st := d.shared_state()) is not None},
            }
        head = {
            "version": SNAPSHOT_VERSION,
            "saved_at": now,
            "decoder": decoder.learned(),
            "admitted": runtimes.admission.saved(),
            "models": _copied(models),
            "recently_flagged": recent.state() if recent is not None else [],
        }
        if groups is not None:
            # plain lists and numbers (a fresh copy), with the links version each model's groups were made under
            head["groups"] = {**groups.state(), "versions": {name: rt.versions.get(SOURCE) for name, rt in runtimes}}
    clients = []
    for start in range(0, len(ids), _CHUNK):
        with lock:
            for client_id in ids[start : start + _CHUNK]:
                if client_id in store:
                    clients.append(_client_record(store[client_id], runtimes))
    return {**head, "clients": clients}


def _client_record(c: ClientState, runtimes: "Runtimes") -> dict[str, Any]:
    """A client's part of a snapshot, with copies of its detector and fusion state (under the lock)."""
    detectors: dict[str, Any] = {}
    for model, per in c.detector_state.items():
        rt = runtimes.get(model)
        if rt is None:
            continue
        states = {name: {"version": rt.versions.get(name, ""), "state": _copied(st)} for name, st in per.items()}
        fused = c.fusion_state.get(model)
        if fused is not None:
            states["fusion"] = {"version": rt.versions["fusion"], "state": _copied(fused)}
        detectors[model] = states
    return {
        "id": c.client_id,
        "last_seen": c.last_seen,
        "total": c.total,
        "queries": dict(c.queries),
        "scores": dict(c.scores),
        "current": dict(c.current),
        "flags": dict(c.flags),
        "first_flagged": dict(c.first_flagged),
        "first_flagged_query": c.first_flagged_query,
        "first_flagged_at": c.first_flagged_at,
        "suspicious": c.suspicious,
        "flag": c.flag.as_dict() if c.flag is not None else None,
        "released": c.released.as_dict() if c.released is not None else None,
        "flagged_now": c.flagged_now,
        "score": c.score,
        "detectors": detectors,
    }


def restore(data: bytes | BinaryIO, lock: threading.RLock, store: ClientStore, runtimes: "Runtimes", decoder: "Decoder",
            recent: RecentlyFlagged | None = None, groups: "GroupBook | None" = None) -> int:
    """Load a snapshot made by :func:`copy_state` (bytes, or a binary file); return the number of clients restored.

    State made under other parameters or shapes is dropped (that detector starts afresh
    for the client) rather than misread. Version 2 snapshots are migrated (see the module
    docstring); version 1 snapshots keep their clients' counters and verdicts, not their
    detector state. A snapshot of a later version is refused (ValueError).
    """
    doc = unpack(data)
    if not isinstance(doc, dict) or doc.get("version") not in READABLE_VERSIONS:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise ValueError(f"unsupported state snapshot version {version!r} (this exporter reads {', '.join(map(str, READABLE_VERSIONS))})")
    current = doc["version"] >= 2  # the model and detector state layout of versions 2 and 3 is the same
    unsafe = _drop_invalid_names(doc)
    if unsafe:
        log.warning("dropped %d clients or models of the snapshot whose names are not valid (printable text) any more", unsafe)
    names = set(runtimes.specs)
    # Every client record is read before anything is loaded: a malformed one fails the restore
    # while the exporter is still empty, as the caller then says it is.
    parsed = [(_client(raw, names, doc["version"]), _detector_entries(raw) if current else {}) for raw in doc.get("clients", [])]
    with lock:
        learned = _readmitted(runtimes, doc)
        decoder.restore(learned)
        dropped = unfit = 0
        for model, m in (doc.get("models", {}) if current else {}).items():
            rt = _runtime(runtimes, decoder, model)
            if rt is None:
                continue
            if rt.baseline is not None:  # live-learned: the reference, and the sample it grows
                if m.get("baseline") is not None:
                    rt.baseline.load(m["baseline"])
                if m.get("scaling") is not None:
                    rt.use_reference(Scaling.from_state(m["scaling"], rt.context.input_dim), m.get("references") or {})
            for det in rt.detectors:
                shared = m.get("shared", {}).get(det.name)
                if shared is not None and shared["version"] == rt.versions[det.name]:
                    try:
                        det.load_shared_state(shared["state"])
                    except ValueError:  # a shared index that does not hold together starts empty; the rest restores
                        unfit += 1
        if unfit:
            log.warning("dropped %d shared detector index(es) that do not hold together; they start empty", unfit)
        for c, entries in parsed:
            for model, per in entries.items():
                rt = _runtime(runtimes, decoder, model)
                if rt is None:
                    continue
                fused = per.pop("fusion", None)
                kept = {name: e["state"] for name, e in per.items() if rt.versions.get(name) == e["version"]}
                dropped += len(per) - len(kept)
                c.detector_state[model] = kept
                if fused is not None and fused["version"] == rt.versions["fusion"]:
                    c.fusion_state[model] = fused["state"]
            store.put(c)
        if dropped:
            log.warning("dropped %d detector states made under another configuration; those detectors start afresh", dropped)
        if recent is not None:
            recent.load([r for r in doc.get("recently_flagged", []) if is_valid_name(r["id"], MAX_CLIENT_LENGTH) and r["id"] not in store])
        if groups is not None and current and isinstance(doc.get("groups"), dict):
            _restore_groups(groups, doc["groups"], runtimes, decoder)
        return len(store)


def _client(raw: dict[str, Any], names: set[str], version: int) -> ClientState:
    """One client's counters and verdict from its snapshot record (its detector state apart)."""
    return ClientState(
        client_id=raw["id"],
        last_seen=float(raw["last_seen"]),
        total=int(raw["total"]),
        queries={k: int(v) for k, v in raw["queries"].items()},
        scores={k: float(v) for k, v in raw["scores"].items() if k in names},
        current={k: bool(v) for k, v in raw["current"].items() if k in names},
        flags={k: int(v) for k, v in raw["flags"].items()},
        first_flagged={k: int(v) for k, v in raw["first_flagged"].items()},
        first_flagged_query=raw["first_flagged_query"],
        first_flagged_at=None if raw.get("first_flagged_at") is None else float(raw["first_flagged_at"]),
        flag=_flag(raw, version),
        released=Release.from_dict(raw["released"]) if raw.get("released") else None,
        flagged_now=bool(raw.get("flagged_now", raw.get("suspicious", False))),
        score=float(raw.get("score", 0.0)),
    )


def _detector_entries(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """A client record's detector state per model and detector, each entry with its ``version`` and ``state``."""
    per_model = raw.get("detectors", {})
    if not isinstance(per_model, dict) or not all(
        isinstance(per, dict) and all(isinstance(e, dict) and "version" in e and "state" in e for e in per.values()) for per in per_model.values()
    ):
        raise ValueError("a client's detector state is not a mapping of versioned entries")
    return per_model


def _restore_groups(groups: "GroupBook", saved: dict[str, Any], runtimes: "Runtimes", decoder: "Decoder") -> None:
    """Load the saved groups of each model whose ``links`` detector has the version they were made
    under (the same parameters and reference); the others start afresh, like detector state."""
    versions = saved.get("versions") if isinstance(saved.get("versions"), dict) else {}
    stale: list[str] = []

    def params_of(model: str) -> "LinksParams | None":
        rt = _runtime(runtimes, decoder, model)
        if rt is None or rt.versions.get(SOURCE) is None:
            return None
        if versions.get(model) != rt.versions[SOURCE]:
            stale.append(model)
            return None
        return links_params(rt)

    groups.load(saved, params_of)
    if stale:
        log.warning("dropped the groups of %d model(s) made under other links parameters or another reference; they form afresh", len(stale))


def _flag(raw: dict[str, Any], version: int) -> FlagRecord | None:
    """A client's flag from its snapshot record; before version 3, from the verdict it had then."""
    if version >= 3:
        return FlagRecord.from_dict(raw["flag"]) if raw.get("flag") else None
    if not raw.get("suspicious"):
        return None
    at = float(raw["last_seen"])  # when it was first flagged is not known: dated at its last event
    query = int(raw["first_flagged_query"] or raw["total"])
    model = max(raw["queries"], key=raw["queries"].get) if raw["queries"] else ""
    return FlagRecord(first_at=at, last_at=at, first_query=query, last_query=int(raw["total"]), model=model)


def _readmitted(runtimes: "Runtimes", doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Admit again the models of a snapshot, in their admission order; what the decoder learned about those.

    The current ``model_admission`` decides: a model it refuses now (a name no longer
    allowed, or past a lowered ``max_models``) is dropped with everything about it.
    Snapshots made before admission existed list no admitted models: their models are
    taken in the order the decoder learned them.
    """
    learned = doc.get("decoder", {})
    admission = runtimes.admission
    saved = list(doc.get("admitted") or ())
    for part in ("modalities", "input_dims", "num_classes"):
        saved += [m for m in learned.get(part, {}) if m not in saved]
    saved += [m for m in doc.get("models", {}) if m not in saved]
    saved = [m for m in saved if is_valid_name(m, MAX_MODEL_LENGTH)]  # invalid names are dropped anyway
    refused = [m for m in saved if not admission.readmit(m)]
    if refused:
        log.warning("dropped %d models of the snapshot that model_admission does not admit any more", len(refused))
    return {part: {m: v for m, v in values.items() if m in admission.admitted} for part, values in learned.items()}


def _runtime(runtimes: "Runtimes", decoder: "Decoder", model: str):  # type: ignore[no-untyped-def]
    """A model's runtime, rebuilt from what the decoder learned before the restart (None if unknown or not admitted)."""
    if model in runtimes:
        return runtimes.get(model)
    if model not in runtimes.admission.admitted:
        return None
    modality = (runtimes.settings.models.get(model).modality if model in runtimes.settings.models else None) or decoder.learned_modalities.get(model)
    return None if modality is None else runtimes.build(model)


def _drop_invalid_names(doc: dict[str, Any]) -> int:
    """Remove, in place, the clients and models of a snapshot whose names ``exporter.names`` refuses; return how many.

    A snapshot written before names were validated may hold ids that no exposition,
    log line or alert can carry (a lone surrogate made every scrape fail).
    """
    models = doc.get("models", {})
    bad_models = [m for m in models if not is_valid_name(m, MAX_MODEL_LENGTH)]
    for m in bad_models:
        del models[m]
    clients = doc.get("clients", [])
    kept = [c for c in clients if is_valid_name(c["id"], MAX_CLIENT_LENGTH)]
    for c in kept:
        for per_model in (c["queries"], c.get("detectors", {})):
            for m in [m for m in per_model if not is_valid_name(m, MAX_MODEL_LENGTH)]:
                del per_model[m]
    doc["clients"] = kept
    return len(bad_models) + len(clients) - len(kept)


def _copied(x: Any) -> Any:
    """A copy of nested dicts and lists whose arrays are copied too (other values are immutable)."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _copied(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copied(v) for v in x]
    return x


class OffsetsCopy(Protocol):
    """File offsets copied with the state (``exporter.tailer.OffsetsSnapshot``)."""

    data: bytes

    def commit(self) -> None:
        """Called once ``data`` and the state copied with it are both written."""


class Checkpointer:
    """Writes state snapshots and file offsets to ``state_dir``, atomically, from a writer thread.

    ``take`` copies the state and the offsets together (the caller's ingestion waits for
    the copy), so both describe the same lines: a clean restart neither loses nor
    repeats a line. The offsets are written after the state, and only if the state was
    written: offsets that ran ahead of the state on disk would skip lines after a crash.
    A checkpoint that comes due while the previous one is still being written is
    skipped. :meth:`write_offsets` writes offsets alone (a rotation's durable record);
    one lock orders every offsets write. Failures are counted, logged and kept in
    :attr:`failures` (in a row, by kind) for the health check; never fatal.
    """

    def __init__(self, state_dir: Path, metrics: "Metrics", copy: Callable[[], dict[str, Any]], offsets: Callable[[], OffsetsCopy]) -> None:
        self.state_path = state_dir / STATE_FILE
        self.offsets_path = state_dir / OFFSETS_FILE
        self._metrics = metrics
        self._copy = copy
        self._offsets = offsets
        self._writer: threading.Thread | None = None
        self._offsets_lock = threading.Lock()
        self.failures: dict[str, int] = {"state": 0, "offsets": 0}  # consecutive failed writes, by kind

    def checkpoint(self, wait: bool = True) -> None:
        """Copy state and offsets now; write them here (``wait``) or from the writer thread."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            if not wait:
                return
            writer.join()
        try:
            state, offsets = self._copy(), self._offsets()
        except Exception as exc:  # never fatal: the ingest loop goes on
            self._failed("state")
            log.error("cannot copy the state for a checkpoint: %s", exc)
            return
        if wait:
            self._write(state, offsets)
            return
        self._writer = threading.Thread(target=self._write, args=(state, offsets), name="monitaur-checkpoint", daemon=True)
        self._writer.start()

    def join(self) -> None:
        """Wait for a checkpoint being written."""
        if self._writer is not None:
            self._writer.join()

    def write_offsets(self, data: Callable[[], bytes]) -> bool:
        """Write offsets alone, taken by ``data()`` under the offsets lock; return whether it worked.

        For the tailer's durable positions, which never run ahead of the state on disk.
        """
        with self._offsets_lock:
            try:
                atomic_write_bytes(self.offsets_path, data())
            except Exception as exc:
                self._failed("offsets")
                log.error("cannot write offsets checkpoint %s: %s", self.offsets_path, exc)
                return False
            self.failures["offsets"] = 0
            return True

    def _write(self, state: dict[str, Any], offsets: OffsetsCopy) -> None:
        try:
            atomic_write(self.state_path, lambda fh: dump(state, fh))
        except Exception as exc:
            self._failed("state")
            log.error("cannot write state snapshot %s: %s; file offsets not saved either", self.state_path, exc)
            return
        self.failures["state"] = 0
        with self._offsets_lock:
            try:
                atomic_write_bytes(self.offsets_path, offsets.data)
            except Exception as exc:
                self._failed("offsets")
                log.error("cannot write offsets checkpoint %s: %s", self.offsets_path, exc)
                return
            offsets.commit()
            self.failures["offsets"] = 0
        self._metrics.checkpoint_last_success.set(time.time())

    def _failed(self, kind: str) -> None:
        self.failures[kind] += 1
        self._metrics.checkpoint_errors.labels(kind).inc()

    def load(self, restore_state: Callable[[BinaryIO], int], load_offsets: Callable[[Path], None]) -> None:
        """Restore the saved state (a corrupt snapshot is set aside, and the exporter starts empty), then the offsets."""
        if self.state_path.exists():
            try:
                with open(self.state_path, "rb") as fh:
                    n = restore_state(fh)
                log.info("restored state of %d clients from %s", n, self.state_path)
            except Exception as exc:
                self._metrics.checkpoint_errors.labels("state").inc()
                aside = self.state_path.with_name(f"{self.state_path.name}.corrupt-{int(time.time())}")
                log.error("cannot read state snapshot %s (%s); starting empty and keeping it as %s", self.state_path, exc, aside)
                try:
                    self.state_path.rename(aside)
                except OSError:
                    pass
        load_offsets(self.offsets_path)

