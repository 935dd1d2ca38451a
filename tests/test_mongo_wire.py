"""The MongoDB wire-protocol test server against the unmodified PyMongo driver."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import bson
import pymongo
import pytest
import trustme
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

from probe.testing.mongo_wire import (
    MongoReplicaSet,
    MongoUser,
    MongoWireServer,
    _FrameError,
    _parse_op_msg,
    close_leaked_client_sockets,
    crc32c,
    wire_version_for,
)

QUOTED_PASSWORD = 'p@ss:w/rd%41 "quoted"'
USERS = (
    MongoUser("admin", "s3cret-admin"),
    MongoUser("sha1only", "sha1-pass", mechanisms=("SCRAM-SHA-1",)),
    MongoUser("sha256only", "sha256-pass", mechanisms=("SCRAM-SHA-256",)),
    MongoUser("reporter", "rep-pass", db="reports"),
    MongoUser("quoted", QUOTED_PASSWORD),
    MongoUser("umlaut", "pässwörd"),
    MongoUser("cyrillic", "пароль"),
    MongoUser("we,ird=name", "odd-name-pass"),
)
FAST = {"serverSelectionTimeoutMS": 1500, "connectTimeoutMS": 1000, "socketTimeoutMS": 2000}


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Async tests run on plain asyncio and on uvloop (what the CLI and the service use)."""
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


@asynccontextmanager
async def async_client(host: str, **kwargs: Any) -> AsyncIterator[AsyncMongoClient[Any]]:
    options: dict[str, Any] = {**FAST, **kwargs}
    if "," not in host:
        options.setdefault("directConnection", True)
    client: AsyncMongoClient[Any] = AsyncMongoClient(host, **options)
    try:
        yield client
    finally:
        known = [f"{h}:{p}" for h, p in client.topology_description.server_descriptions()]
        await client.close()
        # PyMongo leaks the socket of a connect cancelled by close(): see the helper's doc.
        close_leaked_client_sockets(host, *known)


def sync_client(host: str, **kwargs: Any) -> MongoClient[Any]:
    options: dict[str, Any] = {**FAST, **kwargs}
    if "," not in host:
        options.setdefault("directConnection", True)
    return MongoClient(host, **options)


# --------------------------------------------------------------------------- authentication


@pytest.mark.anyio
async def test_scram_sha256_ping_and_build_info() -> None:
    async with (
        MongoWireServer(users=USERS, version="7.0.12-probe-wire") as server,
        async_client(
            server.address,
            username="admin",
            password="s3cret-admin",
            authMechanism="SCRAM-SHA-256",
        ) as client,
    ):
        assert await client.admin.command("ping") == {"ok": 1.0}
        info = await client.admin.command("buildInfo")
        assert info["version"] == "7.0.12-probe-wire"
        assert info["versionArray"] == [7, 0, 12, 0]
        status = await client.admin.command("connectionStatus")
        assert status["authInfo"]["authenticatedUsers"] == [{"user": "admin", "db": "admin"}]
        assert server.auth_mechanisms == {"SCRAM-SHA-256": 1}
        assert server.auth_failures == 0
        assert server.errors == []


@pytest.mark.anyio
async def test_default_mechanism_uses_speculative_sha256() -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(server.address, username="admin", password="s3cret-admin") as client,
    ):
        await client.admin.command("ping")
        assert server.auth_mechanisms == {"SCRAM-SHA-256": 1}
        # the first SCRAM step rode in the handshake's hello: no separate saslStart
        assert server.commands["saslStart"] == 0
        assert server.commands["saslContinue"] == 1


@pytest.mark.anyio
async def test_scram_sha1_forced() -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(
            server.address, username="admin", password="s3cret-admin", authMechanism="SCRAM-SHA-1"
        ) as client,
    ):
        await client.admin.command("ping")
        assert server.auth_mechanisms == {"SCRAM-SHA-1": 1}


@pytest.mark.anyio
async def test_sha1_only_user_negotiated_by_default() -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(server.address, username="sha1only", password="sha1-pass") as client,
    ):
        await client.admin.command("ping")
        # speculative SCRAM-SHA-256 is silently refused, saslSupportedMechs picks SHA-1
        assert server.auth_mechanisms == {"SCRAM-SHA-1": 1}
        assert server.commands["saslStart"] == 1
        assert server.auth_failures == 0


@pytest.mark.anyio
async def test_sha256_only_user_refuses_sha1() -> None:
    async with MongoWireServer(users=USERS) as server:
        async with async_client(
            server.address, username="sha256only", password="sha256-pass"
        ) as client:
            await client.admin.command("ping")
        async with async_client(
            server.address,
            username="sha256only",
            password="sha256-pass",
            authMechanism="SCRAM-SHA-1",
        ) as client:
            with pytest.raises(OperationFailure) as info:
                await client.admin.command("ping")
            assert info.value.code == 18


@pytest.mark.anyio
async def test_auth_source_other_than_admin() -> None:
    async with MongoWireServer(users=USERS) as server:
        async with async_client(
            server.address, username="reporter", password="rep-pass", authSource="reports"
        ) as client:
            await client.admin.command("ping")
            status = await client.admin.command("connectionStatus")
            assert status["authInfo"]["authenticatedUsers"] == [
                {"user": "reporter", "db": "reports"}
            ]
        # the same user looked up in admin does not exist
        async with async_client(server.address, username="reporter", password="rep-pass") as client:
            with pytest.raises(OperationFailure) as info:
                await client.admin.command("ping")
            assert info.value.code == 18


@pytest.mark.anyio
@pytest.mark.parametrize("mechanism", ["DEFAULT", "SCRAM-SHA-1", "SCRAM-SHA-256"])
async def test_wrong_password_fails_like_mongod(mechanism: str) -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(
            server.address, username="admin", password="wrong", authMechanism=mechanism
        ) as client,
    ):
        with pytest.raises(OperationFailure) as info:
            await client.admin.command("ping")
        assert info.value.code == 18
        assert info.value.details is not None
        assert info.value.details["codeName"] == "AuthenticationFailed"
        assert info.value.details["errmsg"] == "Authentication failed."
        assert server.auth_failures >= 1
        assert server.auth_successes == 0


@pytest.mark.anyio
async def test_unknown_user_fails_with_code_18() -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(server.address, username="nobody", password="whatever") as client,
    ):
        with pytest.raises(OperationFailure) as info:
            await client.admin.command("ping")
        assert info.value.code == 18


@pytest.mark.anyio
@pytest.mark.parametrize("mechanism", ["DEFAULT", "SCRAM-SHA-1", "SCRAM-SHA-256"])
@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("quoted", QUOTED_PASSWORD),
        ("umlaut", "pässwörd"),
        ("cyrillic", "пароль"),
        ("we,ird=name", "odd-name-pass"),
    ],
)
async def test_special_credentials(user: str, password: str, mechanism: str) -> None:
    async with (
        MongoWireServer(users=USERS) as server,
        async_client(
            server.address, username=user, password=password, authMechanism=mechanism
        ) as client,
    ):
        await client.admin.command("ping")
        assert server.auth_successes == 1


@pytest.mark.anyio
async def test_commands_and_authorization() -> None:
    async with MongoWireServer(users=USERS) as server:
        async with async_client(server.address) as anonymous:
            assert await anonymous.admin.command("ping") == {"ok": 1.0}
            assert (await anonymous.admin.command("buildInfo"))["version"] == "7.0.12"
            with pytest.raises(OperationFailure) as info:
                await anonymous.list_database_names()
            assert info.value.code == 13
        async with async_client(
            server.address, username="admin", password="s3cret-admin"
        ) as client:
            assert "reports" in await client.list_database_names()
            with pytest.raises(OperationFailure) as info:
                await client.admin.command("killCursors", "c", cursors=[])
            assert info.value.code == 59
            assert info.value.details is not None
            assert info.value.details["codeName"] == "CommandNotFound"


@pytest.mark.anyio
async def test_server_without_users_allows_everything() -> None:
    async with MongoWireServer() as server, async_client(server.address) as client:
        assert "admin" in await client.list_database_names()
        assert server.auth_enabled is False


# --------------------------------------------------------------------------- sync driver


def test_sync_client_against_thread_run_server() -> None:
    with MongoWireServer(users=USERS).run_in_thread() as server:
        client = sync_client(server.address, username="umlaut", password="pässwörd")
        try:
            assert client.admin.command("ping") == {"ok": 1.0}
            assert client.admin.command("buildInfo")["version"] == "7.0.12"
            assert server.connections_open >= 1
            bad = sync_client(server.address, username="umlaut", password="nope")
            try:
                with pytest.raises(OperationFailure) as info:
                    bad.admin.command("ping")
                assert info.value.code == 18
            finally:
                bad.close()
        finally:
            client.close()
        assert server.wait_idle_sync(5.0)
        assert server.connections_open == 0
    assert not server.running


def test_sync_client_replica_set_in_thread() -> None:
    with MongoReplicaSet(3, users=USERS).run_in_thread() as rs:
        client = sync_client(rs.seed_list, username="admin", password="s3cret-admin")
        try:
            client.admin.command("ping")
            assert rs.primary is not None
            assert client.primary == ("127.0.0.1", rs.primary.port)
        finally:
            client.close()
    assert rs.connections_open == 0


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path_factory.mktemp("mongo-tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


@pytest.mark.anyio
async def test_tls_with_trusted_ca(tls_material: tuple[ssl.SSLContext, Path]) -> None:
    context, ca_file = tls_material
    async with (
        MongoWireServer(users=USERS, ssl_context=context) as server,
        async_client(
            server.address,
            username="admin",
            password="s3cret-admin",
            tls=True,
            tlsCAFile=str(ca_file),
        ) as client,
    ):
        assert await client.admin.command("ping") == {"ok": 1.0}
    assert server.connections_open == 0
    assert server.errors == []


def test_tls_untrusted_and_plaintext_clients_fail(
    tls_material: tuple[ssl.SSLContext, Path],
) -> None:
    # Sync clients: the sync driver's TLS failure paths, and none of AsyncMongoClient's
    # leaked sockets when close() cancels a monitor mid-handshake (while failing, the
    # monitor reconnects every 500 ms). See close_leaked_client_sockets().
    context, _ = tls_material
    with MongoWireServer(ssl_context=context).run_in_thread() as server:
        client = sync_client(server.address, tls=True)  # system CAs only
        try:
            with pytest.raises(ServerSelectionTimeoutError, match="CERTIFICATE_VERIFY_FAILED"):
                client.admin.command("ping")
        finally:
            client.close()
        client = sync_client(server.address)  # no TLS at all
        try:
            with pytest.raises((ServerSelectionTimeoutError, AutoReconnect)):
                client.admin.command("ping")
        finally:
            client.close()
        assert server.wait_idle_sync(5.0)
        assert server.errors == []


# --------------------------------------------------------------------------- replica sets


@pytest.mark.anyio
async def test_replica_set_discovery_without_direct_connection() -> None:
    async with (
        MongoReplicaSet(3, users=USERS, primary_index=1) as rs,
        async_client(rs.seed_list, username="admin", password="s3cret-admin") as client,
    ):
        assert await client.admin.command("ping") == {"ok": 1.0}
        assert rs.primary is rs.members[1]
        assert await client.primary == ("127.0.0.1", rs.members[1].port)
        assert client.nodes == {("127.0.0.1", m.port) for m in rs.members}
        assert set(await client.secondaries) == {
            ("127.0.0.1", rs.members[0].port),
            ("127.0.0.1", rs.members[2].port),
        }
        # a single seed is enough to discover the whole set
        async with async_client(rs.members[2].address, directConnection=False) as one_seed:
            await one_seed.admin.command("ping")
            assert await one_seed.primary == ("127.0.0.1", rs.members[1].port)


@pytest.mark.anyio
async def test_replica_set_without_primary_times_out() -> None:
    async with (
        MongoReplicaSet(2, primary_index=None) as rs,
        async_client(rs.seed_list, serverSelectionTimeoutMS=500) as client,
    ):
        with pytest.raises(ServerSelectionTimeoutError, match="ReplicaSetNoPrimary"):
            await client.admin.command("ping")


@pytest.mark.anyio
async def test_unresolvable_member_names() -> None:
    async with (
        MongoReplicaSet(3, unresolvable_names=True) as rs,
        async_client(rs.seed_list) as client,
    ):
        assert rs.advertised_hosts == [f"-mongo-{i}.invalid:27017" for i in range(3)]
        started = time.monotonic()
        with pytest.raises(ServerSelectionTimeoutError) as info:
            await client.admin.command("ping")
        assert time.monotonic() - started < 5
        assert "-mongo-0.invalid:27017" in str(info.value)
        # a seed answered, then the driver dropped the seeds for the advertised
        # names (the primary's answer drops the seeds not yet checked, so only
        # "at least one" is certain)
        assert any(member.commands["ismaster"] >= 1 for member in rs.members)
        assert client.nodes == frozenset()


def test_unresolvable_names_fail_locally() -> None:
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("-mongo-0.invalid", 27017)


# --------------------------------------------------------------------------- faults


@pytest.mark.anyio
async def test_silent_server_times_out() -> None:
    async with (
        MongoWireServer(fault="silent") as server,
        async_client(server.address, serverSelectionTimeoutMS=1000, connectTimeoutMS=500) as client,
    ):
        started = time.monotonic()
        with pytest.raises(ServerSelectionTimeoutError, match="timed out"):
            await client.admin.command("ping")
        assert time.monotonic() - started < 5
        assert server.connections_total >= 1
        assert sum(server.commands.values()) == 0


@pytest.mark.anyio
async def test_close_after_hello() -> None:
    async with (
        MongoWireServer(users=USERS, fault="close_after_hello") as server,
        async_client(server.address, username="admin", password="s3cret-admin") as client,
    ):
        with pytest.raises((AutoReconnect, ServerSelectionTimeoutError)):
            await client.admin.command("ping")
        assert server.auth_successes == 0


@pytest.mark.anyio
async def test_slow_hello() -> None:
    async with (
        MongoWireServer(fault="slow_hello", slow_hello_seconds=0.3) as server,
        async_client(server.address) as client,
    ):
        started = time.monotonic()
        await client.admin.command("ping")
        assert time.monotonic() - started >= 0.3
    async with (
        MongoWireServer(fault="slow_hello", slow_hello_seconds=5) as server,
        async_client(server.address, serverSelectionTimeoutMS=800, connectTimeoutMS=300) as client,
    ):
        with pytest.raises(ServerSelectionTimeoutError):
            await client.admin.command("ping")


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.anyio
async def test_stop_closes_client_connections() -> None:
    server = MongoWireServer(users=USERS)
    await server.start()
    async with async_client(server.address, username="admin", password="s3cret-admin") as client:
        await client.admin.command("ping")
        assert server.connections_open >= 1
        await server.stop()
        assert server.connections_open == 0
        assert not server._tasks
        assert not server.running
        await server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)


@pytest.mark.anyio
async def test_client_close_releases_server_connections() -> None:
    async with MongoWireServer(users=USERS) as server:
        for _ in range(3):
            async with async_client(
                server.address, username="admin", password="s3cret-admin"
            ) as client:
                await client.admin.command("ping")
        assert await server.wait_idle(5.0)
        assert server.connections_open == 0
        assert server.connections_total >= 6


def test_run_in_thread_reports_start_failure() -> None:
    with MongoWireServer().run_in_thread() as first:
        with pytest.raises(OSError), MongoWireServer(port=first.port).run_in_thread():
            pass  # pragma: no cover
        assert first.running


@pytest.mark.anyio
async def test_mongos_mode() -> None:
    async with MongoWireServer(mongos=True) as server, async_client(server.address) as client:
        await client.admin.command("ping")
        assert await client.is_mongos


def test_only_loopback_hosts_are_accepted() -> None:
    for host in ("0.0.0.0", "10.255.255.53", "192.168.4.66", "::", "example.com"):
        with pytest.raises(ValueError):
            MongoWireServer(host=host)
    assert MongoWireServer(host="127.0.0.2").host == "127.0.0.2"
    assert MongoWireServer(host="localhost").host == "127.0.0.1"


@pytest.mark.anyio
async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = MongoWireServer(host="::1")
    try:
        await server.start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        assert server.address == f"[::1]:{server.port}"
        async with async_client(server.address) as client:
            assert await client.admin.command("ping") == {"ok": 1.0}
    finally:
        await server.stop()


def test_wire_versions() -> None:
    assert wire_version_for("7.0.12") == 21
    assert wire_version_for("8.0.4") == 25
    assert wire_version_for("4.4.29") == 9
    assert wire_version_for("99.0") == 25
    assert pymongo.common.MIN_SUPPORTED_WIRE_VERSION <= 21


@pytest.mark.anyio
async def test_too_old_server_is_rejected_by_driver() -> None:
    async with (
        MongoWireServer(version="3.6.23") as server,
        async_client(server.address) as client,
    ):
        with pytest.raises(pymongo.errors.ConfigurationError, match="wire version"):
            await client.admin.command("ping")


# --------------------------------------------------------------------------- raw wire


def op_msg(
    request_id: int, doc: dict[str, Any], *, flags: int = 0, checksum: bool = False
) -> bytes:
    if checksum:
        flags |= 1
    body = struct.pack("<I", flags) + b"\x00" + bson.encode(doc)
    length = 16 + len(body) + (4 if checksum else 0)
    message = struct.pack("<iiii", length, request_id, 0, 2013) + body
    if checksum:
        message += struct.pack("<I", crc32c(message))
    return message


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    header = await asyncio.wait_for(reader.readexactly(16), 5)
    length, _, response_to, op_code = struct.unpack("<iiii", header)
    return response_to, op_code, await reader.readexactly(length - 16)


def msg_doc(payload: bytes) -> dict[str, Any]:
    assert payload[:5] == b"\x00\x00\x00\x00\x00"
    doc: dict[str, Any] = bson.decode(payload[5:])
    return doc


@asynccontextmanager
async def raw_connection(
    server: MongoWireServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def assert_closed_by_server(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), 5) == b""


@pytest.mark.anyio
async def test_raw_op_msg_commands() -> None:
    async with MongoWireServer(users=USERS) as server, raw_connection(server) as (reader, writer):
        writer.write(
            op_msg(7, {"hello": 1, "saslSupportedMechs": "admin.sha1only", "$db": "admin"})
        )
        response_to, op_code, payload = await read_reply(reader)
        hello = msg_doc(payload)
        assert (response_to, op_code) == (7, 2013)
        assert hello["isWritablePrimary"] is True
        assert hello["saslSupportedMechs"] == ["SCRAM-SHA-1"]
        assert hello["maxWireVersion"] == 21
        assert "compression" not in hello
        assert "topologyVersion" not in hello

        writer.write(op_msg(8, {"hello": 1, "saslSupportedMechs": "admin.nobody", "$db": "admin"}))
        assert "saslSupportedMechs" not in msg_doc((await read_reply(reader))[2])

        writer.write(op_msg(9, {"frobnicate": 1, "$db": "admin"}))
        reply = msg_doc((await read_reply(reader))[2])
        assert (reply["ok"], reply["code"], reply["codeName"]) == (0.0, 59, "CommandNotFound")

        writer.write(op_msg(10, {"listDatabases": 1, "$db": "admin"}))
        reply = msg_doc((await read_reply(reader))[2])
        assert (reply["code"], reply["codeName"]) == (13, "Unauthorized")

        writer.write(op_msg(11, {"ping": 1}))  # no $db
        assert msg_doc((await read_reply(reader))[2])["code"] == 40571

        writer.write(op_msg(12, {"saslStart": 1, "mechanism": "PLAIN", "payload": b"", "$db": "x"}))
        assert msg_doc((await read_reply(reader))[2])["codeName"] == "MechanismUnavailable"

        # moreToCome: no reply to 13, the next reply answers 14
        writer.write(op_msg(13, {"ping": 1, "$db": "admin"}, flags=2))
        writer.write(op_msg(14, {"ping": 1, "$db": "admin"}))
        assert (await read_reply(reader))[0] == 14

        writer.write(op_msg(15, {"ping": 1, "$db": "admin"}, checksum=True))
        response_to, _, payload = await read_reply(reader)
        assert response_to == 15
        assert msg_doc(payload) == {"ok": 1.0}
    assert server.errors == []


@pytest.mark.anyio
async def test_raw_legacy_op_query_hello() -> None:
    async with (
        MongoWireServer(replica_set="rs9") as server,
        raw_connection(server) as (reader, writer),
    ):
        query = bson.encode({"isMaster": 1, "helloOk": True})
        body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
        writer.write(struct.pack("<iiii", 16 + len(body), 42, 0, 2004) + body)
        response_to, op_code, payload = await read_reply(reader)
        assert (response_to, op_code) == (42, 1)
        flags, cursor_id, starting_from, returned = struct.unpack_from("<iqii", payload)
        assert (cursor_id, starting_from, returned) == (0, 0, 1)
        assert not flags & 2
        doc = bson.decode(payload[20:])
        assert doc["ismaster"] is True
        assert doc["helloOk"] is True
        assert doc["setName"] == "rs9"
        assert doc["hosts"] == [server.address]

        query = bson.encode({"find": "c"})
        body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
        writer.write(struct.pack("<iiii", 16 + len(body), 43, 0, 2004) + body)
        _, op_code, payload = await read_reply(reader)
        assert op_code == 1
        assert bson.decode(payload[20:])["code"] == 352


@pytest.mark.anyio
@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        struct.pack("<iiii", 16, 1, 0, 2013),
        struct.pack("<iiii", -5, 1, 0, 2013),
        struct.pack("<iiii", 20, 1, 0, 9999) + b"\x00" * 4,
        op_msg(1, {"ping": 1, "$db": "admin"})[:-1] + b"\x01" + b"\x00" * 8,
        op_msg(1, {"ping": 1, "$db": "admin"}, checksum=True)[:-1] + b"\x00",
        op_msg(1, {"ping": 1, "$db": "admin"}, flags=1 << 5),
    ],
    ids=["http", "header-only", "negative", "opcode", "bad-bson", "bad-checksum", "flags"],
)
async def test_garbage_closes_the_connection(garbage: bytes) -> None:
    async with MongoWireServer() as server:
        async with raw_connection(server) as (reader, writer):
            writer.write(garbage)
            await writer.drain()
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await read_reply(reader)
        assert await server.wait_idle(5.0)
        assert server.errors == []


@pytest.mark.anyio
async def test_truncated_message_then_disconnect() -> None:
    async with MongoWireServer() as server:
        async with raw_connection(server) as (_, writer):
            writer.write(op_msg(1, {"ping": 1, "$db": "admin"})[:10])
            await writer.drain()
        assert await server.wait_idle(5.0)
        assert server.errors == []


def test_op_msg_document_sequences() -> None:
    docs = [bson.encode({"_id": 1}), bson.encode({"_id": 2})]
    sequence = b"documents\x00" + b"".join(docs)
    body = (
        struct.pack("<I", 0)
        + b"\x00"
        + bson.encode({"insert": "c", "$db": "test"})
        + b"\x01"
        + struct.pack("<i", 4 + len(sequence))
        + sequence
    )
    flags, command = _parse_op_msg(b"", body)
    assert flags == 0
    assert command == {"insert": "c", "$db": "test", "documents": [{"_id": 1}, {"_id": 2}]}
    with pytest.raises(_FrameError):  # sequence duplicating a body field
        _parse_op_msg(
            b"", body[:5] + bson.encode({"documents": 1, "$db": "t"}) + body[-len(sequence) - 5 :]
        )
    with pytest.raises(_FrameError):  # no kind-0 section
        _parse_op_msg(b"", struct.pack("<I", 0) + body[-len(sequence) - 5 :])


def test_crc32c_known_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
