"""PostgreSQL and MySQL checkers against real servers and fault servers: exact codes."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import asyncpg
import pytest

from probe import Prober, ProbeSettings
from probe.errors import ErrorCode
from probe.testing import mariadb as m
from probe.testing import postgres as p
from probe.testing.faults import Blackhole, FaultServer, RefusedPort
from probe.testing.mariadb import MariaDBServer
from probe.testing.postgres import PostgresServer
from tests.conftest import Faults, job
from tests.guard import Network, loopback_only

pytestmark = pytest.mark.anyio

FAST = ProbeSettings(deadline=3, connect_timeout=1)


async def probe_one(body: dict[str, Any], settings: ProbeSettings = FAST) -> dict[str, Any]:
    response = await Prober(settings).run({"jobs": [body]}, detail=True)
    assert response.count == 1
    return response.results[0].to_json()


def assert_code(result: dict[str, Any], code: ErrorCode | None) -> None:
    if code is None:
        assert result["status"] == "success", result
        assert result["success"] is True and "error_code" not in result
    else:
        assert result.get("error_code") == code.value, result
        assert result["success"] is False and result["status"] == "failed"


# ---------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize(
    ("user", "password", "database", "code"),
    [
        (p.SCRAM_USER.name, p.SCRAM_USER.password, "appdb", None),
        (p.UNICODE_USER.name, p.UNICODE_USER.password, "appdb", None),
        (p.MD5_USER.name, p.MD5_USER.password, "appdb", None),
        (p.SCRAM_USER.name, "wrong", "appdb", ErrorCode.AUTH_FAILED),
        ("nobody_here", "x", "appdb", ErrorCode.AUTH_FAILED),
        (p.SCRAM_USER.name, p.SCRAM_USER.password, "no_such_db", ErrorCode.DATABASE_NOT_FOUND),
        (p.NOLOGIN_USER.name, p.NOLOGIN_USER.password, "appdb", ErrorCode.ACCESS_DENIED),
        (p.NODB_USER.name, p.NODB_USER.password, "appdb", ErrorCode.ACCESS_DENIED),
    ],
)
async def test_postgresql_login_outcomes(
    pg: PostgresServer, user: str, password: str, database: str, code: ErrorCode | None
) -> None:
    result = await probe_one(job("postgresql", pg.port, user, password, db_name=database))
    assert_code(result, code)
    if code is None:
        assert result["server_version"].startswith(("15", "16", "17", "1"))
        assert result["address"] == f"127.0.0.1:{pg.port}"
        assert set(result["phases"]) >= {"resolve", "connect", "login", "query"}
    else:
        assert password not in result["error_msg"] or len(password) < 3


async def test_postgresql_too_many_connections_and_shutdown() -> None:
    user = p.SCRAM_USER
    with PostgresServer(users=[user], max_connections=4) as server:
        # Reserved superuser slots leave one ordinary slot: hold it, then probe.
        import asyncpg

        held = [await asyncpg.connect(host="127.0.0.1", port=server.port, user=user.name,
                                      password=user.password, database="appdb", ssl=False)]
        try:
            result = await probe_one(job("postgresql", server.port, user.name, user.password,
                                         db_name="appdb"))
            assert_code(result, ErrorCode.TOO_MANY_CONNECTIONS)
        finally:
            for conn in held:
                await conn.close()


async def test_mysql_too_many_connections() -> None:
    import aiomysql

    user = m.NATIVE_USER
    with MariaDBServer(users=[user], max_connections=10) as server:
        held = []
        try:
            # max_connections ordinary connections, then the next is refused
            # (MariaDB keeps one extra for SUPER, which these users lack).
            for _ in range(10):
                held.append(await aiomysql.connect(host="127.0.0.1", port=server.port,
                                                   user=user.name,
                                                   password=m.mysql_password(user.password)))
            result = await probe_one(job("mysql", server.port, user.name, user.password))
            assert_code(result, ErrorCode.TOO_MANY_CONNECTIONS)
        finally:
            for conn in held:
                conn.close()


async def test_an_unknown_role_under_trust_is_a_wrong_user_name() -> None:
    # With a password method PostgreSQL hides an unknown role (28P01, like a wrong
    # password); under trust it names it, with the SQLSTATE of a pg_hba rejection.
    with PostgresServer(users=[p.SCRAM_USER]) as server:
        hba = server.hba_path.read_text()
        server.run_as.write_file(server.hba_path, "host all all 127.0.0.1/32 trust\n" + hba)
        server.reload()
        unknown = await probe_one(job("postgresql", server.port, "nobody_here", "x"))
        assert_code(unknown, ErrorCode.AUTH_FAILED)
        assert "does not exist" in unknown["error_msg"]
        known = await probe_one(job("postgresql", server.port, p.SCRAM_USER.name, "any",
                                    db_name="appdb"))
        assert_code(known, None)  # trust: the rule really applies


async def test_a_frozen_postgresql_is_a_handshake_timeout() -> None:
    user = p.SCRAM_USER
    with PostgresServer(users=[user]) as server, server.frozen():
        # A stopped (SIGSTOP) server accepts TCP in the kernel and never answers.
        result = await probe_one(job("postgresql", server.port, user.name, user.password))
        assert_code(result, ErrorCode.HANDSHAKE_TIMEOUT)


async def test_a_postgresql_shutting_down_is_unavailable() -> None:
    # A smart shutdown (SIGTERM) waits for the sessions it has and refuses new
    # ones with 57P03 "the database system is shutting down".
    user = p.SCRAM_USER
    with PostgresServer(users=[user]) as server:
        held = await asyncpg.connect(host="127.0.0.1", port=server.port, user=user.name,
                                     password=user.password, database="appdb", ssl=False)
        try:
            assert server.pid is not None
            os.kill(server.pid, signal.SIGTERM)
            result = await probe_one(job("postgresql", server.port, user.name, user.password,
                                         db_name="appdb"))
            assert_code(result, ErrorCode.SERVER_UNAVAILABLE)
            assert "shutting down" in result["error_msg"]
        finally:
            await held.close()


# ---------------------------------------------------------------- MySQL


@pytest.mark.parametrize(
    ("user", "password", "database", "code"),
    [
        (m.NATIVE_USER.name, m.NATIVE_USER.password, None, None),
        (m.NATIVE_USER.name, m.NATIVE_USER.password, "appdb", None),
        (m.UNICODE_USER.name, m.UNICODE_USER.password, "appdb", None),
        (m.NATIVE_USER.name, "wrong", None, ErrorCode.AUTH_FAILED),
        ("nobody_here", "x", None, ErrorCode.AUTH_FAILED),
        # MySQL answers 1044 (access denied), not 1049, to a user without global
        # rights asking for a database that does not exist: it does not tell.
        (m.NATIVE_USER.name, m.NATIVE_USER.password, "no_such_db", ErrorCode.ACCESS_DENIED),
        (m.NOGRANT_USER.name, m.NOGRANT_USER.password, "appdb", ErrorCode.ACCESS_DENIED),
        (m.LOCKED_USER.name, m.LOCKED_USER.password, None, ErrorCode.ACCESS_DENIED),
    ],
)
@pytest.mark.parametrize("db_type", ["mysql", "taurus"])
async def test_mysql_login_outcomes(
    maria: MariaDBServer,
    db_type: str,
    user: str,
    password: str,
    database: str | None,
    code: ErrorCode | None,
) -> None:
    extra = {"db_name": database} if database else {}
    result = await probe_one(job(db_type, maria.port, user, password, **extra))
    assert_code(result, code)
    if code is None:
        assert "MariaDB" in result["server_version"]
        assert not result["server_version"].startswith("5.5.5-")


async def test_mysql_database_not_found_for_root_like_user(maria: MariaDBServer) -> None:
    result = await probe_one(job("mysql", maria.port, "root", maria.superuser_password,
                                 db_name="no_such_db"))
    assert_code(result, ErrorCode.DATABASE_NOT_FOUND)


# ---------------------------------------------------------------- network faults, both engines


@pytest.mark.parametrize("db_type", ["postgresql", "mysql"])
async def test_network_faults(faults: Faults, db_type: str) -> None:
    cases = [
        (faults.refused.port, ErrorCode.CONNECTION_REFUSED),
        (faults.blackhole.port, ErrorCode.CONNECT_TIMEOUT),
        (faults.silent.port, ErrorCode.HANDSHAKE_TIMEOUT),
        (faults.reset.port, ErrorCode.CONNECTION_RESET),
        (faults.garbage.port, ErrorCode.PROTOCOL_MISMATCH),
    ]
    if db_type == "mysql":
        cases.append((faults.greeting.port, ErrorCode.HANDSHAKE_TIMEOUT))
    body = {"jobs": [job(db_type, port, "u", "pw", id=f"j{i}") for i, (port, _) in
                     enumerate(cases)]}
    started = time.monotonic()
    response = await Prober(FAST).run(body)
    elapsed = time.monotonic() - started
    for result, (port, code) in zip(response.results, cases, strict=True):
        assert_code(result.to_json(), code)
        assert str(port) in (result.error_msg or "")
    assert elapsed < FAST.deadline + 2  # all at once, not one after another


async def test_blackhole_fails_close_to_the_connect_timeout(faults: Faults) -> None:
    settings = ProbeSettings(deadline=5, connect_timeout=1)
    started = time.monotonic()
    result = await probe_one(job("postgresql", faults.blackhole.port, "u", "p"), settings)
    elapsed = time.monotonic() - started
    assert_code(result, ErrorCode.CONNECT_TIMEOUT)
    assert 0.9 <= elapsed < 3


async def test_wrong_engine_on_the_port(pg: PostgresServer, maria: MariaDBServer) -> None:
    to_pg = await probe_one(job("mysql", pg.port, "u", "p"))
    assert_code(to_pg, ErrorCode.PROTOCOL_MISMATCH)
    assert "PostgreSQL" in to_pg["error_msg"]
    to_maria = await probe_one(job("postgresql", maria.port, "u", "p"))
    assert_code(to_maria, ErrorCode.PROTOCOL_MISMATCH)
    assert "MySQL" in to_maria["error_msg"]


async def test_dns_failure_and_name_resolution(net: Network) -> None:
    result = await probe_one({**job("mysql", 3306, "u", "p"), "ip": "no-such-host.invalid"})
    assert_code(result, ErrorCode.DNS_FAILURE)


@pytest.mark.parametrize(("db_type", "port"), [("postgresql", 5432), ("mysql", 3306),
                                              ("mongodb", 0)])
async def test_no_route_to_the_network_is_unreachable(db_type: str, port: int) -> None:
    # No route means the kernel refuses the connect with ENETUNREACH before any
    # packet. Reaching that state here would mean a route-less non-loopback
    # address, so the tests' guard answers the connect to a TEST-NET-1 address
    # with that errno, as the kernel would, and nothing is sent.
    ip = "192.0.2.10" if port else "192.0.2.10:27017"
    async with loopback_only() as guard:
        result = await probe_one({**job(db_type, port or 27017, "u", "p"), "ip": ip})
    assert_code(result, ErrorCode.NETWORK_UNREACHABLE)
    assert "192.0.2.10" in result["error_msg"]
    assert guard.blocked and not guard.connects


async def test_localhost_name_tries_each_address(pg: PostgresServer) -> None:
    # "localhost" resolves to ::1 and 127.0.0.1 here; the server listens on
    # 127.0.0.1 only, so a refused ::1 must not end the probe.
    body = {**job("postgresql", pg.port, p.SCRAM_USER.name, p.SCRAM_USER.password),
            "ip": "localhost", "db_name": "appdb"}
    result = await probe_one(body)
    assert_code(result, None)
    assert result["address"] == f"127.0.0.1:{pg.port}"


async def test_server_killed_means_refused() -> None:
    user = m.NATIVE_USER
    with MariaDBServer(users=[user]) as server:
        port = server.port
        ok = await probe_one(job("mysql", port, user.name, user.password))
        assert_code(ok, None)
        server.kill()
        dead = await probe_one(job("mysql", port, user.name, user.password))
        assert_code(dead, ErrorCode.CONNECTION_REFUSED)


async def test_refused_port_helpers_are_what_they_claim() -> None:
    with RefusedPort() as refused, Blackhole() as blackhole, FaultServer("silent") as silent:
        assert len({refused.port, blackhole.port, silent.port}) == 3
