"""Shared fixtures: real servers started once per session, on loopback only.

- `pg`: PostgreSQL (probe.testing.postgres defaults: SCRAM, md5, NOLOGIN, no-CONNECT users)
- `maria`: MariaDB (native-password users with special and non-ASCII passwords, ...)
- `mongo`: the project's MongoDB wire-protocol server, run on its own thread
- `faults`: refused port, blackhole, silent, greeting-then-silence, garbage, reset
- `job()`: a valid job dict for one of them
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from probe.testing import mariadb as mariadb_mod
from probe.testing import postgres as postgres_mod
from probe.testing.faults import (
    Blackhole,
    FaultServer,
    RefusedPort,
    mysql_greeting,
)
from probe.testing.mariadb import MariaDBServer
from probe.testing.mongo_wire import MongoUser, MongoWireServer
from probe.testing.postgres import PostgresServer
from tests.guard import Network, loopback_only

MONGO_USERS = (
    MongoUser("probe_root", "p@ss:w/rd%41? 'single' \"double\"", "admin"),
    MongoUser("probe_unicode", "pässwörd пароль", "admin"),
    MongoUser("probe_reports", "reports p@ss", "reports"),
    MongoUser("probe_sha1", "sha1 p@ss", "admin", mechanisms=("SCRAM-SHA-1",)),
)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Every async test runs on uvloop (what the CLI and service use) and on plain asyncio."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    """Guard the test's loop: loopback connects only, names answered by the test."""
    async with loopback_only() as network:
        yield network
    assert not network.blocked, network.blocked


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def maria() -> Iterator[MariaDBServer]:
    with MariaDBServer() as server:
        yield server


@pytest.fixture(scope="session")
def mongo() -> Iterator[MongoWireServer]:
    with MongoWireServer(users=MONGO_USERS).run_in_thread() as server:
        yield server


@dataclass
class Faults:
    refused: RefusedPort
    blackhole: Blackhole
    silent: FaultServer
    greeting: FaultServer
    garbage: FaultServer
    reset: FaultServer


@pytest.fixture(scope="session")
def faults() -> Iterator[Faults]:
    with (
        RefusedPort() as refused,
        Blackhole() as blackhole,
        FaultServer("silent") as silent,
        FaultServer("greeting", mysql_greeting()) as greeting,
        FaultServer("garbage") as garbage,
        FaultServer("reset") as reset,
    ):
        yield Faults(refused, blackhole, silent, greeting, garbage, reset)


def job(db_type: str, port: int | str, user: str, password: str, **extra: Any) -> dict[str, Any]:
    """A valid job; for mongodb, `port` may be a whole host list."""
    body: dict[str, Any] = {
        "id": extra.pop("id", "job-1"),
        "net_type": "eip",
        "db_type": db_type,
        "db_user": user,
        "db_password": password,
    }
    if db_type == "mongodb":
        body["ip"] = port if isinstance(port, str) else f"127.0.0.1:{port}"
        body["db_port"] = 0
    else:
        body["ip"] = "127.0.0.1"
        body["db_port"] = port
    body.update(extra)
    return body


PG_USER = postgres_mod.SCRAM_USER
MARIA_USER = mariadb_mod.NATIVE_USER
MONGO_USER = MONGO_USERS[0]

# Nothing here may reach beyond loopback.
os.environ.setdefault("NO_PROXY", "*")


async def settle(condition: Any, timeout: float = 5.0) -> bool:
    """Wait (collecting garbage) until `condition()` holds; whether it did."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
