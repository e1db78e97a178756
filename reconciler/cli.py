"""The ``dora-reconciler`` command: subcommands, exit codes, logging set-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO, cast

from reconciler import __version__, exitcodes
from reconciler.config import Config, ConfigError, load_config
from reconciler.logs import Redactor, configure_logging, url_secrets
from reconciler.run import InvalidRequest

log = logging.getLogger("reconciler")


DESCRIPTION = """\
Turn Argo CD deployments into Apache DevLake deployment records for DORA metrics.

Each run lists every Argo CD Application, compares it with the snapshot stored from the last run,
turns every difference into SUCCESS or FAILED deployments with their GitHub commits, posts them to
DevLake and only then advances the snapshot: a missed run is caught up by the next one.
"""

EPILOG = """\
exit codes:
  0  done
  1  some work failed (delivery, GitHub, a cluster, the state store) and will be retried next run;
     also when the state store cannot be reached at the start: then nothing is listed or sent
  2  configuration or usage error, including a secret's environment variable that the config names but that
     is not set (check: also a dependency that is unreachable, a repository GitHub cannot read, or Redis
     may evict the state)
  3  another run holds the lock
  explain: 1 when no run would read the Application (not found, or hidden by the config's selectors)

environment:
  DORA__SECTION__KEY  overrides any config value, e.g. DORA__STATE__URL=redis://redis:6379/0
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-reconciler",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="the YAML config file of this environment")
    common.add_argument("--log-format", choices=("json", "text"), default="json", help="log lines on stderr")
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def pass_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--dry-run", action="store_true", help="print each payload as a JSON line; send nothing")
        command.add_argument(
            "--cluster", action="append", default=[], metavar="NAME", help="only this cluster (repeatable)"
        )
        command.add_argument("--shard", metavar="I/N", help="only the Applications whose key hashes to shard I of N")

    run = sub.add_parser("run", parents=[common], help="one reconciliation pass, then exit (CronJob, catch-up)")
    pass_options(run)
    backfill = sub.add_parser(
        "backfill", parents=[common], help="emit every deployment still in the Applications' history (idempotent)"
    )
    pass_options(backfill)
    backfill.add_argument("--since", metavar="DATE", help="only history entries deployed at or after DATE (ISO 8601)")
    applications_file_help = (
        "read the cluster's Applications from FILE (kubectl get applications.argoproj.io -A -o json or -o yaml) "
        "instead of its configured source; with several clusters configured, name it with --cluster"
    )
    backfill.add_argument("--applications-file", metavar="FILE", help=applications_file_help)
    sub.add_parser("serve", parents=[common], help="run passes on the config's cron schedule; /metrics and /healthz")
    sub.add_parser("check", parents=[common], help="validate the config and reach every dependency")
    explain = sub.add_parser("explain", parents=[common], help="show how one Application is read and what comes next")
    explain.add_argument("application", metavar="NAMESPACE/NAME")
    explain.add_argument("--cluster", action="append", default=[], metavar="NAME", help="only look in this cluster")
    explain.add_argument("--applications-file", metavar="FILE", help=applications_file_help)
    status = sub.add_parser(
        "status", parents=[common], help="the last runs, the dead-letter list and each connection's backlog"
    )
    status.add_argument("--json", action="store_true", help="one JSON document instead of text")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exitcodes.CONFIG if exit_.code else exitcodes.OK
    redactor = configure_logging(log_format=args.log_format, level=args.log_level)
    out = cast(TextIO, RedactingStream(stdout or sys.stdout, redactor))
    try:
        config = load_config(args.config)
    except ConfigError as error:
        for problem in error.problems:
            print(f"config error: {redactor(problem)}", file=sys.stderr)
        return exitcodes.CONFIG
    redactor.add(config.secret_values())
    redactor.add(url_secrets(config.state.url))
    if args.command in ("run", "backfill", "serve"):
        missing = config.missing_secrets(devlake=not getattr(args, "dry_run", False))
        if missing:
            for problem in missing:
                print(f"config error: {problem}", file=sys.stderr)
            return exitcodes.CONFIG
    try:
        return _dispatch(args, config, out)
    except InvalidRequest as error:
        print(f"error: {redactor(str(error))}", file=sys.stderr)
        return exitcodes.CONFIG
    except Exception as error:
        # A bug or an unforeseen failure: one redacted JSON line with the traceback, never a raw traceback
        # (which would bypass the redactor), and exit 1 so a CronJob retries.
        log.critical("the command failed unexpectedly", exc_info=True, extra={"reason": type(error).__name__})
        return exitcodes.RETRY
    finally:
        out.flush()  # here, where a reader that went away is handled, rather than at interpreter exit


class RedactingStream:
    """``stdout`` with every known secret masked: ``check``, ``explain`` and ``status`` print clients' messages.

    When the reader goes away (``status | head -1``), the rest of the output is dropped quietly and
    ``reader_gone`` is set (a dry run stops at its next safe point): no ``BrokenPipeError`` traceback."""

    def __init__(self, stream: TextIO, redactor: Redactor) -> None:
        self._stream = stream
        self._redact = redactor
        self.reader_gone = threading.Event()

    def write(self, text: str) -> int:
        if not self.reader_gone.is_set():
            try:
                self._stream.write(self._redact(text))
            except BrokenPipeError:
                self._drop_the_rest()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone.is_set():
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop_the_rest()

    def _drop_the_rest(self) -> None:
        self.reader_gone.set()
        # Python flushes stdout again at exit and would report the closed pipe then: point it at /dev/null.
        try:
            descriptor = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, descriptor)
        finally:
            os.close(devnull)

    def isatty(self) -> bool:
        return self._stream.isatty()


def _dispatch(args: argparse.Namespace, config: Config, stdout: TextIO) -> int:
    from reconciler.store import StoreUnavailable  # imports redis: kept out of --help and config errors

    try:
        return _command(args, config, stdout)
    except StoreUnavailable as error:
        log.error("state store unavailable; nothing was done", extra={"reason": str(error)})
        return exitcodes.RETRY


def _command(args: argparse.Namespace, config: Config, stdout: TextIO) -> int:
    if args.command == "serve":
        from reconciler import scheduler  # APScheduler and the HTTP server: only serve needs them

        return scheduler.serve(config)
    from reconciler import commands  # import the clients: kept out of --help and config errors

    if getattr(args, "applications_file", None) is not None:
        config = commands.read_applications_from(config, tuple(args.cluster), args.applications_file)
    if args.command in ("run", "backfill"):
        since = _parse_since(args.since) if args.command == "backfill" else None
        return commands.run_command(
            config,
            command=args.command,
            dry_run=args.dry_run,
            clusters=tuple(args.cluster),
            shard=args.shard,
            since=since,
            stdout=stdout,
            reader_gone=stdout.reader_gone if isinstance(stdout, RedactingStream) else None,
        )
    if args.command == "check":
        return commands.check_command(config, stdout=stdout)
    if args.command == "explain":
        return commands.explain_command(config, args.application, clusters=tuple(args.cluster), stdout=stdout)
    if args.command == "status":
        return commands.status_command(config, as_json=args.json, stdout=stdout)
    raise InvalidRequest(f"unknown command {args.command!r}")


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--since expects an ISO 8601 date or time, got {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


if __name__ == "__main__":
    sys.exit(main())
