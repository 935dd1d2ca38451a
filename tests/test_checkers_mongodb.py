"""The MongoDB/DDS checker with the unmodified PyMongo driver: against the project's
wire-protocol server always, and against a real mongod when PROBE_TEST_MONGODB_URI
(host list, e.g. 127.0.0.1:27017), PROBE_TEST_MONGODB_USER and
PROBE_TEST_MONGODB_PASSWORD are set."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from probe import Prober, ProbeSettings
from probe.checkers import mongodb
from probe.errors import ErrorCode
from probe.testing.faults import RefusedPort
from probe.testing.mariadb import MariaDBServer
from probe.testing.mongo_wire import MongoReplicaSet, MongoWireServer
from tests.conftest import MONGO_USERS, Faults, job, settle
from tests.guard import Network

pytestmark = pytest.mark.anyio
FAST = ProbeSettings(deadline=3, connect_timeout=1)


@dataclass(frozen=True)
class MongoTarget:
    hosts: str
    user: str
    password: str
    auth_db: str = "admin"


@pytest.fixture(params=["wire", "mongod"])
def target(request: pytest.FixtureRequest, mongo: MongoWireServer) -> Iterator[MongoTarget]:
    if request.param == "wire":
        user = MONGO_USERS[0]
        yield MongoTarget(mongo.address, user.name, user.password)
        return
    uri = os.environ.get("PROBE_TEST_MONGODB_URI")
    if not uri:
        pytest.skip("no real mongod: set PROBE_TEST_MONGODB_URI, _USER and _PASSWORD")
    yield MongoTarget(uri, os.environ.get("PROBE_TEST_MONGODB_USER", ""),
                      os.environ.get("PROBE_TEST_MONGODB_PASSWORD", ""),
                      os.environ.get("PROBE_TEST_MONGODB_AUTH_DB", "admin"))


async def probe_one(body: dict[str, Any], settings: ProbeSettings = FAST) -> dict[str, Any]:
    response = await Prober(settings).run({"jobs": [body]}, detail=True)
    return response.results[0].to_json()


def code_of(result: dict[str, Any]) -> str | None:
    return result.get("error_code")


async def test_success_reports_version(target: MongoTarget) -> None:
    result = await probe_one(job("mongodb", target.hosts, target.user, target.password,
                                 db_name=target.auth_db))
    assert result["success"] is True, result
    assert result["server_version"]
    assert set(result["phases"]) >= {"resolve", "login", "query"}


async def test_wrong_password(target: MongoTarget) -> None:
    result = await probe_one(job("mongodb", target.hosts, target.user, target.password + "x",
                                 db_name=target.auth_db))
    assert code_of(result) == ErrorCode.AUTH_FAILED.value
    assert target.password not in result["error_msg"]


@pytest.mark.parametrize("user", MONGO_USERS, ids=lambda u: u.name)
async def test_each_mechanism_auth_db_and_password(mongo: MongoWireServer, user: Any) -> None:
    # SCRAM-SHA-256 (negotiated), SCRAM-SHA-1 (a SHA-1-only user), authSource
    # other than admin, special characters and non-ASCII passwords.
    result = await probe_one(job("mongodb", mongo.address, user.name, user.password,
                                 db_name=user.db))
    assert result["success"] is True, result


async def test_auth_source_must_match(mongo: MongoWireServer) -> None:
    user = MONGO_USERS[2]  # lives in "reports"
    result = await probe_one(job("mongodb", mongo.address, user.name, user.password))
    assert code_of(result) == ErrorCode.AUTH_FAILED.value


async def test_network_faults(faults: Faults) -> None:
    for port, code in (
        (faults.refused.port, ErrorCode.CONNECTION_REFUSED),
        (faults.blackhole.port, ErrorCode.CONNECT_TIMEOUT),
        (faults.silent.port, ErrorCode.HANDSHAKE_TIMEOUT),
        (faults.garbage.port, ErrorCode.PROTOCOL_MISMATCH),
    ):
        result = await probe_one(job("mongodb", port, "u", "p"))
        assert code_of(result) == code.value, (port, result)


async def test_dns_failure(net: Network) -> None:
    result = await probe_one(job("mongodb", "no-such-host.invalid:27017", "u", "p"))
    assert code_of(result) == ErrorCode.DNS_FAILURE.value


@pytest.mark.parametrize("fault", ["silent", "mysql"])
async def test_a_two_second_deadline_holds(fault: str, faults: Faults) -> None:
    async def run(port: int) -> dict[str, Any]:
        return await probe_one(job("mongodb", port, "u", "p"), ProbeSettings(deadline=2))

    started = time.monotonic()
    if fault == "silent":
        result = await run(faults.silent.port)
        expected = ErrorCode.HANDSHAKE_TIMEOUT
    else:
        with MariaDBServer(users=()) as server:
            started = time.monotonic()
            result = await run(server.port)
        expected = ErrorCode.PROTOCOL_MISMATCH
    assert time.monotonic() - started < 3
    assert code_of(result) == expected.value, result


async def test_postgresql_port_is_not_mongodb(pg: Any) -> None:
    # PostgreSQL hangs up on a MongoDB hello without a word, as a TLS-only server
    # does; asked in TLS, it hangs up again: not MongoDB, and not TLS either.
    result = await probe_one(job("mongodb", pg.port, "u", "p"))
    assert code_of(result) == ErrorCode.PROTOCOL_MISMATCH.value
    assert "does not speak TLS" in result["error_msg"], result


async def test_replica_set_discovery_and_members() -> None:
    user = MONGO_USERS[0]
    async with MongoReplicaSet(3, users=[user]) as rs:
        result = await probe_one(job("mongodb", rs.seed_list, user.name, user.password))
        assert result["success"] is True, result
        members = [m.address for m in rs.members]
        assert result["replica_set"]["name"] == "rs0"
        assert sorted(result["replica_set"]["members"]) == sorted(members)
        assert sorted(result["replica_set"]["answered"]) == sorted(members)


async def test_mixed_reachable_and_unreachable_hosts() -> None:
    user = MONGO_USERS[0]
    async with MongoReplicaSet(3, users=[user]) as rs:
        with RefusedPort() as refused:
            hosts = f"127.0.0.1:{refused.port},{rs.members[1].address}"
            result = await probe_one(job("mongodb", hosts, user.name, user.password))
        assert result["success"] is True, result


async def test_advertised_members_that_do_not_resolve() -> None:
    user = MONGO_USERS[0]
    async with MongoReplicaSet(3, users=[user], unresolvable_names=True) as rs:
        started = time.monotonic()
        result = await probe_one(job("mongodb", rs.seed_list, user.name, user.password))
        assert time.monotonic() - started < FAST.deadline + 0.5
    assert code_of(result) == ErrorCode.NO_REACHABLE_MEMBER.value, result
    assert "advertised members" in result["error_msg"]
    assert ErrorCode.DNS_FAILURE.value in result["error_msg"]


async def test_no_listed_host_answers(faults: Faults) -> None:
    hosts = f"127.0.0.1:{faults.refused.port},127.0.0.1:{faults.silent.port}"
    result = await probe_one(job("mongodb", hosts, "u", "p"))
    assert code_of(result) == ErrorCode.NO_REACHABLE_MEMBER.value
    # each member named with what it answered, in words and by code
    assert (f"127.0.0.1:{faults.refused.port}: connection refused "
            f"({ErrorCode.CONNECTION_REFUSED.value})") in result["error_msg"]


async def test_ipv6_members_are_named_as_written(faults: Faults) -> None:
    with socket.socket(socket.AF_INET6) as refused6:  # bound, never listening
        try:
            refused6.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        port6 = refused6.getsockname()[1]
        hosts = f"127.0.0.1:{faults.refused.port},[::1]:{port6}"
        result = await probe_one(job("mongodb", hosts, "u", "p"))
    assert code_of(result) == ErrorCode.NO_REACHABLE_MEMBER.value
    message = result["error_msg"]
    # both were listed (none advertised), each named as the user wrote it
    assert f"[::1]:{port6}: connection refused" in message and "advertised" not in message, message


async def test_a_streaming_server_gets_two_connections_per_probe() -> None:
    # A server that sends topologyVersion (mongod 4.4+) would get a streaming
    # monitor and a third, RTT-monitor connection, unless the checker polls.
    user = MONGO_USERS[0]
    async with MongoWireServer(users=[user], topology_version=True) as server:
        results = [await probe_one(job("mongodb", server.address, user.name, user.password))
                   for _ in range(5)]
        assert all(r["success"] for r in results), results
        assert sum(server.commands[n] for n in ("hello", "isMaster", "ismaster")) >= 5
        assert server.awaitable_hellos == 0
        assert server.connections_total <= 2 * 5


async def test_a_server_shutting_down_is_unavailable_not_a_reset() -> None:
    # PyMongo raises "not primary"/shutdown answers as NotPrimaryError, a lost connection
    user = MONGO_USERS[0]
    async with MongoWireServer(users=[user], fault="shutting_down") as server:
        result = await probe_one(job("mongodb", server.address, user.name, user.password))
    assert code_of(result) == ErrorCode.SERVER_UNAVAILABLE.value, result


async def test_a_host_list_where_every_member_failed_answers_at_once() -> None:
    # No member can answer: waiting for the deadline (3 s here) would tell nothing more.
    with RefusedPort() as a, RefusedPort() as b, RefusedPort() as c:
        started = time.monotonic()
        result = await probe_one(job("mongodb", f"127.0.0.1:{a.port},127.0.0.1:{b.port},"
                                                f"127.0.0.1:{c.port}", "u", "p"))
        assert time.monotonic() - started < FAST.deadline / 2
    assert code_of(result) == ErrorCode.NO_REACHABLE_MEMBER.value
    assert result["error_msg"].count(ErrorCode.CONNECTION_REFUSED.value) == 3


async def test_300_probes_leave_no_socket_or_task(mongo: MongoWireServer, faults: Faults) -> None:
    user = MONGO_USERS[0]
    jobs = []
    for i in range(300):
        if i % 3 == 0:
            jobs.append(job("mongodb", mongo.address, user.name,
                            user.password if i % 2 == 0 else "wrong",
                            id=f"m{i}"))
        elif i % 3 == 1:
            jobs.append(job("mongodb", faults.refused.port, "u", f"p{i}", id=f"m{i}"))
        else:
            jobs.append(job("mongodb", faults.silent.port, "u", f"p{i}", id=f"m{i}"))
    prober = Prober(ProbeSettings(deadline=1.5, connect_timeout=1))
    await prober.run({"jobs": jobs[:3]})  # warm up: the loop's own lazy fds (uvloop)
    await settle(lambda: not mongodb._closing)  # the warm-up's closes may still run
    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = len(asyncio.all_tasks())
    response = await prober.run({"jobs": jobs})
    assert response.count == 300
    assert sum(r.success for r in response.results) == 50
    # A close may outlive its probe by up to _CLOSE_WAIT (then it ends by itself).
    assert await settle(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, timeout=15)
    assert await settle(lambda: len(asyncio.all_tasks()) <= tasks_before, timeout=15)


def test_tls_facts_come_from_the_member_that_answered() -> None:
    from probe.checkers.mongodb import _ssl_object

    a, b = object(), object()
    peers = {("127.0.0.1", 1001): a, ("127.0.0.1", 1002): b}
    assert _ssl_object(peers, ("127.0.0.1", 1002)) is b
    assert _ssl_object(peers, ("localhost", 1001)) is a  # a name: matched by port
    assert _ssl_object(peers, ("localhost", 1003)) is None  # unknown: no guess
    assert _ssl_object({("::1", 1001): a}, ("localhost", 1003)) is a  # one address only
    assert _ssl_object(peers, None) is None


async def test_a_slow_close_is_waited_for_a_while_then_left_to_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stand-in client: no server makes PyMongo's close() outlast a wait on
    # demand (on a loop busy with hundreds of clients it takes seconds).

    monkeypatch.setattr(mongodb, "_CLOSE_WAIT", 0.05)
    ended = anyio.Event()

    class SlowClose:
        async def close(self) -> None:
            await anyio.sleep(2.0)  # neither cancelled nor cut short
            ended.set()

    started = time.monotonic()
    with anyio.CancelScope() as scope:
        scope.cancel()  # the probe is being cancelled: the close still runs
        await mongodb._close(SlowClose())  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0  # waited _CLOSE_WAIT (0.05 s), not the close (2 s)
    assert not ended.is_set() and len(mongodb._closing) == 1
    with anyio.fail_after(5):
        await ended.wait()
    await anyio.sleep(0)
    assert not mongodb._closing


async def test_a_close_that_never_ends_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in client whose close() never returns (PyMongo's, with its topology
    # lock leaked): cancelled once and let go, so the collector can free it.

    monkeypatch.setattr(mongodb, "_CLOSE_WAIT", 0.05)
    monkeypatch.setattr(mongodb, "_CLOSE_GIVE_UP", 0.1)
    cancelled = anyio.Event()

    class NeverCloses:
        async def close(self) -> None:
            try:
                await anyio.sleep(3600)
            finally:
                cancelled.set()

    await mongodb._close(NeverCloses())  # type: ignore[arg-type]
    assert len(mongodb._closing) == 1
    with anyio.fail_after(5):
        await cancelled.wait()
    assert not mongodb._closing
