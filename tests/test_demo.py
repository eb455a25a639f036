"""Demo traffic that tells the truth: the README's demo log and the compose stack's demo service
flag their attackers and no benign client, also when they run again into an exporter that
remembers every client; simulate's seed, streams and push token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.config import Settings
from exporter.demo import example_log
from exporter.replay import replay
from exporter.sim.cli import default_token, main as simulate_main
from tests.conftest import REPO


def demo_run(*args: str) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "exporter.demo", *args], capture_output=True, text=True, cwd=REPO, check=True)
    return run.stdout.splitlines()


def clients(lines: list[str]) -> set[str]:
    return {json.loads(line)["client"] for line in lines}


def flagged(report: dict) -> set[str]:
    return {c for c, v in report["clients"].items() if v["flagged"]}


def test_the_readme_demo_is_new_traffic_from_new_clients_on_every_run(tmp_path: Path) -> None:
    fixed = demo_run("--seed", "0")
    assert fixed == list(example_log(seed=0)) and "scraper-repeat" in clients(fixed)
    first, second = demo_run(), demo_run()
    assert clients(first).isdisjoint(clients(second)) and clients(first).isdisjoint(clients(fixed))
    assert {json.loads(x)["input"][0] for x in first[:50]} != {json.loads(x)["input"][0] for x in second[:50]} or first != second
    # Three runs into one exporter, as the README's command run three times with the state kept.
    log = tmp_path / "example.jsonl"
    log.write_text("\n".join(fixed + first + second) + "\n")
    report = replay(Settings(state={"dir": None}), [str(log)], progress=False)
    assert len(report["clients"]) == 69
    assert flagged(report) == {c for c in report["clients"] if c.startswith("scraper-")}


def compose_demo_args() -> list[str]:
    """The compose demo service's command, without live pacing and output path (set by the test)."""
    command = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["demo"]["command"]
    assert command[0] == "simulate" and "--stream" in command and command[command.index("--stream") + 1] == "auto"
    args = list(command[1:])
    for option in ("--out", "--rate"):
        i = args.index(option)
        del args[i : i + 2]
    return args


def test_the_compose_demo_flags_its_attackers_and_no_benign_client_across_restarts(tmp_path: Path) -> None:
    """Two passes of the demo service (it restarts after each) into one log, replayed without a profile,
    as the stack's exporter runs: every attacker is flagged, no benign client."""
    log = tmp_path / "demo.jsonl"
    truth: dict[str, dict] = {}
    for n in range(2):  # passes of ~100 s, one after the other, as the live service's 50 events/s
        gt = tmp_path / f"gt{n}.json"
        args = [*compose_demo_args(), "--duration", "100", "--start", str(1764097200 + 200 * n), "--out", str(log), "--ground-truth", str(gt), "--quiet"]
        assert simulate_main(args) == 0
        truth.update(json.loads(gt.read_text())["clients"])
    report = replay(Settings(state={"dir": None}), [str(log)], progress=False)
    attackers = {c for c, t in truth.items() if t["kind"] == "attack"}
    assert len(truth) == 46 and len(attackers) == 6  # 2 x (20 benign + 3 attackers), no id shared by the passes
    assert flagged(report) == attackers


def test_simulate_streams(tmp_path: Path) -> None:
    base = ["--dataset", "synthetic", "--benign", "3", "--attacks", "uniform", "--attack-queries", "30", "--quiet"]
    main_a, main_b, calib, auto = (tmp_path / f"{n}.jsonl" for n in ("a", "b", "calib", "auto"))
    for out, extra in ((main_a, []), (main_b, []), (calib, ["--stream", "calib"]), (auto, ["--stream", "auto"])):
        assert simulate_main([*base, *extra, "--out", str(out)]) == 0
    assert main_a.read_text() == main_b.read_text()  # the main stream is reproducible
    ids = {p: clients(p.read_text().splitlines()) for p in (main_a, calib, auto)}
    assert all(c.startswith("calib-") for c in ids[calib]) and "calib-atk-uniform-0" in ids[calib]
    assert all(c.startswith("r") and c.split("-", 1)[1] in ids[main_a] for c in ids[auto])
    inputs = lambda p: {json.dumps(json.loads(x)["input"]) for x in p.read_text().splitlines()}  # noqa: E731
    shared = inputs(main_a) & inputs(calib)  # other clients of the same world (a held-out population) share
    assert len(shared) < 0.2 * len(inputs(calib))  # only what the world makes common: its pool of popular inputs
    assert simulate_main([*base, "--stream", "a b"]) == 2


def test_simulate_reads_the_exporters_own_token_variables(tmp_path: Path) -> None:
    assert default_token({"MONITAUR_PUSH__TOKENS": " t1, t2"}) == "t1"
    (tmp_path / "tokens").write_text("# push tokens\nfrom-file\nother\n")
    assert default_token({"MONITAUR_PUSH__TOKENS_FILE": str(tmp_path / "tokens")}) == "from-file"
    assert default_token({"MONITAUR_PUSH__TOKENS": "", "MONITAUR_PUSH__TOKENS_FILE": str(tmp_path / "tokens")}) == "from-file"
    assert default_token({}) is None
    assert simulate_main(["--dataset", "synthetic", "--benign", "1", "--attacks", "none", "--events", "5", "--quiet",
                          "--push", "http://127.0.0.1:9", ]) == 1  # no token needed to try; unreachable


@pytest.mark.parametrize("variable", ["MONITAUR_PUSH__TOKENS", "MONITAUR_PUSH__TOKENS_FILE"])
def test_simulate_pushes_with_the_exporters_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    from exporter.app import App

    app = App(Settings(listen={"port": 0}, files={"paths": []}, state={"dir": None}, push={"tokens": ["s3cret"]}))
    app.start()
    try:
        host, port = app.address
        (tmp_path / "tokens").write_text("s3cret\n")
        monkeypatch.setenv(variable, "s3cret" if variable == "MONITAUR_PUSH__TOKENS" else str(tmp_path / "tokens"))
        assert simulate_main(["--dataset", "synthetic", "--benign", "1", "--attacks", "none", "--events", "20", "--quiet",
                              "--push", f"http://{host}:{port}"]) == 0
    finally:
        app.stop()
