"""The ``monitaur-exporter`` command line: run, replay, calibrate, simulate, healthcheck, check-config.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

from exporter.tuning import tune_process

# Before numpy loads: one BLAS thread, no huge pages for numpy's arrays (exporter.tuning
# says why); an operator's own setting wins.
tune_process()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Sequence  # noqa: E402

from exporter import __version__  # noqa: E402
from exporter.config import ConfigError, Settings, load_settings, unknown_env_vars  # noqa: E402
from exporter.detectors import enabled_detectors  # noqa: E402
from exporter.inputs import InputError  # noqa: E402
from exporter.profile import Profile, ProfileError  # noqa: E402
from exporter.sim.cli import add_parser as add_simulate_parser  # noqa: E402
from exporter.webconfig import WebConfigError  # noqa: E402

log = logging.getLogger("monitaur")


def _setup_logging(settings: Settings) -> None:
    """One stderr handler for every logger; it escapes every record (``logutil.EscapingFilter``)."""
    from exporter.logutil import escaping_handler

    logging.basicConfig(level=settings.log_level.upper(), handlers=[escaping_handler(sys.stderr)])


def _profile(args: argparse.Namespace, settings: Settings) -> Profile | None:
    from exporter.profile import load_profile

    return load_profile(getattr(args, "profile", None) or settings.profile, settings)


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.app import App

    app = App(settings, _profile(args, settings))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.start()
    except (OSError, WebConfigError) as exc:  # a port in use; a web config or certificate changed since validation
        log.error("cannot start: %s", exc)
        return 1
    stopping.wait()
    app.stop()
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.replay import replay

    profile = _profile(args, settings)
    recorder = None
    if args.html:
        from exporter.timelines import TimelineRecorder

        recorder = TimelineRecorder()
    try:
        report = replay(settings, args.logs, profile=profile, observer=recorder, at_end=recorder.finish if recorder else None)
    except InputError as exc:
        print(f"monitaur-exporter replay: {exc}", file=sys.stderr)
        return 2
    if recorder is not None:
        from exporter.report_html import write_replay_html

        try:
            size = write_replay_html(args.html, report, recorder, profile, getattr(args, "profile", None) or settings.profile)
        except OSError as exc:
            print(f"monitaur-exporter replay: cannot write {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        log.info("forensic report written to %s (%d bytes)", args.html, size)
    json.dump(report, sys.stdout, indent=None if args.compact else 2)
    sys.stdout.write("\n")
    return 0


def _cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.calibrate import calibrate

    try:
        profile, summary = calibrate(settings, args.logs)
    except InputError as exc:
        print(f"monitaur-exporter calibrate: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"monitaur-exporter calibrate: {exc}", file=sys.stderr)
        return 1
    profile.save(args.out)
    json.dump({"profile": str(args.out), **summary}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    detectors = ", ".join(enabled_detectors(settings)) or "none"
    print(f"{args.file}: OK (detectors: {detectors}; tailing: {', '.join(settings.files.paths) or 'nothing'})")
    return 0


def _cmd_healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from exporter.healthcheck import check

    healthy, what = check(settings, Path(args.basic_auth_file) if args.basic_auth_file else None)
    print(what, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitaur-exporter", description="Detect model-extraction traffic per client and export it to Prometheus.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="tail logs, accept pushes and serve /metrics until SIGTERM")
    run.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded default)")
    run.add_argument("--profile", metavar="PROFILE", help="calibration profile made by `calibrate`")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("replay", help="run the detectors over historical logs and print a JSON report")
    rep.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded default)")
    rep.add_argument("--profile", metavar="PROFILE", help="calibration profile made by `calibrate`")
    rep.add_argument("--compact", action="store_true", help="print the report on one line")
    rep.add_argument("--html", metavar="FILE", help="also write the forensic report as a self-contained HTML page")
    rep.add_argument("logs", nargs="+", metavar="LOG",
                     help="JSON-lines logs: files (plain, gzip, bzip2 or xz), globs or directories (every file within, in path order)")
    rep.set_defaults(func=_cmd_replay)

    cal = sub.add_parser("calibrate", help="learn reference statistics and thresholds from benign logs")
    cal.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded default)")
    cal.add_argument("--out", metavar="PROFILE", required=True, help="where to write the profile")
    cal.add_argument("logs", nargs="+", metavar="LOG",
                     help="benign JSON-lines logs (or training data written as events): files (plain or compressed), globs or directories")
    cal.set_defaults(func=_cmd_calibrate)

    add_simulate_parser(sub)

    hc = sub.add_parser("healthcheck", help="ask the running exporter's /healthz (TLS when configured); exit 0 if healthy")
    hc.add_argument("--config", metavar="FILE", help="the config the exporter runs with (default: the embedded default)")
    hc.add_argument("--basic-auth-file", metavar="FILE", help="a file holding user:password, if /healthz is behind basic auth")
    hc.set_defaults(func=_cmd_healthcheck)

    chk = sub.add_parser("check-config", help="validate a config file and exit")
    chk.add_argument("file", metavar="FILE")
    chk.set_defaults(func=_cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = getattr(args, "config", None) or getattr(args, "file", None)
    try:
        settings = load_settings(path)
        enabled_detectors(settings)  # detector parameters, plugins and fusion.inputs: fail here, at start-up
    except ConfigError as exc:
        if exc.file is None and path:
            exc.file = str(path)
        print(f"monitaur-exporter: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    for name in unknown_env_vars():
        log.warning("environment variable %s names no configuration key; it is ignored (keys: %s)", name, ", ".join(Settings.model_fields))
    try:
        return int(args.func(args, settings))
    except ProfileError as exc:
        print(f"monitaur-exporter: unusable calibration profile: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
