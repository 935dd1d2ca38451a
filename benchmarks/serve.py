"""Servers the harness runs in their own processes: ``python -m benchmarks.serve KIND ...``.

The MongoDB wire server and the silent fault servers are Python; run on a
thread of the measuring process they would share its GIL and its CPU
accounting. Here each runs in a process of its own, prints one line
``READY port[,port...]`` on stdout, and serves until its stdin closes
(the harness exits or dies) or it gets SIGTERM.

- ``mongo --users N --password PW``: a `MongoWireServer` with users
  ``bench_00000`` ... (SCRAM-SHA-256, mongod's 15,000 iterations), on uvloop
  when installed;
- ``silent --count K``: K `FaultServer("silent")` listeners (accept, never speak).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import sys
import threading


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def user_name(index: int) -> str:
    return f"bench_{index:05d}"


def _wait_for_stdin_close() -> None:
    done = threading.Event()

    def watch() -> None:
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(1):
                pass
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()


def serve_mongo(users: int, password: str) -> None:
    from probe.testing.mongo_wire import MongoUser, MongoWireServer

    accounts = [
        MongoUser(user_name(i), password, "admin", mechanisms=("SCRAM-SHA-256",))
        for i in range(users)
    ]
    server = MongoWireServer(users=accounts, backlog=4096)
    loop_factory = asyncio.new_event_loop
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    loop = loop_factory()
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    print(f"READY {server.port}", flush=True)
    _wait_for_stdin_close()
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def serve_silent(count: int) -> None:
    from probe.testing.faults import FaultServer

    # FaultServer makes its loop with asyncio.new_event_loop(): uvloop's, when installed,
    # so that accepting 1,000 connections at once costs the shared cores less.
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    servers = [FaultServer("silent").start() for _ in range(count)]
    print("READY " + ",".join(str(s.port) for s in servers), flush=True)
    _wait_for_stdin_close()
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve")
    sub = parser.add_subparsers(dest="kind", required=True)
    mongo = sub.add_parser("mongo")
    mongo.add_argument("--users", type=int, required=True)
    mongo.add_argument("--password", required=True)
    silent = sub.add_parser("silent")
    silent.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.kind == "mongo":
        serve_mongo(args.users, args.password)
    else:
        serve_silent(args.count)


if __name__ == "__main__":
    main()
