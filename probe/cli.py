"""The `probe` command: ``run`` a batch, ``demo`` on local throwaway servers, ``serve`` HTTP.

Exit codes of ``probe run``: 0 every job succeeded, 1 some failed, 2 the input
was unusable (one line on stderr says why; never a traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import anyio

from probe.addresses import hosts_label
from probe.errors import RequestInvalid, language
from probe.models import BatchConnectionResponse, CheckJobResp, Endpoint, decode_body, parse_job
from probe.runner import Prober, ProbeSettings, uvloop_available


class InputError(Exception):
    """Raised when the command line or the input file cannot be used; exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError("must be a positive number")
        return value

    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("must be a port number from 1 to 65535")
    return int(text)


_RUN_EPILOG = """\
exit codes: 0 every job succeeded, 1 some failed, 2 the input or an option was unusable.
The probe settings also come from PROBE_TIMEOUT, PROBE_CONNECT_TIMEOUT, PROBE_CONCURRENCY,
PROBE_PER_HOST, PROBE_BATCH_TIMEOUT, PROBE_LANG, PROBE_VERIFY_HOSTNAME, PROBE_DENY_CIDR,
PROBE_ALLOW_CIDR and PROBE_ALLOW_PORTS; flags win."""
_SERVE_EPILOG = """\
Every option also comes from the environment (flags win): PROBE_HOST, PROBE_PORT,
PROBE_WORKERS, PROBE_MAX_JOBS, PROBE_MAX_BODY, PROBE_TOKENS_FILE, PROBE_INSECURE_NO_AUTH=1,
PROBE_TASKS_FILE, PROBE_TASK_PROVIDER, PROBE_DENY_CIDR, PROBE_ALLOW_CIDR, PROBE_ALLOW_PORTS,
and the probe settings (PROBE_TIMEOUT, PROBE_CONCURRENCY, ...)."""


def _version() -> str:
    try:
        return version("probe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def add_probe_options(parser: argparse.ArgumentParser) -> None:
    """The settings shared by `run`, `demo` and `serve` (names as in ProbeSettings)."""
    parser.add_argument("--timeout", type=_positive(float), metavar="S",
                        help="deadline for one endpoint, seconds (default 10)")
    parser.add_argument("--connect-timeout", type=_positive(float), metavar="S",
                        help="TCP connect timeout per address, seconds (default 5)")
    parser.add_argument("--concurrency", type=_positive(int), metavar="N",
                        help="probes in flight (default 256, capped by the fd limit)")
    parser.add_argument("--per-host", type=_positive(int), metavar="N",
                        help="probes in flight against one host (default 16)")
    parser.add_argument("--batch-timeout", type=_positive(float), metavar="S",
                        help="deadline for the whole batch, seconds (default none)")
    parser.add_argument("--lang", choices=("en-us", "zh-cn"),
                        help="language of every error_msg (default en-us)")
    parser.add_argument("--verify-hostname", action="store_true", default=None,
                        help="check the server certificate's host name too")
    parser.add_argument("--deny-cidr", action="append", default=[], metavar="CIDR",
                        help="never connect into this network (repeatable; adds to the "
                             "default denials: link-local/metadata, multicast, unspecified)")
    parser.add_argument("--allow-cidr", action="append", default=[], metavar="CIDR",
                        help="connect only into these networks (repeatable)")
    parser.add_argument("--allow-ports", metavar="LIST",
                        help="connect only to these ports, e.g. 3306,5432,8635")


def settings_from(args: argparse.Namespace) -> ProbeSettings:
    env = dict(os.environ)
    for flag, key in ((",".join(args.deny_cidr), "PROBE_DENY_CIDR"),
                      (",".join(args.allow_cidr), "PROBE_ALLOW_CIDR"),
                      (args.allow_ports, "PROBE_ALLOW_PORTS")):
        if flag:  # a policy flag replaces its variable
            env[key] = flag
    return ProbeSettings.from_env(
        env,
        deadline=args.timeout,
        connect_timeout=args.connect_timeout,
        concurrency=args.concurrency,
        per_host=args.per_host,
        batch_deadline=args.batch_timeout,
        language=language(args.lang) if args.lang else None,
        verify_hostname=args.verify_hostname,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probe", description="Test connectivity to database endpoints in batches."
    )
    parser.add_argument("--version", action="version", version=f"probe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="probe a batch-connection request (JSON file or -)",
                         description="Probe every job of a batch-connection request body and "
                                     "print one result per job, in request order.",
                         epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("file", help="request body {\"jobs\": [...]}, or - for stdin")
    run.add_argument("--format", choices=("json", "table"), default="json",
                     help="json: the contract's response body (default); table: for reading")
    run.add_argument("--detail", action="store_true", help="add timings, versions, TLS facts")
    run.add_argument("--strict", action="store_true",
                     help="reject the whole batch when any job is invalid")
    run.add_argument("--tasks-file", metavar="F",
                     help="JSON task states: apply the DRS task rules before probing")
    add_probe_options(run)

    demo = sub.add_parser("demo", help="start local throwaway servers and probe a mixed batch",
                          description="Start throwaway PostgreSQL, MariaDB, MongoDB-wire and "
                                      "fault servers on 127.0.0.1, probe a mixed batch against "
                                      "them and print the results.")
    demo.add_argument("--format", choices=("json", "table"), default="table",
                      help="table (default) or json")
    demo.add_argument("--keep", metavar="DIR", help="also write the demo batch to DIR/batch.json")
    add_probe_options(demo)

    serve = sub.add_parser("serve", help="serve POST /v3/{project_id}/jobs/batch-connection",
                           description="Serve the DRS batch-connection API over HTTP, with "
                                       "tokens, languages, task rules and Prometheus metrics.",
                           epilog=_SERVE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="port (default 8080)")
    serve.add_argument("--workers", type=_positive(int), default=None,
                       help="worker processes (default 1)")
    serve.add_argument("--max-jobs", type=_positive(int), default=None,
                       help="most jobs in one request (default 1000)")
    serve.add_argument("--max-body", type=_positive(int), default=None, metavar="BYTES",
                       help="largest request body (default 16 MiB)")
    serve.add_argument("--tokens-file", metavar="F",
                       help="JSON: token -> list of allowed project ids, or \"*\"")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="accept requests without X-Auth-Token (local use only)")
    serve.add_argument("--tasks-file", metavar="F", help="JSON task states for the DRS task rules")
    serve.add_argument("--task-provider", metavar="MODULE:FACTORY",
                       help="a custom TaskStateProvider factory")
    add_probe_options(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "demo":
            from probe.demo import command_demo

            return command_demo(args)
        from probe.service import command_serve

        return command_serve(args)
    except InputError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    except RequestInvalid as exc:
        lang = language(getattr(args, "lang", None) or os.environ.get("PROBE_LANG"))
        print(f"probe: {exc.code.value}: {exc.message(lang)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (| head): nothing left to say, and nobody to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130


def read_body(source: str) -> Any:
    """The request body of a file or stdin (-); RequestInvalid(DRS.M00200) when it is not one."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}") from None
    return decode_body(data)


def command_run(args: argparse.Namespace) -> int:
    body = read_body(args.file)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    task_states = None
    if args.tasks_file:
        from probe.tasks import JsonFileTaskStates

        try:
            task_states = JsonFileTaskStates(args.tasks_file)
        except (OSError, ValueError) as exc:
            raise InputError(f"tasks file {args.tasks_file}: {exc}") from None
    prober = Prober(settings, task_states=task_states)
    response = run_with_progress(prober, body, detail=args.detail, strict=args.strict)
    print_response(response, args.format, body)
    return 0 if all(r.success for r in response.results) else 1


def run_with_progress(
    prober: Prober, body: Any, *, detail: bool = False, strict: bool = False
) -> BatchConnectionResponse:
    """Run the batch; a progress bar on stderr when stderr is a terminal."""

    async def main() -> BatchConnectionResponse:
        if not sys.stderr.isatty():
            return await prober.run(body, detail=detail, strict=strict)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        jobs = body.get("jobs") if isinstance(body, dict) else None
        total = len(jobs) if isinstance(jobs, list) else None
        results: dict[int, CheckJobResp] = {}
        columns = ("probing", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("probe", total=total)
            async with prober.stream(body, detail=detail, strict=strict) as stream:
                async for index, result in stream:
                    results[index] = result
                    progress.advance(bar)
        ordered = [results[i] for i in range(len(results))]
        return BatchConnectionResponse(results=ordered, count=len(ordered))

    return anyio.run(main, backend_options={"use_uvloop": uvloop_available()})


def print_response(response: BatchConnectionResponse, fmt: str, body: Any) -> None:
    if fmt == "json":
        json.dump(response.to_json(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    jobs = body.get("jobs") if isinstance(body, dict) else None
    timed = any(r.elapsed_ms is not None for r in response.results)
    table = Table(show_lines=False)
    for column in ("#", "id", "db_type", "endpoint", "status", "code", *(["ms"] * timed),
                   "message"):
        table.add_column(column, overflow="fold")
    for index, result in enumerate(response.results):
        raw = jobs[index] if isinstance(jobs, list) and index < len(jobs) else None
        # An invalid job's fields are whatever was sent (a password in db_port...):
        # never shown. A valid job's have been checked, its defaults applied.
        job = parse_job(raw, index)
        db_type, endpoint = ((job.db_type, hosts_label(job.hosts()))
                             if isinstance(job, Endpoint) else ("", ""))
        status = Text("success", "green") if result.success else Text("failed", "red")
        elapsed = [f"{result.elapsed_ms:.0f}" if result.elapsed_ms is not None else ""] * timed
        table.add_row(str(index), Text(result.id), Text(db_type), Text(endpoint), status,
                      result.error_code or "", *elapsed, Text(result.error_msg or ""))
    # Piped or redirected, there is no terminal width to fit: use a readable one.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    failed = sum(not r.success for r in response.results)
    console.print(f"{response.count} jobs, {response.count - failed} succeeded, {failed} failed")


if __name__ == "__main__":
    sys.exit(main())
