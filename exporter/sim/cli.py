"""``monitaur-exporter simulate``: generate benign and attack traffic, write it or push it.

Hook it into the main parser with ``add_parser(subparsers)``; until then it also runs
standalone as ``python -m exporter.sim.cli``. Two modes:

* ``--rate 0`` (default): as fast as possible, with synthetic timestamps spread over
  ``--duration`` seconds (default 3600) from ``--start`` (a fixed epoch by default, so a
  seed and a stream always give byte-identical output);
* ``--rate R``: live, ``R`` events per second in real time, each stamped with the wall
  clock when it is sent: the way to feed a running exporter (``--push``) or a tailed log
  (``--out``) for a demo. ``--duration`` then caps the run at ``R * duration`` events.

``--seed`` makes the *world*: the dataset's split into roles, the victim model trained on
it and, for the synthetic dataset, the data itself; and the clients' traffic. A profile
calibrated on one seed's traffic does not fit another seed's (``replay`` warns when
traffic does not fit its profile). ``--stream NAME`` draws other clients in the same world
(client ids then start with ``NAME-``): a held-out benign population to calibrate on, or,
with ``--stream auto`` (a name from the clock), new traffic from new clients on every run,
which a restarted demo needs, since the exporter remembers every client it has seen.

``--push`` sends ``--token``, else the first of the exporter's own push tokens
(``MONITAUR_PUSH__TOKENS`` or the file in ``MONITAUR_PUSH__TOKENS_FILE``).

Exit codes: 0 success, 1 runtime failure (a push refused or unreachable), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Sequence

PUSH_PATH = "/api/v1/events"
DEFAULT_ATTACKS = "jbda,hopskipjump"
TOKEN_ENV = "MONITAUR_PUSH__TOKENS"  # the exporter's own variables (push.tokens, push.tokens_file)
MAIN_STREAM = "main"


class UsageError(Exception):
    """A bad option value; reported with exit code 2."""


class PushError(Exception):
    """The exporter refused a push or could not be reached; exit code 1."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an ``argparse`` subparsers object."""
    from exporter.sim.datasets import NAMES

    p = subparsers.add_parser(
        "simulate",
        help="generate benign and attack traffic (JSON lines) to a file, stdout or a running exporter",
        description="Simulate clients of a prediction API: benign behaviours and model-extraction or "
        "adversarial-search attacks against a small victim model. Writes JSON-lines events "
        '{"ts", "client", "model", "input", "output"} to --out (or stdout), or pushes them to an exporter.',
    )
    p.add_argument("--dataset", choices=NAMES, default=None, help="data and victim (default: digits if scikit-learn is installed, else synthetic)")
    p.add_argument("--model", metavar="NAME", help="model name in the events (default: the dataset name)")
    p.add_argument("--benign", type=int, default=20, metavar="N", help="benign clients (default 20)")
    p.add_argument("--queries-per-client", type=int, default=100, metavar="N", help="median queries of a benign client (default 100)")
    p.add_argument("--mix", metavar="B=W,...", help="benign behaviour weights, e.g. iid=3,retries=1 (default: the built-in mix)")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS, metavar="A[:N],...",
                   help=f"attacks, optionally with a client count each (sybil: groups); 'none' for none (default {DEFAULT_ATTACKS})")
    p.add_argument("--attack-queries", type=int, default=1000, metavar="N", help="queries per attacker, per group for sybil (default 1000)")
    p.add_argument("--list-attacks", action="store_true", help="list the attacks and benign behaviours, then exit")
    p.add_argument("--rate", type=float, default=0.0, metavar="EVENTS_PER_S", help="real-time pacing; 0 = as fast as possible with synthetic timestamps (default)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="rate 0: span of the synthetic timestamps (default 3600); rate > 0: stop after this long")
    p.add_argument("--events", type=int, metavar="N", help="emit exactly N events (per-client query counts are scaled up if the population is too small)")
    p.add_argument("--start", default=None, metavar="EPOCH|now", help="first synthetic timestamp (default: a fixed epoch, for reproducible output)")
    p.add_argument("--out", metavar="FILE", help="append JSON lines to FILE (directories are created; '-' = stdout)")
    p.add_argument("--push", metavar="URL", help=f"POST batches of JSON lines to an exporter (base URL or full {PUSH_PATH} URL)")
    p.add_argument("--token", metavar="TOKEN", help=f"bearer token for --push (default: the first of ${TOKEN_ENV} or of the file in ${TOKEN_ENV}_FILE)")
    p.add_argument("--batch", type=int, default=500, metavar="N", help="events per push request (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the world (dataset split, victim model; the synthetic data itself) "
                   "and of the traffic (default 0): a profile calibrated on one seed does not fit another's traffic")
    p.add_argument("--stream", default=MAIN_STREAM, metavar="NAME|auto",
                   help=f"other clients in the same world: a random stream of their own, ids prefixed with NAME- (default {MAIN_STREAM}: "
                   "no prefix); 'auto': a name from the clock, so every run sends new traffic from new clients")
    p.add_argument("--ground-truth", metavar="FILE", help="write client -> kind/type/group as JSON")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.set_defaults(func=cmd_simulate)
    return p


# -- option parsing ----------------------------------------------------------------
def parse_attacks(text: str) -> dict[str, int]:
    """``"jbda,uniform:3"`` -> ``{"jbda": 1, "uniform": 3}``; ``"none"``/``""`` -> ``{}``."""
    from exporter.sim.attacks import ATTACKS

    out: dict[str, int] = {}
    if text.strip().lower() in ("", "none"):
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition(":")
        name = name.strip().lower().replace("-", "_")
        if name not in ATTACKS:
            raise UsageError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)} (see --list-attacks)")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise UsageError(f"attack count in {item!r} is not an integer") from None
        if n < 0:
            raise UsageError(f"attack count in {item!r} must be >= 0")
        out[name] = out.get(name, 0) + n
    return out


def parse_mix(text: str) -> dict[str, float]:
    """``"iid=3,retries=1"`` -> weights; names must be known behaviours."""
    from exporter.sim.benign import BEHAVIOURS

    out: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, weight = item.partition("=")
        name = name.strip()
        if name not in BEHAVIOURS:
            raise UsageError(f"unknown benign behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(f"weight in {item!r} is not a number") from None
        if w < 0 or not math.isfinite(w):
            raise UsageError(f"weight in {item!r} must be a finite number >= 0")
        out[name] = w
    if not out or sum(out.values()) <= 0:
        raise UsageError("--mix needs at least one behaviour with a positive weight")
    return out


def push_url(url: str) -> str:
    """A base URL gets the push path appended; a full URL is kept."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--push needs an http:// or https:// URL, got {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=PUSH_PATH)
    return urllib.parse.urlunsplit(parts)


def _check(args: argparse.Namespace) -> None:
    if args.benign < 0:
        raise UsageError("--benign must be >= 0")
    if args.queries_per_client < 1 or args.attack_queries < 1:
        raise UsageError("--queries-per-client and --attack-queries must be >= 1")
    if args.rate < 0 or not math.isfinite(args.rate):
        raise UsageError("--rate must be a finite number >= 0 (0 = as fast as possible)")
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        raise UsageError("--duration must be a positive number of seconds")
    if args.events is not None and args.events < 1:
        raise UsageError("--events must be >= 1")
    if args.batch < 1:
        raise UsageError("--batch must be >= 1")
    if args.token and not args.push:
        raise UsageError("--token is only used with --push")
    if args.start is not None and args.rate > 0:
        raise UsageError("--start applies to synthetic timestamps (--rate 0); live events are stamped with the wall clock")


def _start(value: str | None) -> float:
    from exporter.sim.traffic import DEFAULT_START

    if value is None:
        return DEFAULT_START
    if value == "now":
        return float(int(time.time()))
    try:
        start = float(value)
    except ValueError:
        raise UsageError(f"--start must be an epoch in seconds or 'now', got {value!r}") from None
    if not 0 <= start < 32503680000:
        raise UsageError("--start must be a plausible epoch in seconds")
    return start


def _stream(value: str) -> str:
    """``auto`` -> a name from the clock (unique per run); other names as given."""
    if value == "auto":
        return f"r{time.time_ns() // 1_000_000:x}"  # milliseconds, hex: 11 characters
    if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
        raise UsageError(f"--stream must be letters, digits, '-', '_' or '.', got {value!r}")
    return value


def in_stream(traffic: Any, stream: str) -> Any:
    """Client (and Sybil group) ids prefixed with the stream's name, unless it is the main stream."""
    if stream == MAIN_STREAM:
        return traffic
    new = {c: f"{stream}-{c}" for c in traffic.clients}
    truth = {new[c]: {**info, "group": f"{stream}-{info['group']}" if info.get("group") else info.get("group")}
             for c, info in traffic.truth.items()}
    return replace(traffic, clients=[new[c] for c in traffic.clients], truth=truth)


def default_token(environ: Any) -> str | None:
    """The first of the exporter's push tokens: ``MONITAUR_PUSH__TOKENS`` (comma-separated),
    else the file named by ``MONITAUR_PUSH__TOKENS_FILE`` (one per line, ``#`` comments)."""
    tokens = [t.strip() for t in environ.get(TOKEN_ENV, "").split(",") if t.strip()]
    path = environ.get(f"{TOKEN_ENV}_FILE")
    if not tokens and path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {TOKEN_ENV}_FILE {path!r}: {exc.strerror or exc}") from None
        tokens = [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]
    return tokens[0] if tokens else None


# -- output ------------------------------------------------------------------------
class Pusher:
    """POSTs batches of JSON lines to the exporter's push endpoint; expects 202."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.requests = 0

    def send(self, lines: list[str]) -> None:
        body = ("\n".join(lines) + "\n").encode()
        headers = {"Content-Type": "application/x-ndjson"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                code, text = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            code, text = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PushError(f"cannot reach {self.url}: {reason}") from None
        self.requests += 1
        try:
            answer = json.loads(text or b"{}")
        except ValueError:
            answer = {}
        if code != 202:
            detail = answer.get("error") if isinstance(answer, dict) else None
            hint = " (check --token)" if code == 401 else " (lower --batch)" if code == 413 else ""
            raise PushError(f"push to {self.url} refused: HTTP {code}{f': {detail}' if detail else ''}{hint}")
        if isinstance(answer, dict):
            self.accepted += int(answer.get("accepted", 0))
            for reason, n in (answer.get("rejected_reasons") or {}).items():
                self.rejected[reason] = self.rejected.get(reason, 0) + int(n)


def _emit(traffic: Any, args: argparse.Namespace, sinks: list[IO[str]], pusher: Pusher | None) -> int:
    """Send every event to the sinks and the pusher, paced in real time when ``--rate`` > 0."""
    import numpy as np

    n = len(traffic)
    if args.rate <= 0:
        lines = traffic.lines()
        chunk = max(args.batch, 1)
        sent = 0
        while sent < n:
            part = [next(lines) for _ in range(min(chunk, n - sent))]
            for fh in sinks:
                fh.write("\n".join(part) + "\n")
            if pusher is not None:
                pusher.send(part)
            sent += len(part)
        return sent
    # Live: event k leaves at t0 + k / rate, stamped with the wall clock; flush at least twice a second.
    per_flush = max(1, min(args.batch, int(math.ceil(args.rate / 2))))
    t0 = time.time()
    sent = 0
    while sent < n:
        k = min(per_flush, n - sent)
        due = t0 + (sent + k - 1) / args.rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        stamps = np.full(k, time.time())
        part = list(traffic.subset(np.arange(sent, sent + k)).lines(ts=stamps))
        for fh in sinks:
            fh.write("\n".join(part) + "\n")
            fh.flush()
        if pusher is not None:
            pusher.send(part)
        sent += k
    return sent


def run(args: argparse.Namespace) -> int:
    """Execute ``simulate`` with parsed arguments; raises UsageError / PushError."""
    from exporter.sim.attacks import ATTACKS
    from exporter.sim.benign import BEHAVIOURS, DEFAULT_MIX
    from exporter.sim.datasets import DatasetUnavailable, default_dataset
    from exporter.sim.traffic import Population, simulate
    from exporter.sim.world import build_world

    if args.list_attacks:
        print("attacks (use with --attacks NAME[:COUNT],...):")
        for spec in ATTACKS.values():
            print(f"  {spec.name:<12} {spec.summary}")
        print("benign behaviours (use with --mix NAME=WEIGHT,...; default mix in parentheses):")
        for name in BEHAVIOURS:
            print(f"  {name:<15} ({DEFAULT_MIX.get(name, 0):.2f})")
        return 0
    _check(args)
    attacks = parse_attacks(args.attacks)
    mix = parse_mix(args.mix) if args.mix else dict(DEFAULT_MIX)
    url = push_url(args.push) if args.push else None
    token = (args.token or default_token(os.environ)) if url else None
    stream = _stream(args.stream)
    window = args.duration if (args.duration and args.rate <= 0) else 3600.0
    pop = Population(
        benign=args.benign, mix=mix, benign_queries=args.queries_per_client, attacks=attacks,
        attack_queries=args.attack_queries, window=window, start=_start(args.start), stream=stream,
    )
    if pop.benign == 0 and not any(attacks.values()):
        raise UsageError("nothing to simulate: --benign is 0 and no attacks are given")
    pop.validate()
    cap = args.events
    if args.rate > 0 and args.duration is not None:
        by_time = max(1, int(args.rate * args.duration))
        cap = by_time if cap is None else min(cap, by_time)
    dataset = args.dataset or default_dataset()
    try:
        world = build_world(dataset, args.seed, args.model)
    except DatasetUnavailable as exc:
        raise UsageError(str(exc)) from None
    traffic = in_stream(simulate(world, pop, args.seed), stream)
    if args.events is not None and len(traffic) < args.events:
        factor = args.events / len(traffic) * 1.05
        pop = replace(pop, benign_queries=math.ceil(pop.benign_queries * factor), attack_queries=math.ceil(pop.attack_queries * factor))
        traffic = in_stream(simulate(world, pop, args.seed), stream)
        scaled = f" (per-client query counts scaled by {factor:.2f} to reach --events)"
    else:
        scaled = ""
    if cap is not None:
        traffic = traffic.head(cap)

    sinks: list[IO[str]] = []
    opened: IO[str] | None = None
    if args.out and args.out != "-":
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            opened = open(out, "a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
        sinks.append(opened)
    elif args.out == "-" or url is None:
        sinks.append(sys.stdout)
    pusher = Pusher(url, token) if url else None
    try:
        sent = _emit(traffic, args, sinks, pusher)
    finally:
        if opened is not None:
            opened.close()
    if args.ground_truth:
        gt = traffic.ground_truth(dataset=dataset, seed=args.seed, stream=stream)
        path = Path(args.ground_truth)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(gt, indent=2) + "\n", encoding="utf-8")
    if not args.quiet:
        kinds = traffic.ground_truth()["clients"].values()
        n_att = sum(1 for c in kinds if c["kind"] == "attack" and c["queries"])
        n_ben = sum(1 for c in kinds if c["kind"] == "benign" and c["queries"])
        where = [w for w in (args.out if args.out not in (None, "-") else None, url) if w] or ["stdout"]
        msg = (f"simulate: {sent} events from {n_ben} benign and {n_att} attacker clients ({dataset}, seed {args.seed}, stream {stream})"
               f"{scaled} -> {', '.join(where)}")
        if pusher is not None:
            msg += f"; pushed in {pusher.requests} requests, {pusher.accepted} accepted"
            if pusher.rejected:
                msg += f", rejected: {pusher.rejected}"
        print(msg, file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace, settings: Any = None) -> int:
    """The subcommand entry point (``settings`` is unused: the simulator needs no config)."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"monitaur-exporter simulate: {exc}", file=sys.stderr)
        return 2
    except PushError as exc:
        print(f"monitaur-exporter simulate: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("monitaur-exporter simulate: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m exporter.sim.cli [options]``."""
    parser = argparse.ArgumentParser(prog="monitaur-exporter")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args, None))


if __name__ == "__main__":
    raise SystemExit(main())
