"""Socket I/O for the HTTP servers: reads and writes bounded by deadlines, and safe header values.

Shared by the exporter's server (:mod:`exporter.server`) and the decision listener
(:mod:`exporter.decision`), which runs in a process of its own and so imports nothing
heavier than the standard library from here.
"""

from __future__ import annotations

import io
import math
import socket
import time
from typing import Any


class DeadlineReader(io.RawIOBase):
    """The read side of a connection, bounded by a deadline for a whole phase, not per ``recv``.

    A timeout per ``recv`` does not stop a slowloris, which sends one byte just before each
    timeout; here every ``recv`` waits only for what is left of the phase's deadline.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = math.inf
        self._then: float | None = None
        self.phase = "header"
        self.phase_bytes = 0
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def expect(self, phase: str, within: float, then: float | None = None) -> None:
        """Start a phase (``header``, ``body``, ``drain``): data within ``within`` seconds; if ``then``
        is given, the deadline becomes ``then`` seconds after the first bytes arrive (idle, then header timeout)."""
        self._deadline = time.monotonic() + within
        self._then = then
        self.phase = phase
        self.phase_bytes = 0
        self.timed_out = False

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out = True
            raise TimeoutError("read deadline passed")
        self._sock.settimeout(remaining)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise
        if n and self._then is not None:
            self._deadline = time.monotonic() + self._then
            self._then = None
        self.phase_bytes += n
        return n


class DeadlineWriter(io.RawIOBase):
    """The write side of a connection: each ``write`` sends everything within ``timeout`` seconds, or raises TimeoutError."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self.timed_out = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self._timeout
        sent = 0
        while sent < len(view):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                raise TimeoutError("write deadline passed")
            self._sock.settimeout(remaining)
            try:
                sent += self._sock.send(view[sent:])
            except TimeoutError:
                self.timed_out = True
                raise
        return sent


def header_value(value: str) -> str:
    """``value`` safe for a response header: printable ASCII as it is, anything else
    (CR, LF, controls, non-ASCII) percent-escaped from its UTF-8 bytes, so no text can end
    a header line or forge another."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(ch if ch.isascii() and ch.isprintable() else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) for ch in value)
