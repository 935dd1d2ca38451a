"""The `probe` command: ``run`` a batch, ``demo`` on local throwaway servers, ``serve`` HTTP.

Exit codes of ``probe run``: 0 every job succeeded, 1 some failed, 2 the input
was unusable (one line on stderr says why; never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio

from probe.errors import ErrorCode, RequestInvalid, language
from probe.models import BatchConnectionResponse, CheckJobResp
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
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


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
    parser.add_argument("--lang", choices=("en-us", "zh-cn"), help="message language")
    parser.add_argument("--verify-hostname", action="store_true", default=None,
                        help="check the server certificate's host name too")


def settings_from(args: argparse.Namespace) -> ProbeSettings:
    return ProbeSettings.from_env(
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="probe a batch-connection request (JSON file or -)")
    run.add_argument("file", help="request body {\"jobs\": [...]}, or - for stdin")
    run.add_argument("--format", choices=("json", "table"), default="json")
    run.add_argument("--detail", action="store_true", help="add timings, versions, TLS facts")
    run.add_argument("--strict", action="store_true",
                     help="reject the whole batch when any job is invalid")
    run.add_argument("--tasks-file", metavar="F",
                     help="JSON task states: apply the DRS task rules before probing")
    add_probe_options(run)

    demo = sub.add_parser("demo", help="start local throwaway servers and probe a mixed batch")
    demo.add_argument("--format", choices=("json", "table"), default="table")
    demo.add_argument("--keep", metavar="DIR", help="also write the demo batch to DIR/batch.json")
    add_probe_options(demo)

    serve = sub.add_parser("serve", help="serve POST /v3/{project_id}/jobs/batch-connection")
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=_positive(int), default=None, help="port (default 8080)")
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
    serve.add_argument("--deny-cidr", action="append", default=[], metavar="CIDR",
                       help="never connect into this network (repeatable)")
    serve.add_argument("--allow-cidr", action="append", default=[], metavar="CIDR",
                       help="connect only into these networks (repeatable)")
    serve.add_argument("--allow-ports", metavar="LIST",
                       help="connect only to these ports, e.g. 3306,5432,8635")
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
        print(f"probe: {exc.code.value}: {exc.message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130


def read_body(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{source} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{ErrorCode.MALFORMED_BODY.value}: {source} is not valid JSON "
            f"(line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise InputError(
            f"{ErrorCode.MALFORMED_BODY.value}: {source} is nested too deeply"
        ) from None


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
    table = Table(show_lines=False)
    for column in ("#", "id", "db_type", "endpoint", "status", "code", "ms", "message"):
        table.add_column(column, overflow="fold")
    for index, result in enumerate(response.results):
        job = jobs[index] if isinstance(jobs, list) and index < len(jobs) else {}
        invalid = (result.error_code or "").startswith("DRS.M")
        # An invalid job's fields are whatever was sent (a password in db_port...):
        # never shown. A valid job's have been checked.
        job = job if isinstance(job, dict) and not invalid else {}
        endpoint = str(job.get("ip", ""))
        if job.get("db_port"):
            endpoint += f" :{job['db_port']}"
        status = Text("success", "green") if result.success else Text("failed", "red")
        elapsed = f"{result.elapsed_ms:.0f}" if result.elapsed_ms is not None else ""
        table.add_row(str(index), Text(result.id), Text(str(job.get("db_type", ""))),
                      Text(endpoint), status, result.error_code or "", elapsed,
                      Text(result.error_msg or ""))
    # Piped or redirected, there is no terminal width to fit: use a readable one.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    failed = sum(not r.success for r in response.results)
    console.print(f"{response.count} jobs, {response.count - failed} succeeded, {failed} failed")


if __name__ == "__main__":
    sys.exit(main())
