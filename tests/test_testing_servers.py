"""The throwaway real servers of ``probe.testing`` (PostgreSQL, MariaDB) and the test PKI."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiomysql
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from probe.testing import _proc
from probe.testing import mariadb as my
from probe.testing import postgres as pgm
from probe.testing._proc import DbUser, ManagedServer, assert_loopback, free_port
from probe.testing.certs import ServerTLS, TestPKI
from probe.testing.mariadb import MariaDBServer, mysql_password
from probe.testing.postgres import PostgresServer

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def pg_tls(pki: TestPKI) -> Iterator[PostgresServer]:
    with PostgresServer(tls=pki.server_tls(), ssl_only=True) as server:
        yield server


@pytest.fixture(scope="module")
def maria() -> Iterator[MariaDBServer]:
    with MariaDBServer() as server:
        yield server


@pytest.fixture(scope="module")
def maria_tls(pki: TestPKI) -> Iterator[MariaDBServer]:
    with MariaDBServer(tls=pki.server_tls(), require_secure_transport=True) as server:
        yield server


async def pg_select1(server: PostgresServer, user: DbUser, **kw: Any) -> tuple[int, bool]:
    conn = await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=user.name,
        password=user.password,
        database=kw.pop("database", "appdb"),
        timeout=10,
        **kw,
    )
    try:
        one = await conn.fetchval("SELECT 1")
        tls = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return one, tls
    finally:
        await conn.close()


async def my_select1(
    server: MariaDBServer, user: DbUser, password: str | None = None, **kw: Any
) -> tuple[int, str]:
    conn = await aiomysql.connect(
        host=server.host,
        port=server.port,
        user=user.name,
        password=mysql_password(user.password) if password is None else password,
        db=kw.pop("db", "appdb"),
        connect_timeout=10,
        **kw,
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")
            (one,) = await cur.fetchone()
            await cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
            (_, version) = await cur.fetchone()
        return one, version
    finally:
        conn.close()


def assert_gone(server: ManagedServer, pid: int, base_dir: Path) -> None:
    assert not server.is_running
    assert not base_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group (PostgreSQL backends too)


def answers(host: str, port: int, hello: bytes = b"", timeout: float = 0.5) -> bool:
    """Whether the server sends anything back within ``timeout`` (after ``hello``)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(hello)
        try:
            return bool(sock.recv(64))
        except TimeoutError:
            return False


PG_SSLREQUEST = bytes.fromhex("0000000804d2162f")


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# ------------------------------------------------------------------------- PKI


def _handshake(server_tls: ServerTLS, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory (no sockets) between a server using ``server_tls``
    and ``client``; raises ``ssl.SSLError`` like a real connection would."""
    import tempfile

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        files = server_tls.write(Path(d))
        server_ctx.load_cert_chain(files.cert_path, files.key_path)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj, out, peer_in in (("c", cli, c_out, s_in), ("s", srv, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_pki_server_certificates(pki: TestPKI) -> None:
    leaf = pki.server_tls().leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    now = dt.datetime.now(dt.UTC)
    expired = pki.server_tls("expired").leaf
    assert expired.not_valid_after_utc < now
    assert expired.issuer == leaf.issuer == pki.ca_certificate.subject

    for host in ("127.0.0.1", "::1", "localhost"):
        _handshake(pki.server_tls(), pki.client_context(), host)
    _handshake(pki.server_tls("chain"), pki.client_context(), "127.0.0.1")
    failures = {
        "expired": (pki.server_tls("expired"), pki.client_context(), "certificate has expired"),
        "wrong CA": (pki.server_tls(), pki.client_context(ca="other"), "local issuer"),
        "other CA": (pki.server_tls("other_ca"), pki.client_context(), "unable to get local"),
        "wrong host": (pki.server_tls("wrong_host"), pki.client_context(), "mismatch"),
        "not yet valid": (pki.server_tls("not_yet_valid"), pki.client_context(), "not yet valid"),
    }
    for name, (server_tls, client, message) in failures.items():
        with pytest.raises(ssl.SSLCertVerificationError, match=message):
            _handshake(server_tls, client, "127.0.0.1")
            pytest.fail(name)


def test_pki_exports(pki: TestPKI) -> None:
    ca = pki.ca_certificate
    assert x509.load_pem_x509_certificate(pki.ca_pem()) == ca
    assert x509.load_der_x509_certificate(pki.ca_der()) == ca
    assert pki.ca_der() != pki.ca_der("other")
    for legacy in (False, True):
        blob = pki.ca_pkcs12("pässwörd p@ss", legacy=legacy)
        key, cert, extra = pkcs12.load_key_and_certificates(blob, "pässwörd p@ss".encode())
        assert key is None and cert is None and extra == [ca]
        with pytest.raises(ValueError):
            pkcs12.load_key_and_certificates(blob, b"wrong")
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle_pem())
    assert len(bundle) == 3 and bundle[-1] == ca and bundle[0] != ca
    ctx = ssl.create_default_context(cadata=pki.ca_bundle_pem().decode())
    assert len(ctx.get_ca_certs()) == 3


def test_loopback_guard() -> None:
    assert assert_loopback("127.0.0.1") == "127.0.0.1"
    for bad in ("192.168.4.66", "10.0.0.1", "localhost", "0.0.0.0"):
        with pytest.raises(ValueError):
            assert_loopback(bad)
    assert 0 < free_port() < 65536
    assert pgm.SCRAM_USER.password not in repr(pgm.SCRAM_USER)


# ------------------------------------------------------------------ PostgreSQL


@pytest.mark.parametrize(
    "user",
    [pgm.SCRAM_USER, pgm.UNICODE_USER, pgm.MD5_USER, pgm.PASSWORD_USER],
    ids=lambda u: u.name,
)
def test_pg_login(pg: PostgresServer, user: DbUser) -> None:
    assert run(lambda: pg_select1(pg, user, ssl=False)) == (1, False)


def test_pg_server_facts(pg: PostgresServer) -> None:
    assert pg.host == "127.0.0.1" and pg.port > 0
    assert pg.sql("SELECT 1") == "1"
    assert pg.sql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.sql("SHOW ssl") == "off"
    assert pg.sql("SELECT rolname FROM pg_roles WHERE rolname = 'probe_md5'") == "probe_md5"
    assert pg.sql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'probe_md5'") == (
        "md5"
    )
    assert pg.sql("SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = 'probe_scram'") == (
        "SCRAM-SHA-256"
    )
    superuser = pg.user(pg.superuser)
    assert run(lambda: pg_select1(pg, superuser, ssl=False, database="postgres"))[0] == 1

    async def held() -> int:
        conn = await asyncpg.connect(pg.dsn(pgm.SCRAM_USER), ssl=False)
        try:
            return pg.backend_count("probe_scram")
        finally:
            await conn.close()

    assert run(held) == 1


def test_pg_denials(pg: PostgresServer) -> None:
    cases: list[tuple[DbUser, type[Exception], str]] = [
        (pgm.NOLOGIN_USER, asyncpg.InvalidAuthorizationSpecificationError, "28000"),
        (pgm.NODB_USER, asyncpg.InsufficientPrivilegeError, "42501"),
        (DbUser("probe_scram", "wrong"), asyncpg.InvalidPasswordError, "28P01"),
        (DbUser("probe_md5", "wrong"), asyncpg.InvalidPasswordError, "28P01"),
        (DbUser("nosuchuser", "x"), asyncpg.InvalidPasswordError, "28P01"),
    ]
    for user, exc, sqlstate in cases:
        with pytest.raises(exc) as info:
            run(lambda u=user: pg_select1(pg, u, ssl=False))  # type: ignore[misc]
        assert getattr(info.value, "sqlstate", None) == sqlstate, user
    with pytest.raises(asyncpg.InvalidCatalogNameError):  # 3D000
        run(lambda: pg_select1(pg, pgm.SCRAM_USER, ssl=False, database="nosuchdb"))


def test_pg_tls_verified(pg_tls: PostgresServer, pki: TestPKI) -> None:
    assert pg_tls.sql("SHOW ssl") == "on"
    for user in (pgm.SCRAM_USER, pgm.UNICODE_USER, pgm.MD5_USER):
        assert run(lambda u=user: pg_select1(pg_tls, u, ssl=pki.client_context())) == (  # type: ignore[misc]
            1,
            True,
        )


def test_pg_ssl_only_refuses_plaintext(pg_tls: PostgresServer) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption") as e:
        run(lambda: pg_select1(pg_tls, pgm.SCRAM_USER, ssl=False))
    assert e.value.sqlstate == "28000"


def test_pg_tls_wrong_ca(pg_tls: PostgresServer, pki: TestPKI) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        run(lambda: pg_select1(pg_tls, pgm.SCRAM_USER, ssl=pki.client_context(ca="other")))


def test_pg_tls_to_plain_server(pg: PostgresServer, pki: TestPKI) -> None:
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        run(lambda: pg_select1(pg, pgm.SCRAM_USER, ssl=pki.client_context()))


def test_pg_lifecycle() -> None:
    server = PostgresServer(users=(pgm.SCRAM_USER,), max_connections=5)
    with server:
        pid, base, port = server.pid, server.base_dir, server.port
        assert pid is not None and server.timings["total"] < 10

        # max_connections=5 keeps 3 slots for superusers: 2 for everybody else.
        async def exhaust() -> None:
            conns = [await asyncpg.connect(server.dsn(pgm.SCRAM_USER), ssl=False) for _ in range(2)]
            try:
                with pytest.raises(asyncpg.TooManyConnectionsError) as e:
                    await asyncpg.connect(server.dsn(pgm.SCRAM_USER), ssl=False)
                assert e.value.sqlstate == "53300"
            finally:
                for conn in conns:
                    await conn.close()

        run(exhaust)
        server.kill()
        assert refused(server.host, port)
        server.restart()
        assert server.port == port and server.pid not in (None, pid)
        assert run(lambda: pg_select1(server, pgm.SCRAM_USER, ssl=False))[0] == 1
        assert answers(server.host, port, PG_SSLREQUEST)
        with server.frozen():  # TCP connects, the server never answers
            assert not answers(server.host, port, PG_SSLREQUEST)
        server.stop_server_only()
        assert refused(server.host, port)
        server.restart()
        pid = server.pid
        assert pid is not None
        assert run(lambda: pg_select1(server, pgm.SCRAM_USER, ssl=False))[0] == 1
    assert_gone(server, pid, base)
    server.stop()  # idempotent


# --------------------------------------------------------------------- MariaDB


@pytest.mark.parametrize("user", [my.NATIVE_USER, my.UNICODE_USER], ids=lambda u: u.name)
def test_maria_login(maria: MariaDBServer, user: DbUser) -> None:
    assert run(lambda: my_select1(maria, user)) == (1, "")


def test_maria_aiomysql_latin1_password_quirk(maria: MariaDBServer) -> None:
    # aiomysql encodes passwords as latin-1: a raw non-latin-1 password cannot be sent.
    with pytest.raises(UnicodeEncodeError):
        run(lambda: my_select1(maria, my.UNICODE_USER, password=my.UNICODE_USER.password))
    # An ASCII password is the same either way.
    assert run(lambda: my_select1(maria, my.NATIVE_USER, password=my.NATIVE_USER.password))[0] == 1


def test_maria_server_facts(maria: MariaDBServer) -> None:
    assert maria.sql("SELECT 1") == "1"
    assert maria.sql("SELECT @@bind_address, @@port") == f"127.0.0.1\t{maria.port}"
    assert maria.sql("SELECT @@have_ssl") == "DISABLED"
    accounts = set(maria.sql("SELECT CONCAT(User, '@', Host) FROM mysql.user").splitlines())
    assert {"probe_native@127.0.0.1", "probe_native@localhost", "root@localhost"} <= accounts
    assert not any(a.startswith("@") for a in accounts)  # no anonymous accounts
    root = maria.user("root")
    assert run(lambda: my_select1(maria, root, db=None))[0] == 1

    async def held() -> int:
        conn = await aiomysql.connect(
            host=maria.host,
            port=maria.port,
            user=my.NATIVE_USER.name,
            password=my.NATIVE_USER.password,
        )
        try:
            return maria.connection_count("probe_native")
        finally:
            conn.close()

    assert run(held) == 1


def test_maria_denials(maria: MariaDBServer) -> None:
    cases = [
        (my.NOGRANT_USER, 1044),
        (my.LOCKED_USER, 4151),
        (DbUser("probe_native", "wrong"), 1045),
        (DbUser("nosuchuser", "x"), 1045),
    ]
    for user, errno in cases:
        with pytest.raises(aiomysql.OperationalError) as e:
            run(lambda u=user: my_select1(maria, u))  # type: ignore[misc]
        assert e.value.args[0] == errno, user
    with pytest.raises(aiomysql.OperationalError) as e:
        run(lambda: my_select1(maria, my.NATIVE_USER, db="nosuchdb"))
    assert e.value.args[0] == 1044  # no grant there, so "access denied" rather than 1049
    with pytest.raises(aiomysql.OperationalError) as e:
        run(lambda: my_select1(maria, maria.user("root"), db="nosuchdb"))
    assert e.value.args[0] == 1049  # unknown database (only visible with privileges)


def test_maria_tls_verified(maria_tls: MariaDBServer, pki: TestPKI) -> None:
    assert maria_tls.sql("SELECT @@have_ssl, @@require_secure_transport") == "YES\t1"
    for user in (my.NATIVE_USER, my.UNICODE_USER):
        one, version = run(lambda u=user: my_select1(maria_tls, u, ssl=pki.client_context()))  # type: ignore[misc]
        assert one == 1 and version.startswith("TLSv1.")


def test_maria_secure_transport_refuses_plaintext(maria_tls: MariaDBServer) -> None:
    # MariaDB answers plain "Access denied" (1045), not MySQL's 3159 (MDEV-30178).
    with pytest.raises(aiomysql.OperationalError) as e:
        run(lambda: my_select1(maria_tls, my.NATIVE_USER))
    assert e.value.args[0] == 1045


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_maria_tls_wrong_ca(maria_tls: MariaDBServer, pki: TestPKI) -> None:
    with pytest.raises(aiomysql.OperationalError) as e:
        run(lambda: my_select1(maria_tls, my.NATIVE_USER, ssl=pki.client_context(ca="other")))
    assert e.value.args[0] == 2003
    assert isinstance(e.value.__cause__, ssl.SSLCertVerificationError)
    del e
    gc.collect()  # aiomysql leaks the socket when the TLS handshake fails: collect it here


def test_maria_tls_to_plain_server_is_silently_plaintext(
    maria: MariaDBServer, pki: TestPKI
) -> None:
    # aiomysql skips TLS when the server does not offer it: callers must check.
    assert run(lambda: my_select1(maria, my.NATIVE_USER, ssl=pki.client_context())) == (1, "")


def test_maria_lifecycle() -> None:
    server = MariaDBServer(users=(my.NATIVE_USER,), max_connections=10, max_connect_errors=3)
    with server:
        pid, base, port = server.pid, server.base_dir, server.port
        assert pid is not None and server.timings["total"] < 10

        async def exhaust() -> None:
            conns = [
                await aiomysql.connect(
                    host=server.host,
                    port=port,
                    user=my.NATIVE_USER.name,
                    password=my.NATIVE_USER.password,
                )
                for _ in range(10)
            ]
            try:
                with pytest.raises(aiomysql.OperationalError) as e:
                    await my_select1(server, my.NATIVE_USER)
                assert e.value.args[0] == 1040  # too many connections
            finally:
                for conn in conns:
                    conn.close()

        run(exhaust)
        server.kill()
        assert refused(server.host, port)
        server.restart()
        assert server.port == port and server.pid not in (None, pid)
        assert run(lambda: my_select1(server, my.NATIVE_USER))[0] == 1
        assert answers(server.host, port)
        with server.frozen():  # TCP connects, the server never sends its greeting
            assert not answers(server.host, port)
        server.flush_hosts()
        server.stop_server_only()
        assert refused(server.host, port)
        server.restart()
        pid = server.pid
        assert pid is not None
        assert run(lambda: my_select1(server, my.NATIVE_USER))[0] == 1
    assert_gone(server, pid, base)
    server.stop()


def test_start_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[Path] = []
    real = _proc.make_server_dir

    def recording(kind: str, run_as: _proc.RunAs) -> Path:
        created.append(real(kind, run_as))
        return created[-1]

    monkeypatch.setattr(_proc, "make_server_dir", recording)
    server = PostgresServer(users=(), extra_conf={"shared_buffers": "not-a-size"})
    with pytest.raises(_proc.ServerStartError, match="shared_buffers"):
        server.start()
    assert not server.started and not server.is_running
    assert created and not created[0].exists()  # [0]: the server's dir (then maybe a template)


def test_port_race_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real = _proc.free_port
        monkeypatch.setattr(
            _proc, "free_port", lambda hosts=("127.0.0.1",): next(ports, None) or real(hosts)
        )
        with PostgresServer(users=(pgm.SCRAM_USER,)) as server:
            assert server.port != taken
            assert run(lambda: pg_select1(server, pgm.SCRAM_USER, ssl=False))[0] == 1
