"""The fleet of servers one benchmark run measures against, all on 127.0.0.1.

- PostgreSQL (`probe.testing.postgres`), with `users` SCRAM-SHA-256 login roles
  ``bench_00000`` ... sharing one password (one SCRAM verifier computed here);
- MariaDB (`probe.testing.mariadb`), with as many ``mysql_native_password`` accounts;
- the MongoDB wire server, in its own process, with as many SCRAM-SHA-256 users;
- `silent` silent fault servers (one per dead-endpoint measurement, in one
  process), `blackholes` blackhole listeners and `refused` refused ports.

Distinct users matter: the engine runs identical jobs of one batch once
(dedupe), so a batch of 2,000 probes needs 2,000 distinct endpoints. The
references cycle through the same users, so the servers do the same work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serve import user_name
from probe.testing.faults import Blackhole, RefusedPort
from probe.testing.mariadb import MariaDBServer, native_password_hash, quote_string
from probe.testing.postgres import PostgresServer, quote_literal

PASSWORD = "bench-Pw-1"  # a test password of throwaway servers
HOST = "127.0.0.1"


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for `password` (what CREATE ROLE ... PASSWORD computes)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass
class Endpoints:
    """What a worker process needs to reach the fleet (JSON-serializable)."""

    host: str = HOST
    password: str = PASSWORD
    users: int = 0  # bench users on PostgreSQL and MariaDB
    mongo_users: int = 0  # on the MongoDB wire server (SCRAM keys are slow to make)
    postgresql: int = 0
    mysql: int = 0
    mongodb: int = 0
    silent: list[int] = field(default_factory=list)
    blackholes: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Fleet:
    """Starts and stops every server of a run (context manager)."""

    def __init__(
        self, *, users: int, mongo_users: int, silent: int, blackholes: int, refused: int
    ) -> None:
        self.users = users
        self.mongo_users = mongo_users
        self.counts = (silent, blackholes, refused)
        self.pg: PostgresServer | None = None
        self.maria: MariaDBServer | None = None
        self._procs: list[subprocess.Popen[str]] = []
        self._sockets: list[Blackhole | RefusedPort] = []
        self.endpoints = Endpoints(users=users, mongo_users=mongo_users)
        self.startup_s = 0.0

    def __enter__(self) -> Fleet:
        t0 = time.perf_counter()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        silent, blackholes, refused = self.counts
        ep = self.endpoints
        # The Python servers start first: the Mongo users' SCRAM keys take a while.
        mongo = self._spawn(["mongo", "--users", str(self.mongo_users), "--password", PASSWORD])
        silent_proc = self._spawn(["silent", "--count", str(silent)]) if silent else None
        self.pg = PostgresServer(max_connections=400, users=())
        self.maria = MariaDBServer(max_connections=600, max_connect_errors=1_000_000)
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(self.pg.start), pool.submit(self.maria.start)]:
                future.result()
        self._add_pg_users()
        self._add_maria_users()
        ep.postgresql, ep.mysql = self.pg.port, self.maria.port
        ep.mongodb = int(self._ready(mongo))
        if silent_proc is not None:
            ep.silent = [int(p) for p in self._ready(silent_proc).split(",")]
        for _ in range(blackholes):
            hole = Blackhole()
            self._sockets.append(hole)
            ep.blackholes.append(hole.port)
        for _ in range(refused):
            port = RefusedPort()
            self._sockets.append(port)
            ep.refused.append(port.port)
        ep.versions = {
            "postgresql": self.pg.sql("SHOW server_version"),
            "mariadb": self.maria.sql("SELECT VERSION()"),
        }

    def _spawn(self, args: list[str]) -> subprocess.Popen[str]:
        root = Path(__file__).resolve().parent.parent
        path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": path},
        )
        self._procs.append(proc)
        return proc

    @staticmethod
    def _ready(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"a benchmark server failed to start: {line!r}")
        return line.removeprefix("READY ")

    def _add_pg_users(self) -> None:
        assert self.pg is not None
        verifier = scram_sha256_verifier(PASSWORD)
        self.pg.sql(
            "CREATE ROLE bench_login NOLOGIN;"
            "GRANT CONNECT ON DATABASE postgres TO bench_login;"
            "DO $$ BEGIN FOR i IN 0.." + str(self.users - 1) + " LOOP "
            "EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L IN ROLE bench_login', "
            "'bench_' || lpad(i::text, 5, '0'), " + quote_literal(verifier) + "); "
            "END LOOP; END $$;"
        )

    def _add_maria_users(self) -> None:
        assert self.maria is not None
        digest = native_password_hash(PASSWORD)
        statements = [
            f"CREATE USER {quote_string(user_name(i))}@'127.0.0.1' "
            f"IDENTIFIED VIA mysql_native_password USING '{digest}'"
            for i in range(self.users)
        ]
        for start in range(0, len(statements), 500):  # argv strings are limited to 128 KiB
            self.maria.sql(";\n".join(statements[start : start + 500]))

    def stop(self) -> None:
        for proc in self._procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # the server's cue to stop
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
                proc.wait()
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()
        self._procs.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for server in (self.maria, self.pg):
            if server is not None:
                server.stop()
