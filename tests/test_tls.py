"""TLS for every engine: certificate material, verification, and the exact codes."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import glob
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from probe import Prober, ProbeSettings
from probe.errors import ErrorCode, ProbeFailure
from probe.testing import mariadb as m
from probe.testing import postgres as p
from probe.testing.certs import TestPKI, sha256_hex
from probe.testing.faults import FaultServer, mysql_error, mysql_greeting
from probe.testing.mariadb import MariaDBServer
from probe.testing.mongo_wire import MongoReplicaSet, MongoWireServer
from probe.testing.postgres import PostgresServer
from probe.tls import MAX_CERT_BYTES, MaterialCache, decode
from tests.conftest import MONGO_USERS, job
from tests.guard import loopback_only

P12_PASSWORD = "pässwörd-p12 ключ"
FAST = ProbeSettings(deadline=4, connect_timeout=2)


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


def material(
    data: bytes, name: str, password: str | None = None, **overrides: Any
) -> dict[str, Any]:
    fields = {
        "ssl_link": True,
        "ssl_cert_key": base64.b64encode(data).decode("ascii"),
        "ssl_cert_name": name,
        "ssl_cert_check_sum": sha256_hex(data).upper(),  # case does not matter
    }
    if password is not None:
        fields["ssl_cert_password"] = password
    fields.update(overrides)
    return fields


@dataclass
class Engine:
    db_type: str
    tls_port: int | str  # TLS-only server with a valid certificate
    expired_port: int | str  # TLS server whose certificate has expired
    plain_port: int | str  # server without TLS
    user: str
    password: str


@pytest.fixture(scope="module")
def engines(
    pki: TestPKI, pg: PostgresServer, maria: MariaDBServer, mongo: MongoWireServer
) -> Iterator[dict[str, Engine]]:
    mongo_user = MONGO_USERS[0]
    with (
        PostgresServer(tls=pki.server_tls(), ssl_only=True) as pg_tls,
        PostgresServer(tls=pki.server_tls("expired")) as pg_expired,
        MariaDBServer(tls=pki.server_tls(), require_secure_transport=True) as maria_tls,
        MariaDBServer(tls=pki.server_tls("expired")) as maria_expired,
        MongoWireServer(users=MONGO_USERS,
                        ssl_context=pki.server_tls().server_context()).run_in_thread() as mongo_tls,
        MongoWireServer(users=MONGO_USERS, ssl_context=pki.server_tls("expired").server_context()
                        ).run_in_thread() as mongo_expired,
    ):
        yield {
            "postgresql": Engine("postgresql", pg_tls.port, pg_expired.port, pg.port,
                                 p.SCRAM_USER.name, p.SCRAM_USER.password),
            "mysql": Engine("mysql", maria_tls.port, maria_expired.port, maria.port,
                            m.NATIVE_USER.name, m.NATIVE_USER.password),
            "mongodb": Engine("mongodb", mongo_tls.address, mongo_expired.address, mongo.address,
                              mongo_user.name, mongo_user.password),
        }


ENGINES = ["postgresql", "mysql", "mongodb"]


def ca_files() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "probe-ca-*")))


async def probe_one(engine: Engine, port: int | str, tls: dict[str, Any] | None,
                    settings: ProbeSettings = FAST, **extra: Any) -> dict[str, Any]:
    body = job(engine.db_type, port, engine.user, engine.password, **(tls or {}), **extra)
    if engine.db_type == "postgresql":
        body["db_name"] = "appdb"
    before = ca_files()
    response = await Prober(settings).run({"jobs": [body]}, detail=True)
    assert ca_files() <= before, "a CA file was left behind"
    return response.results[0].to_json()


def code(result: dict[str, Any]) -> str | None:
    return result.get("error_code")


@pytest.mark.anyio
@pytest.mark.parametrize("db_type", ENGINES)
@pytest.mark.parametrize("form", ["pem", "der", "p12", "bundle"])
async def test_good_ca_in_every_format(
    engines: dict[str, Engine], pki: TestPKI, db_type: str, form: str
) -> None:
    tls = {
        "pem": lambda: material(pki.ca_pem(), "ca.pem"),
        "der": lambda: material(pki.ca_der(), "ca.cer"),
        "p12": lambda: material(pki.ca_pkcs12(P12_PASSWORD), "ca.p12", P12_PASSWORD),
        "bundle": lambda: material(pki.ca_bundle_pem(), "bundle.pem"),
    }[form]()
    engine = engines[db_type]
    result = await probe_one(engine, engine.tls_port, tls)
    assert result["success"] is True, result
    assert result["tls"]["version"].startswith("TLSv1.")
    assert result["tls"]["cipher"]
    assert "localhost" in result["tls"]["peer_cert_subject"]
    assert result["tls"]["peer_cert_not_after"].startswith("3000")


@pytest.mark.anyio
async def test_replica_set_over_tls_reports_the_primarys_tls(pki: TestPKI) -> None:
    user = MONGO_USERS[0]
    context = pki.server_tls().server_context()
    async with MongoReplicaSet(3, users=[user], primary_index=2, ssl_context=context) as rs:
        engine = Engine("mongodb", rs.seed_list, 0, 0, user.name, user.password)
        result = await probe_one(engine, rs.seed_list, material(pki.ca_pem(), "ca.pem"))
    assert result["success"] is True, result
    assert result["tls"]["version"].startswith("TLSv1.")
    assert "localhost" in result["tls"]["peer_cert_subject"]


@pytest.mark.anyio
async def test_several_mongos_over_tls_report_tls(pki: TestPKI) -> None:
    user = MONGO_USERS[0]
    context = pki.server_tls().server_context()
    async with (
        MongoWireServer(users=[user], mongos=True, ssl_context=context) as a,
        MongoWireServer(users=[user], mongos=True, ssl_context=context) as b,
    ):
        hosts = f"{a.address},{b.address}"
        engine = Engine("mongodb", hosts, 0, 0, user.name, user.password)
        result = await probe_one(engine, hosts, material(pki.ca_pem(), "ca.pem"))
    assert result["success"] is True, result
    assert result["tls"]["version"].startswith("TLSv1.")


@pytest.mark.anyio
@pytest.mark.parametrize("db_type", ENGINES)
async def test_failures_have_exact_codes(
    engines: dict[str, Engine], pki: TestPKI, db_type: str
) -> None:
    engine = engines[db_type]
    pem = pki.ca_pem()
    good = material(pem, "ca.pem")
    cases: list[tuple[str, int | str, dict[str, Any], ErrorCode]] = [
        ("wrong CA", engine.tls_port, material(pki.ca_pem("other"), "ca.pem"),
         ErrorCode.SSL_VERIFY_FAILED),
        ("expired certificate", engine.expired_port, good, ErrorCode.SSL_VERIFY_FAILED),
        ("checksum mismatch", engine.tls_port, {**good, "ssl_cert_check_sum": "0" * 64},
         ErrorCode.SSL_CHECKSUM_MISMATCH),
        ("truncated base64", engine.tls_port,
         {**good, "ssl_cert_key": good["ssl_cert_key"][:-3]}, ErrorCode.SSL_CERT_INVALID),
        ("wrong PKCS#12 password", engine.tls_port,
         material(pki.ca_pkcs12(P12_PASSWORD), "ca.p12", "not-it"), ErrorCode.SSL_CERT_INVALID),
        ("not a certificate", engine.tls_port, material(b"hello world", "ca.pem"),
         ErrorCode.SSL_CERT_INVALID),
        ("server without TLS", engine.plain_port, good, ErrorCode.SSL_NOT_ENABLED_ON_SERVER),
    ]
    for name, port, tls, expected in cases:
        result = await probe_one(engine, port, tls)
        assert code(result) == expected.value, (name, result)
        assert good["ssl_cert_key"][:40] not in result["error_msg"]
        assert "127.0.0.1:" in result["error_msg"], (name, result)  # names the endpoint


@pytest.mark.anyio
@pytest.mark.parametrize("db_type", ENGINES)
async def test_bad_material_fails_before_any_traffic(
    engines: dict[str, Engine], pki: TestPKI, db_type: str
) -> None:
    engine = engines[db_type]
    good = material(pki.ca_pem(), "ca.pem")
    cases = [
        ({**good, "ssl_cert_check_sum": "0" * 64}, ErrorCode.SSL_CHECKSUM_MISMATCH),
        ({**good, "ssl_cert_key": good["ssl_cert_key"][:-3]}, ErrorCode.SSL_CERT_INVALID),
        (material(pki.ca_pkcs12(P12_PASSWORD), "ca.p12", "not-it"), ErrorCode.SSL_CERT_INVALID),
        (material(pki.ca_pkcs12(P12_PASSWORD), "ca.p12"), ErrorCode.SSL_CERT_INVALID),
    ]
    for tls, expected in cases:
        async with loopback_only() as guard:
            result = await probe_one(engine, engine.tls_port, tls)
        assert code(result) == expected.value, result
        if tls["ssl_cert_name"] == "ca.p12":  # says whether the password is wrong or missing
            says = "is wrong" if "ssl_cert_password" in tls else "is not given"
            assert says in result["error_msg"], result
        assert guard.connects == [] and guard.lookups == [] and guard.blocked == []


@pytest.mark.anyio
@pytest.mark.parametrize("db_type", ENGINES)
async def test_verification_failure_still_reports_tls_facts(
    engines: dict[str, Engine], pki: TestPKI, db_type: str
) -> None:
    # The handshake fails, yet the certificate the server presented is what the
    # user needs: the facts and the message say what it was.
    engine = engines[db_type]
    expired = await probe_one(engine, engine.expired_port, material(pki.ca_pem(), "ca.pem"))
    assert code(expired) == ErrorCode.SSL_VERIFY_FAILED.value, expired
    assert "expired" in expired["error_msg"]
    tls = expired["tls"]
    assert tls["version"].startswith("TLSv1."), tls
    assert "localhost" in tls["peer_cert_subject"]
    not_after = dt.datetime.fromisoformat(tls["peer_cert_not_after"])
    assert not_after < dt.datetime.now(dt.UTC)  # in the past: why it failed
    assert "issued by" in expired["error_msg"] and "probe tests" in expired["error_msg"]

    unknown_ca = await probe_one(engine, engine.tls_port, material(pki.ca_pem("other"), "ca.pem"))
    assert code(unknown_ca) == ErrorCode.SSL_VERIFY_FAILED.value, unknown_ca
    assert unknown_ca["tls"]["peer_cert_not_after"].startswith("3000")
    # the issuer the server's certificate names, not the unrelated CA that was given
    issuer = unknown_ca["error_msg"].split("issued by ")[1]
    assert "O=probe tests," in issuer and "unrelated" not in issuer


@pytest.mark.anyio
async def test_a_certificate_counts_by_its_content_not_its_claimed_checksum(
    engines: dict[str, Engine], pki: TestPKI
) -> None:
    # Two otherwise identical jobs, one with the right CA and one with another CA
    # under the first one's checksum: the second fails on its own (C10021) and
    # does not share the first one's success.
    engine = engines["postgresql"]
    good = material(pki.ca_pem(), "ca.pem")
    forged = {**material(pki.ca_pem("other"), "ca.pem"),
              "ssl_cert_check_sum": good["ssl_cert_check_sum"]}
    jobs = [job(engine.db_type, engine.tls_port, engine.user, engine.password, db_name="appdb",
                id=f"j{i}", **tls) for i, tls in enumerate([good, forged, good])]
    response = await Prober(FAST).run({"jobs": jobs})
    assert [r.error_code for r in response.results] == [
        None, ErrorCode.SSL_CHECKSUM_MISMATCH.value, None]


@pytest.mark.anyio
async def test_verify_hostname_checks_the_name_only_when_asked(pki: TestPKI) -> None:
    # The certificate is for db.invalid, the probe goes to 127.0.0.1: fine by
    # default (databases are reached by address), a C10023 with verify_hostname.
    mongo_user = MONGO_USERS[0]
    wrong_host = pki.server_tls("wrong_host")
    with (
        PostgresServer(tls=wrong_host, users=[p.SCRAM_USER]) as pg_tls,
        MariaDBServer(tls=wrong_host, users=[m.NATIVE_USER]) as maria_tls,
        MongoWireServer(users=[mongo_user],
                        ssl_context=wrong_host.server_context()).run_in_thread() as mongo_tls,
    ):
        engines = [
            Engine("postgresql", pg_tls.port, 0, 0, p.SCRAM_USER.name, p.SCRAM_USER.password),
            Engine("mysql", maria_tls.port, 0, 0, m.NATIVE_USER.name, m.NATIVE_USER.password),
            Engine("mongodb", mongo_tls.address, 0, 0, mongo_user.name, mongo_user.password),
        ]
        tls = material(pki.ca_pem(), "ca.pem")
        for engine in engines:
            lenient = await probe_one(engine, engine.tls_port, tls)
            assert lenient["success"] is True, lenient
            assert "db.invalid" in lenient["tls"]["peer_cert_subject"]
            strict = await probe_one(engine, engine.tls_port, tls,
                                     settings=ProbeSettings(deadline=4, connect_timeout=2,
                                                            verify_hostname=True))
            assert code(strict) == ErrorCode.SSL_VERIFY_FAILED.value, (engine.db_type, strict)
            assert "mismatch" in strict["error_msg"].lower(), strict


@pytest.mark.anyio
async def test_plaintext_to_a_tls_only_postgresql(engines: dict[str, Engine]) -> None:
    engine = engines["postgresql"]
    result = await probe_one(engine, engine.tls_port, None)
    assert code(result) == ErrorCode.SSL_REQUIRED_BY_SERVER.value


@pytest.mark.anyio
async def test_plaintext_to_a_tls_only_mariadb_says_what_it_can(engines: dict[str, Engine]) -> None:
    # MariaDB refuses a plaintext login under require_secure_transport with the
    # same errno as a wrong password (MDEV-30178): the message says both.
    engine = engines["mysql"]
    result = await probe_one(engine, engine.tls_port, None)
    assert code(result) == ErrorCode.AUTH_FAILED.value
    assert "requires SSL" in result["error_msg"]


@pytest.mark.anyio
async def test_plaintext_to_a_tls_only_mysql() -> None:
    # MySQL 8 says 3159 (ER_SECURE_TRANSPORT_REQUIRED); no MySQL 8 server can be
    # installed here, so a fault server replays its greeting and its answer.
    reply = mysql_error(3159, "Connections using insecure transport are prohibited while "
                              "--require_secure_transport=ON.")
    with FaultServer("greeting", mysql_greeting(b"8.0.36"), reply=reply) as server:
        engine = Engine("mysql", server.port, 0, 0, "u", "p")
        result = await probe_one(engine, server.port, None)
    assert code(result) == ErrorCode.SSL_REQUIRED_BY_SERVER.value


# ---------------------------------------------------------------- material, without a network


def test_decode_is_strict_and_bounded() -> None:
    assert decode(base64.b64encode(b"abc").decode()) == b"abc"
    assert decode(" YWJj\n") == b"abc"  # whitespace is how files get wrapped
    for bad in ("YWJ", "!!!!", "", "YW Jj=="):
        with pytest.raises(ProbeFailure) as caught:
            decode(bad)
        assert caught.value.code is ErrorCode.SSL_CERT_INVALID
    with pytest.raises(ProbeFailure):
        decode(base64.b64encode(b"x" * (MAX_CERT_BYTES + 1)).decode())


def test_one_context_per_material(pki: TestPKI) -> None:
    cache = MaterialCache()
    fields = material(pki.ca_pem(), "ca.pem")
    first = cache.load(fields["ssl_cert_key"], "ca.pem", fields["ssl_cert_check_sum"])
    for _ in range(50):
        again = cache.load(fields["ssl_cert_key"], "ca.pem", fields["ssl_cert_check_sum"].lower())
        assert again is first
    assert cache.built == 1
    assert first.context.check_hostname is False
    strict = cache.load(fields["ssl_cert_key"], "ca.pem", fields["ssl_cert_check_sum"],
                        verify_hostname=True)
    assert strict.context.check_hostname is True and cache.built == 2
    assert "BEGIN" not in repr(first)


def test_format_comes_from_content_then_name(pki: TestPKI) -> None:
    cache = MaterialCache()
    der = pki.ca_der()
    # DER under a .pem name still loads: content first.
    loaded = cache.load(base64.b64encode(der).decode(), "ca.pem", sha256_hex(der))
    assert b"BEGIN CERTIFICATE" in loaded.ca_pem
    p12 = pki.ca_pkcs12(None)
    unprotected = cache.load(base64.b64encode(p12).decode(), "trust.pfx", sha256_hex(p12))
    assert unprotected.ca_pem == loaded.ca_pem


@pytest.mark.anyio
async def test_plaintext_to_a_tls_only_mongodb(engines: dict[str, Engine]) -> None:
    # An OpenSSL server (mongod, and this wire server) hangs up on a plaintext
    # hello without a word, exactly as a PostgreSQL server does; asked again in
    # TLS (no credentials on that connection), it answers: TLS is required.
    engine = engines["mongodb"]
    result = await probe_one(engine, engine.tls_port, None)
    assert code(result) == ErrorCode.SSL_REQUIRED_BY_SERVER.value, result


@pytest.mark.anyio
async def test_a_tls_server_that_is_not_mongodb(engines: dict[str, Engine], pki: TestPKI) -> None:
    # ssl_link is already true: the message must not tell the user to set it.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the hello, over TLS
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0,
                                        ssl=pki.server_tls().server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        result = await probe_one(engines["mongodb"], port, material(pki.ca_pem(), "ca.pem"))
    assert code(result) == ErrorCode.PROTOCOL_MISMATCH.value, result
    assert "not MongoDB" in result["error_msg"] and "ssl_link" not in result["error_msg"], result
