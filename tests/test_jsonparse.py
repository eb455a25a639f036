"""exporter.jsonparse: json.loads's results, whichever parser produced them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from exporter import jsonparse, reasons
from exporter.config import load_settings
from exporter.events import Decoder, Rejected


def reference(data: bytes | str) -> tuple[str, str]:
    """What json.loads makes of ``data`` as strict UTF-8 text: ("ok", repr of the value) or ("error", "")."""
    try:
        return "ok", repr(json.loads(data.decode("utf-8") if isinstance(data, bytes) else data))
    except (ValueError, RecursionError):
        return "error", ""


def parsed(data: bytes | str) -> tuple[str, str]:
    try:
        return "ok", repr(jsonparse.loads(data))
    except ValueError:
        return "error", ""


LINE = b'{"ts": 1700000000.25, "client": "app-1", "model": "m", "input": [0, 6, 16, -2, 1.5, 1e-5], "output": [0.25, 0.75]}'

EDGE_CASES = [
    LINE,
    b'{"a": NaN}',
    b'{"a": [Infinity, -Infinity]}',
    b'{"a": 1e400}',
    b'{"a": -1e400}',
    b'{"a": 1e-400}',
    b'{"a": 5e-324}',
    b'{"a": -0.0}',
    b'{"a": 9223372036854775807}',  # int64 max
    b'{"a": 9223372036854775808}',
    b'{"a": -9223372036854775808}',
    b'{"a": -9223372036854775809}',  # below int64: orjson would make it a float
    b'{"a": 18446744073709551615}',  # uint64 max
    b'{"a": 18446744073709551616}',
    b'{"a": 123456789012345678901234567890}',
    b'{"a": 1' + b"0" * 400 + b"}",
    b'{"a": 0.1234567890123456789012}',  # a long fraction goes to json, with the same result
    b'{"a": "\\ud800"}',  # lone surrogate escape
    b'{"a": "\\u00e9\\ud83d\\ude00"}',
    b'\xef\xbb\xbf{"a": 1}',  # UTF-8 byte-order mark
    '{"a": 1}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-32-le"),
    b'{"a": "\xff"}',  # invalid UTF-8
    b'{"a": "\xc3\xa9"}',
    b'{"a": 1, "a": 2, "b": 3}',  # duplicate keys: the last wins
    b" {\"a\": 1}\r\n",
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b'{"a": 01}',
    b'{"a": .5}',
    b'{"a": 1.}',
    b'{"a": +1}',
    b'{"a": [1,]}',
    b'{"a": "\x01"}',
    b'{"\\u0000": 1}',
    b"\x00",
    b"",
    b"   ",
    b"null",
    b"true",
    b'"x"',
    b"[]",
    b"{}",
    b"[" * 5000 + b"]" * 5000,  # deeper than json's recursion allows
    b"[" * 500 + b"]" * 500,
    '{"a": 1}',  # str input takes json.loads directly
    '{"a": "é", "b": NaN}',
]


@pytest.mark.parametrize("data", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_parse_as_json_loads_does(data: bytes | str) -> None:
    assert parsed(data) == reference(data)


TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"18446744073709551616", b"-9223372036854775809", b'"\\ud800"', b"\xef\xbb\xbf",
          b"\xff", b"\xc3", b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b" ", b"\n", b"0", b"-", b"e", b".", b"true", b"null", b"00"]


def test_mutated_lines_parse_as_json_loads_does() -> None:
    """Fuzz: valid event lines with bytes replaced, inserted or cut off, and odd tokens spliced in."""
    rng = np.random.default_rng(11)
    for i in range(4000):
        values = rng.integers(0, 17, 8).tolist() if i % 2 else rng.normal(size=8).tolist()
        data = bytearray(json.dumps({"ts": 1.7e9 + i, "client": f"c{i}", "input": values, "output": [0.5, 0.5]}).encode())
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(data) + 1))
            kind = int(rng.integers(0, 4))
            if kind == 0 and at < len(data):
                data[at] = int(rng.integers(0, 256))
            elif kind == 1:
                data[at:at] = TOKENS[int(rng.integers(0, len(TOKENS)))]
            elif kind == 2 and at < len(data):
                data[at : at + int(rng.integers(1, 5))] = TOKENS[int(rng.integers(0, len(TOKENS)))]
            else:
                del data[at:]
        line = bytes(data)
        assert parsed(line) == reference(line), line


def test_ordinary_lines_do_not_reach_json_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is live: a standard line never falls back to the standard library."""

    def refuse(_: Any) -> None:
        raise AssertionError("json.loads was called")

    monkeypatch.setattr(jsonparse.json, "loads", refuse)
    assert jsonparse.loads(LINE)["input"] == [0, 6, 16, -2, 1.5, 1e-5]
    with pytest.raises(AssertionError):
        jsonparse.loads(b'{"a": NaN}')


@pytest.mark.parametrize(
    "data",
    [
        b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte-order mark
        '{"a": 1}'.encode("utf-16"),  # with its BOM
        '{"a": 1}'.encode("utf-16-le"),  # without: NUL bytes between the characters
        '{"a": 1}'.encode("utf-16-be"),
        '{"a": 1}'.encode("utf-32"),
        '{"a": 1}'.encode("utf-32-le"),
        '\ufeff{"a": 1}',  # a BOM in a str
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8 (CESU-8): not UTF-8
    ],
)
def test_only_utf8_without_a_bom_is_json(data: bytes | str) -> None:
    """json.loads of bytes would guess UTF-16/32 and skip a BOM; the exporter refuses them (README: Bad input)."""
    with pytest.raises(ValueError):
        jsonparse.loads(data)
    assert json.loads('{"a": 1}'.encode("utf-16")) == {"a": 1}  # what the standard library alone would do


def test_deep_nesting_is_malformed_json_not_a_crash() -> None:
    deep = b'{"client": "k", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Rejected) as err:
        Decoder(load_settings(None)).decode_line(deep)
    assert err.value.reason == reasons.MALFORMED_JSON
