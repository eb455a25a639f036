"""The log files that ``replay`` and ``calibrate`` read: globs, directories, compressed files.

* **Which files.** Each argument is a file, a glob, or a directory. A directory stands
  for every regular file under it, subdirectories included and hidden names (``.*``)
  skipped. Files are read in the order of the arguments; a glob's or a directory's
  files in the order of their paths (byte order, ``sorted``). ``replay`` orders events
  by their timestamps anyway: the file order only decides between equal timestamps,
  and which event an event without a timestamp follows.
* **Compressed files** are recognized by their first bytes, whatever their name: gzip
  (what logrotate's ``compress`` leaves), bzip2 and xz.
* **Refused**, with an :class:`InputError` that names the file: a missing path, a glob
  or directory without files, a file that cannot be read, and a file that is not text
  (:func:`looks_binary` on its first 64 KiB, after decompression): a profile, an
  image or a zstd archive passed by mistake would otherwise be counted line by line as
  ``malformed_json`` and the command would succeed.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

SAMPLE_BYTES = 64 * 1024
READ_BYTES = 256 * 1024  # bounded_lines reads this much at a time
# Bytes that text never holds: C0 controls but tab, line feed, vertical tab, form feed,
# carriage return and escape; and DEL.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x1b") + b"\x7f"
BINARY_SHARE = 0.05  # of the sample: control bytes or bytes that are not UTF-8

# First bytes -> format name; format name -> a decompressing reader over a binary file object.
MAGIC: dict[bytes, str] = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
DECOMPRESS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),  # type: ignore[dict-item]
    "bzip2": lambda f: bz2.BZ2File(f, "rb"),  # type: ignore[dict-item]
    "xz": lambda f: lzma.LZMAFile(f, "rb"),  # type: ignore[dict-item]
}
# What a corrupt or truncated compressed file raises while it is read.
_DECOMPRESS_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)


class InputError(Exception):
    """A log argument that cannot be read as JSON lines; the message names the file and why."""


def log_files(args: list[str]) -> list[Path]:
    """Expand files, globs and directories into the files to read, in reading order."""
    files: list[Path] = []
    for arg in args:
        if any(ch in arg for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(arg)))
            if not matches:
                raise InputError(f"no log file matches {arg}")
            for m in matches:
                files.extend(_files_at(Path(m)))
        else:
            files.extend(_files_at(Path(arg)))
    return files


def _files_at(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(
            Path(root) / name
            for root, dirs, names in os.walk(path)
            for name in names
            if not name.startswith(".") and not any(part.startswith(".") for part in Path(root).relative_to(path).parts)
        )
        found = [f for f in found if f.is_file()]
        if not found:
            raise InputError(f"directory {path} holds no log file")
        return found
    if not path.exists():
        raise InputError(f"no such log file: {path}")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    return [path]


def compression(path: Path) -> str | None:
    """The compression format of a file from its first bytes, or None."""
    head = _read_head(path, 8)
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)


def looks_binary(sample: bytes) -> bool:
    """Whether a sample is not text: more than ``BINARY_SHARE`` of it are control bytes or
    bytes that do not decode as UTF-8. A log with a few hostile lines (a NUL, an ESC)
    is still text: those lines are rejected one by one as the events they are."""
    if not sample:
        return False
    controls = len(sample) - len(sample.translate(None, _CONTROL))
    text = sample.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - sample.decode("utf-8", errors="ignore").count("\ufffd")
    return controls + invalid > BINARY_SHARE * len(sample)


@contextmanager
def open_log(path: Path) -> Iterator[tuple[BinaryIO, Callable[[], int]]]:
    """Open a log for reading lines of bytes, decompressed if need be, after checking it is text.

    Yields the stream and a function giving how many bytes *of the file on disk* were
    read so far (for progress). Raises :class:`InputError`; a compressed file that turns
    out corrupt or truncated while it is read raises it from the iteration too.
    """
    kind = compression(path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        stream: BinaryIO = raw
        if kind is not None:
            stream = DECOMPRESS[kind](raw)
        try:
            sample = stream.read(SAMPLE_BYTES)
            stream.seek(0)
        except _DECOMPRESS_ERRORS as exc:
            raise InputError(f"cannot read {path}: corrupt {kind} data ({exc})") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        if looks_binary(sample):
            what = f"{kind}-compressed file that does not hold text" if kind else "binary file, not JSON lines"
            raise InputError(f"{path}: a {what} (replay and calibrate read UTF-8 JSON lines, plain or gzip, bzip2, xz)")
        yield (_Checked(stream, path, kind) if kind else stream), raw.tell  # type: ignore[misc]
    finally:
        raw.close()


class _Checked:
    """Reads a decompressing stream (by lines or by blocks), turning a corrupt or truncated file into an InputError."""

    def __init__(self, stream: BinaryIO, path: Path, kind: str) -> None:
        self._stream, self._path, self._kind = stream, path, kind

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except _DECOMPRESS_ERRORS as exc:
            raise self._error(exc) from None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except _DECOMPRESS_ERRORS as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> InputError:
        return InputError(f"cannot read {self._path}: corrupt or truncated {self._kind} data ({exc})")


def bounded_lines(stream: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of ``stream``, without their newlines, of at most ``limit`` bytes, and ``None``
    in place of each longer line.

    The stream is read in blocks of ``READ_BYTES`` and a longer line is dropped as soon as it
    passes the limit, then skipped to its end, never held whole: the content of a line comes
    from clients, and one huge line (or a small compressed file that expands to one) must not
    exhaust memory. The live tailer bounds its lines the same way.
    """
    read = stream.read
    partial = b""
    skipping = False  # inside a line already dropped
    while block := read(READ_BYTES):
        if skipping:
            end = block.find(b"\n")
            if end < 0:
                continue
            block, skipping = block[end + 1 :], False
        lines = block.split(b"\n")
        lines[0] = partial + lines[0]
        partial = lines.pop()  # the line the next block goes on with (b"" after a newline)
        for line in lines:
            yield line if len(line) <= limit else None
        if len(partial) > limit:
            yield None
            partial, skipping = b"", True
    if partial:
        yield partial


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
