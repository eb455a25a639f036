"""replay and calibrate inputs: compressed logs, directories, and clear refusals (exporter/inputs.py),
and the warning when replayed traffic does not fit its profile (exporter/fit.py)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter import inputs
from exporter.config import Settings
from exporter.demo import benign_log, example_log
from exporter.events import Decoder
from exporter.fit import FAR_SPREADS, fit_warnings
from exporter.inputs import InputError, log_files, looks_binary, open_log
from exporter.profile import ModelProfile, Profile
from exporter.replay import replay
from tests.conftest import REPO

LINES = list(example_log(seed=0))


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_logs_replay_like_the_plain_one(tmp_path: Path, compress) -> None:
    plain = write(tmp_path / "app.jsonl", LINES)
    packed = tmp_path / "app.jsonl.1"  # the name does not matter: the first bytes do
    packed.write_bytes(compress(plain.read_bytes()))
    assert replay(Settings(state={"dir": None}), [str(packed)], progress=False) == replay(Settings(state={"dir": None}), [str(plain)], progress=False)


def test_a_directory_is_every_file_under_it_in_path_order(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    write(d / "b.jsonl", LINES[100:])
    (d / "a.jsonl.gz").write_bytes(gzip.compress("".join(x + "\n" for x in LINES[:50]).encode()))
    write(d / "old" / "c.jsonl", LINES[50:100])
    write(d / ".hidden.jsonl", ["{bad"])  # hidden names are skipped
    write(d / ".git" / "x.jsonl", ["{bad"])
    assert [p.relative_to(d).as_posix() for p in log_files([str(d)])] == ["a.jsonl.gz", "b.jsonl", "old/c.jsonl"]
    whole = replay(Settings(state={"dir": None}), [str(write(tmp_path / "all.jsonl", LINES))], progress=False)
    assert replay(Settings(state={"dir": None}), [str(d)], progress=False) == whole
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no log file"):
        log_files([str(tmp_path / "empty")])


@pytest.mark.parametrize("command", ["replay", "calibrate"])
def test_binary_missing_and_corrupt_inputs_fail_with_the_file_named(tmp_path: Path, command: str) -> None:
    out = ["--out", str(tmp_path / "p.npz")] if command == "calibrate" else []
    rnd = tmp_path / "profile.npz"
    rnd.write_bytes(np.random.default_rng(0).bytes(20000))
    trunc = tmp_path / "cut.jsonl.gz"
    trunc.write_bytes(gzip.compress("".join(x + "\n" for x in LINES).encode())[:20000])
    for path, why in ((rnd, "binary file, not JSON lines"), (trunc, "corrupt or truncated gzip data"),
                      (tmp_path / "nope.jsonl", "no such log file"), (tmp_path / "none-*.jsonl", "no log file matches")):
        run = cli(command, *out, str(path))
        assert run.returncode == 2, (path, run.stderr)
        assert why in run.stderr and str(path.name) in run.stderr, run.stderr
    assert not (tmp_path / "p.npz").exists()


class _Recording(io.BytesIO):
    """A stream that remembers the most bytes any read asked for."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        self.largest = max(self.largest, -1 if size is None or size < 0 else size)
        return super().read(size)


def test_lines_longer_than_the_limit_are_dropped_without_being_held_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "READ_BYTES", 7)  # lines span several reads
    limit = 64
    at_limit, over, huge = b"a" * limit, b"b" * (limit + 1), b"c" * (50 * limit + 3)
    text = b"x\n" + at_limit + b"\n" + over + b"\n\n" + huge + b"\ny\n" + b"d" * (3 * limit) + b"\r\n" + b"z" * 5
    stream = _Recording(text)
    got = list(inputs.bounded_lines(stream, limit))
    assert got == [b"x", at_limit, None, b"", None, b"y", None, b"z" * 5]
    assert stream.largest == 7  # read a block at a time, never to the end of a line
    assert got == [line if len(line) <= limit else None for line in text.split(b"\n")]  # the lines, as split
    assert list(inputs.bounded_lines(io.BytesIO(b"e" * (10 * limit)), limit)) == [None]  # a last line without its newline too
    assert list(inputs.bounded_lines(io.BytesIO(b""), limit)) == []


@pytest.mark.parametrize("command", ["replay", "calibrate"])
def test_a_huge_line_in_a_compressed_log_is_rejected_and_its_neighbours_kept(tmp_path: Path, command: str) -> None:
    """A small gzip file that expands to one 64 MiB line (the content of a line comes from
    clients): rejected as line_too_long, read a piece at a time, every other line judged."""
    with gzip.open(tmp_path / "log.gz", "wb") as fh:
        fh.write("".join(x + "\n" for x in LINES[:60]).encode())
        for _ in range(64):
            fh.write(b" " * (1 << 20))
        fh.write(("\n" + "".join(x + "\n" for x in LINES[60:120])).encode())
    assert (tmp_path / "log.gz").stat().st_size < 1 << 20
    config = tmp_path / "config.yml"
    config.write_text("files:\n  max_line_bytes: 65536\nstate:\n  dir: null\n")
    out = ["--out", str(tmp_path / "p.bin")] if command == "calibrate" else []
    run = cli(command, "--config", str(config), *out, str(tmp_path / "log.gz"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["events"] == {"accepted": 120, "rejected": {"line_too_long": 1}}
    assert "line_too_long: line longer than 65536 bytes" in run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_log_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.jsonl", LINES[:5])
    path.chmod(0)
    run = cli("replay", str(path))
    assert run.returncode == 2 and "cannot read" in run.stderr and "Permission denied" in run.stderr


def test_hostile_lines_do_not_make_a_log_binary() -> None:
    text = "".join(x + "\n" for x in LINES[:40]).encode()
    assert not looks_binary(text)
    assert not looks_binary(text + b'{"client": "a\x00b\x1b[31m"}\n' * 3)  # a few hostile lines are rejected one by one
    assert not looks_binary("".join(json.dumps({"client": "客户-7", "input": "ü" * 50}, ensure_ascii=False) + "\n" for _ in range(50)).encode())
    assert looks_binary("".join(x + "\n" for x in LINES[:5]).encode("utf-16"))
    assert looks_binary(gzip.compress(text))


def test_progress_counts_bytes_of_the_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress("".join(x + "\n" for x in LINES).encode()))
    with open_log(path) as (lines, position):
        n = sum(1 for _ in lines)
        assert n == len(LINES) and position() == path.stat().st_size


# -- profile fit ---------------------------------------------------------------------
def _profile(center: np.ndarray, spread: np.ndarray, dim: int = 64) -> Profile:
    mp = ModelProfile(modality="tabular", input_dim=dim, num_classes=10, scaling={"center": center, "spread": spread}, clients=300, events=18000)
    return Profile(target_fpr=0.01, models={"digits": mp})


def _events(lines: list[str]) -> list:
    decoder = Decoder(Settings())
    return [decoder.decode_line(line.encode(), 0.0) for line in lines]


def test_traffic_that_fits_its_profile_gives_no_warning() -> None:
    benign = _events(list(benign_log(seed=3, clients=40)))
    x = np.stack([e.vector for e in benign])
    profile = _profile(x.mean(0), x.std(0) + 0.5)
    assert fit_warnings(profile, _events(LINES), {}) == []  # scrapers included: they are a minority


def test_traffic_of_another_world_is_warned_about_with_counts() -> None:
    benign = _events(list(benign_log(seed=3, clients=40)))
    x = np.stack([e.vector for e in benign])
    shifted = _profile(x.mean(0) + 10 * (x.std(0) + 0.5), x.std(0) + 0.5)  # every event is far from this centre
    [warning] = fit_warnings(shifted, benign, {})
    assert f"{len(benign):,} of {len(benign):,} events (100%)" in warning and f"more than {FAR_SPREADS:g} spreads" in warning
    assert "simulate --seed" in warning and "calibrated on 18,000 events of 300 clients" in warning
    [dims] = fit_warnings(_profile(x.mean(0), x.std(0) + 0.5), benign[:10], {"wrong_dimension": 200})
    assert "200 of 210 events (95%) were rejected as wrong_dimension" in dims and "'digits': 64 features, 10 classes" in dims


def test_replay_reports_and_logs_the_fit_warning(tmp_path: Path) -> None:
    """simulate --seed changes the world: a profile of seed 0 does not fit seed 1's synthetic traffic."""
    def sim(*args: str) -> Path:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        run = cli("simulate", "--dataset", "synthetic", "--quiet", "--attacks", "none", "--queries-per-client", "30", "--out", str(out), *args)
        assert run.returncode == 0, run.stderr
        return out

    calib = sim("--seed", "0", "--stream", "calib", "--benign", "60")
    same, other = sim("--seed", "0", "--benign", "15"), sim("--seed", "1", "--benign", "15")
    run = cli("calibrate", "--out", str(tmp_path / "p.npz"), str(calib))
    assert run.returncode == 0, run.stderr
    fits = cli("replay", "--profile", str(tmp_path / "p.npz"), str(same))
    assert fits.returncode == 0 and "does not seem to fit" not in fits.stderr and "warnings" not in json.loads(fits.stdout)
    misfit = cli("replay", "--profile", str(tmp_path / "p.npz"), str(other))
    assert misfit.returncode == 0 and "WARNING" in misfit.stderr and "does not seem to fit" in misfit.stderr
    [warning] = json.loads(misfit.stdout)["warnings"]
    assert "model 'synthetic'" in warning
