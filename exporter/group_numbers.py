"""Group numbers that stay unique across restarts, crashes included.

Group ids (``g<n>``, :mod:`exporter.groups`) reach operators: alerts, notifications and
override records (``overrides.json``) name them. The number sequence is saved in state
snapshots, but those are written every ``state.checkpoint_interval_seconds``: after a
crash, a process restored from the last snapshot would issue again the numbers issued
since, to other groups, and an operator acting on an id from an alert would act on other
keys. So numbers are *reserved* in a small file of the state directory, :data:`BLOCK` at a
time, before any of them is used; a new process starts after the last reservation. A
crash skips at most a block of numbers; it never reissues one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from exporter.atomic import atomic_write_bytes

log = logging.getLogger("monitaur.groups")

FILE = "group_numbers.json"
MAX_GROUP_NUMBER = 10**18 - 1  # ids g<n> have at most 18 digits (exporter.groups_api.GROUP_ID); saved numbers are checked against it
BLOCK = 1024  # numbers reserved per write: one small file write per 1,024 groups formed
LOG_EVERY = 60.0  # seconds between two log lines about a failed reservation


class NumberReservations:
    """The reservations of group numbers in one file (``state.dir/group_numbers.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._logged = -math.inf

    def load(self) -> int:
        """The first number this process may use: past every number reserved before (1 without a file).

        A file that cannot be read is logged and ignored; the snapshot's sequence still applies.
        """
        try:
            doc = json.loads(self.path.read_bytes())
            following = doc["next"] if isinstance(doc, dict) else None
            if isinstance(following, bool) or not isinstance(following, int) or not 1 <= following <= MAX_GROUP_NUMBER:
                raise ValueError("no number to go on from")
            return following
        except FileNotFoundError:
            return 1
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot read the reserved group numbers %s (%s); group ids go on from the state snapshot", self.path, type(exc).__name__)
            return 1

    def reserve(self, upto: int) -> None:
        """Record that numbers below ``upto`` may be in use. A failure is logged (at most once per
        :data:`LOG_EVERY` seconds) and the groups go on: only a crash before the next
        successful reservation could then reissue numbers."""
        try:
            atomic_write_bytes(self.path, json.dumps({"next": upto}).encode() + b"\n")
        except OSError as exc:
            now = time.monotonic()
            if now - self._logged >= LOG_EVERY:
                self._logged = now
                log.error("cannot reserve group numbers in %s: %s; after a crash, group ids could be issued again", self.path, exc)
