"""Security: the network policy end to end, secret hygiene with canaries, input limits.

Every probe here runs inside `loopback_only()`: the probe's TCP connects and name
lookups go through a guard on the running loop, underneath the probe's own loop
hook, that refuses (before any packet) every connect outside 127.0.0.0/8 and ::1
and answers host names from a table of its own, never from the system resolver.
A policy bug therefore fails a test instead of reaching the network, and tests can
give a name several addresses, or a different address on every lookup (DNS
rebinding). `tests/test_reliability.py` uses the same guard.
"""

from __future__ import annotations

import base64
import gc
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from probe import Prober, ProbeSettings
from probe.addresses import NetworkPolicy
from probe.checkers import Checker, Facts, Target, Trace
from probe.cli import build_parser
from probe.errors import ErrorCode, ProbeFailure, RequestInvalid
from probe.models import BatchConnectionRequest, CheckJobResp, Endpoint, parse_jobs
from probe.runner import Outcome
from probe.service import (
    ServeOptions,
    ServiceConfig,
    TokenTable,
    config_from,
    create_app,
    options_from,
)
from probe.testing import postgres as p
from probe.testing.certs import TestPKI, sha256_hex
from probe.testing.faults import FaultServer, RefusedPort, mysql_error, mysql_greeting
from probe.testing.mariadb import MariaDBServer
from probe.testing.mongo_wire import MongoWireServer
from probe.testing.postgres import PostgresServer
from probe.tls import MAX_CERT_BYTES, MaterialCache
from tests.conftest import MARIA_USER, MONGO_USER, PG_USER, Faults, job
from tests.guard import Network

# ---------------------------------------------------------------- shared helpers


def tls_fields(data: bytes, name: str = "ca.pem", password: str | None = None,
               checksum: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ssl_link": True,
        "ssl_cert_key": base64.b64encode(data).decode("ascii"),
        "ssl_cert_name": name,
        "ssl_cert_check_sum": checksum or sha256_hex(data),
    }
    if password is not None:
        fields["ssl_cert_password"] = password
    return fields


def codes(response: Any) -> list[str | None]:
    return [r.error_code for r in response.results]


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="module")
def pg_tls(pki: TestPKI) -> Iterator[PostgresServer]:
    with PostgresServer(users=[p.SCRAM_USER], tls=pki.server_tls(), ssl_only=True) as server:
        yield server


pytestmark = pytest.mark.anyio


# ================================================================ 1. network policy


LOCAL_ONLY_DENIED = NetworkPolicy.build(deny=["127.0.0.0/8", "::1/128"])


@pytest.mark.parametrize("db_type", ["postgresql", "mysql", "mongodb"])
async def test_a_denied_target_fails_before_any_traffic_with_one_message(
    net: Network, faults: Faults, pg: PostgresServer, db_type: str
) -> None:
    targets = {"open": faults.silent.port, "db": pg.port, "closed": faults.refused.port}
    jobs = [job(db_type, port, "u", "pw", id=name) for name, port in targets.items()]
    if db_type == "mongodb":  # host lists: every member denied
        jobs += [job("mongodb", f"127.0.0.1:{port},[::1]:{port}", "u", "pw", id=f"list-{name}")
                 for name, port in targets.items()]
    accepted = faults.silent.accepted
    prober = Prober(ProbeSettings(deadline=5, policy=LOCAL_ONLY_DENIED))
    for lang in ("en-us", "zh-cn"):
        started = time.monotonic()
        response = await prober.run({"jobs": jobs}, lang=lang)
        assert time.monotonic() - started < 1
        single = response.results[:3]
        assert {r.error_code for r in single} == {ErrorCode.NETWORK_POLICY_DENIED.value}
        # Open, listening database, closed: one message but for the port it names.
        messages = {(r.error_msg or "").replace(str(port), "PORT")
                    for r, port in zip(single, targets.values(), strict=True)}
        assert len(messages) == 1, messages
        for r in response.results[3:]:  # a MongoDB host list: no member may be reached
            assert r.error_code == ErrorCode.NO_REACHABLE_MEMBER.value
            assert ErrorCode.NETWORK_POLICY_DENIED.value in (r.error_msg or "")
        assert len({(r.error_msg or "").replace(str(port), "PORT") for r, port in
                    zip(response.results[3:], targets.values(), strict=False)}) <= 1
    assert net.connects == [] and faults.silent.accepted == accepted


DENIED_BY_DEFAULT = [
    "169.254.169.254", "169.254.0.1", "0.0.0.0", "0.1.2.3", "224.0.0.251", "239.255.255.250",
    "255.255.255.255", "::", "fe80::1", "fe80::1%lo", "ff02::1", "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
]


@pytest.mark.parametrize("db_type", ["postgresql", "mysql", "taurus", "mongodb"])
async def test_the_default_policy_refuses_non_loopback_targets_before_connecting(
    net: Network, db_type: str
) -> None:
    net.names["metadata.probe.test"] = ["169.254.169.254", "fe80::a9fe:a9fe"]
    hosts = [*DENIED_BY_DEFAULT, "[fe80::1]", "metadata.probe.test"]
    jobs = []
    for i, host in enumerate(hosts):
        body = job(db_type, 80, "u", "pw", id=f"j{i}")
        if db_type == "mongodb":
            bare = host.strip("[]")
            body["ip"] = f"[{bare}]:80" if ":" in bare else f"{bare}:80"
        else:
            body["ip"] = host
        jobs.append(body)
    response = await Prober(ProbeSettings(deadline=5)).run({"jobs": jobs})
    assert codes(response) == [ErrorCode.NETWORK_POLICY_DENIED.value] * len(hosts)
    assert net.connects == [] and net.blocked == []


@pytest.mark.parametrize("db_type", ["postgresql", "mysql"])
async def test_every_resolved_address_is_checked_and_the_checked_one_is_reached(
    net: Network, pg: PostgresServer, db_type: str, maria: MariaDBServer
) -> None:
    port, user = (pg.port, PG_USER) if db_type == "postgresql" else (maria.port, MARIA_USER)
    net.names.update({
        "mixed.probe.test": ["169.254.169.254", "127.0.0.1"],
        "second.probe.test": ["127.0.0.2", "127.0.0.1"],
        "denied.probe.test": ["169.254.169.254", "fe80::1", "127.0.0.2"],
    })
    policy = NetworkPolicy.build(deny=["127.0.0.2/32"])
    jobs = [{**job(db_type, port, user.name, user.password, id=f"j{i}"), "ip": name}
            for i, name in enumerate(["mixed.probe.test", "second.probe.test",
                                      "denied.probe.test"])]
    response = await Prober(ProbeSettings(deadline=5, policy=policy)).run(
        {"jobs": jobs}, detail=True)
    assert codes(response) == [None, None, ErrorCode.NETWORK_POLICY_DENIED.value]
    assert [r.address for r in response.results[:2]] == [f"127.0.0.1:{port}"] * 2
    assert {host for host, _ in net.connects} == {"127.0.0.1"}


@pytest.mark.parametrize("db_type", ["postgresql", "mysql"])
async def test_the_checked_address_is_connected_to_without_a_second_lookup(
    net: Network, pg: PostgresServer, maria: MariaDBServer, db_type: str
) -> None:
    # DNS rebinding: the first answer is allowed, every later one is denied.
    answers = iter([["127.0.0.1"]])
    net.names["rebind.probe.test"] = lambda: next(answers, ["127.0.0.3"])
    port, user = (pg.port, PG_USER) if db_type == "postgresql" else (maria.port, MARIA_USER)
    body = {**job(db_type, port, user.name, user.password), "ip": "rebind.probe.test"}
    policy = NetworkPolicy.build(deny=["127.0.0.3/32"])
    response = await Prober(ProbeSettings(deadline=5, policy=policy)).run(
        {"jobs": [body]}, detail=True)
    assert codes(response) == [None]
    assert net.lookups == ["rebind.probe.test"]
    assert set(net.connects) == {("127.0.0.1", port)}


async def test_mongodb_re_resolution_is_held_to_the_policy(net: Network) -> None:
    """Known gap, narrowed: PyMongo resolves the seed names again itself (the probe
    hands it names, not the checked addresses). The loop hook now holds what it
    resolves and connects to to the policy, so a rebound name is refused at connect."""
    user = MONGO_USER
    policy = NetworkPolicy.build(deny=["127.0.0.3/32"])
    with MongoWireServer(users=[user]).run_in_thread() as mongo:
        answers = iter([["127.0.0.1"]])
        net.names["rebind.probe.test"] = lambda: next(answers, ["127.0.0.3"])
        net.names["two.probe.test"] = ["127.0.0.3", "127.0.0.1"]
        prober = Prober(ProbeSettings(deadline=3, policy=policy))
        rebound = job("mongodb", f"rebind.probe.test:{mongo.port}", user.name, user.password)
        response = await prober.run({"jobs": [rebound]})
        assert codes(response) == [ErrorCode.NETWORK_POLICY_DENIED.value]
        assert len(net.lookups) >= 2  # the gap: PyMongo looked the name up again
        both = job("mongodb", f"two.probe.test:{mongo.port}", user.name, user.password)
        assert codes(await prober.run({"jobs": [both]})) == [None]
    assert not net.reached("127.0.0.3")


async def test_advertised_replica_set_members_are_held_to_the_policy(net: Network) -> None:
    """A server at an allowed address may advertise members anywhere: PyMongo
    connects to them by itself. They must not be reachable past the policy (else
    any MongoDB-speaking server could aim the prober at any address and port)."""
    user = MONGO_USER
    with (FaultServer("silent") as inside, RefusedPort() as refused,
          MongoWireServer(users=[user], replica_set="rs0").run_in_thread() as mongo):
        mongo.advertised_hosts = [mongo.address, f"127.0.0.2:{inside.port}"]
        policy = NetworkPolicy.build(deny=["127.0.0.2/32"])
        # Two seeds, so PyMongo discovers the set rather than connecting directly.
        body = job("mongodb", f"{mongo.address},127.0.0.1:{refused.port}", user.name,
                   user.password)
        response = await Prober(ProbeSettings(deadline=3, policy=policy)).run(
            {"jobs": [body]}, detail=True)
    assert codes(response) == [None]
    assert response.results[0].replica_set is not None
    assert not net.reached("127.0.0.2") and inside.accepted == 0


async def test_serve_flags_build_the_policy_the_service_applies(
    net: Network, pg: PostgresServer, maria: MariaDBServer, mongo: MongoWireServer
) -> None:
    args = build_parser().parse_args([
        "serve", "--insecure-no-auth", "--deny-cidr", "127.0.0.2/32",
        "--allow-cidr", "127.0.0.0/8", "--allow-ports", f"{pg.port},{maria.port}",
    ])
    config = config_from(options_from(args, {}))
    jobs = [
        job("postgresql", pg.port, PG_USER.name, PG_USER.password, id="allowed-pg"),
        job("mysql", maria.port, MARIA_USER.name, MARIA_USER.password, id="allowed-mysql"),
        job("mongodb", mongo.port, MONGO_USER.name, MONGO_USER.password, id="port-not-listed"),
        {**job("postgresql", pg.port, "u", "p", id="denied-cidr"), "ip": "127.0.0.2"},
        {**job("postgresql", pg.port, "u", "p", id="outside-allow"), "ip": "::1"},
        {**job("postgresql", pg.port, "u", "p", id="default-deny"), "ip": "169.254.169.254"},
    ]
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        resp = await client.post("/v3/p1/jobs/batch-connection", json={"jobs": jobs})
    assert resp.status_code == 200, resp.text
    denied = ErrorCode.NETWORK_POLICY_DENIED.value
    assert [r.get("error_code") for r in resp.json()["results"]] == [
        None, None, denied, denied, denied, denied]
    assert {host for host, _ in net.connects} == {"127.0.0.1"}
    # The same from the environment, as worker processes get it.
    env = {"PROBE_DENY_CIDR": "127.0.0.0/8", "PROBE_INSECURE_NO_AUTH": "1"}
    policy = config_from(options_from(build_parser().parse_args(["serve"]), env)).settings.policy
    assert not policy.allows(ipaddress.ip_address("127.0.0.1"), pg.port)
    assert not policy.allows(ipaddress.ip_address("169.254.169.254"), 80)  # defaults kept


# ================================================================ 2. secret hygiene

CANARY = "cAnArY"
PASSWORD = "cAnArY-pw-9f4e1d"
PASSWORD_UNICODE = "cAnArY-пароль-7d2c"
TOKEN = "cAnArY-tok-3b8a52"
P12_PASSWORD = "cAnArY-p12-c1f0e4"
NOT_A_CERT = b"cAnArY-cert-5e9d07: not a certificate at all"
TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"  # fatal handshake_failure


def pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def secrets_of(pki: TestPKI) -> list[str]:
    """Every string that must never come out: the canaries, the certificates'
    base64 and PEM bodies, and what aiomysql makes of a non-ASCII password."""
    pem = pki.ca_pem().decode()
    p12 = base64.b64encode(pki.ca_pkcs12("right")).decode()
    cert = base64.b64encode(pki.ca_pem()).decode()
    return [
        CANARY, CANARY.lower(), PASSWORD, PASSWORD_UNICODE, TOKEN, P12_PASSWORD,
        PASSWORD_UNICODE.encode().decode("latin-1"), base64.b64encode(NOT_A_CERT).decode()[8:40],
        pem.splitlines()[2], cert[120:160], p12[120:160],
    ]


def assert_clean(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked into {where}: ...{text[-300:]}"


@dataclass
class Echo:
    """Servers that quote the password back (a driver or server echoing it)."""

    denied: FaultServer
    full: FaultServer
    down: FaultServer
    odd: FaultServer
    tls_alert_pg: FaultServer
    kerberos_pg: FaultServer
    secure_transport: FaultServer


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    def answer(number: int, text: str) -> FaultServer:
        return FaultServer("greeting", mysql_greeting(), reply=mysql_error(number, text))

    with (
        answer(1227, f"Access denied; you need the SUPER privilege (password {PASSWORD})")
        as denied,
        answer(1040, f"Too many connections for password={PASSWORD}") as full,
        answer(1053, f"Server shutdown in progress ({PASSWORD_UNICODE})") as down,
        answer(1999, f"something odd about {PASSWORD}") as odd,
        FaultServer("greeting", b"", replies=[b"S", TLS_ALERT]) as tls_alert_pg,
        FaultServer("greeting", b"", reply=pg_message(b"R", struct.pack("!i", 2)))
        as kerberos_pg,
        answer(3159, f"Connections using insecure transport are prohibited {PASSWORD}")
        as secure_transport,
    ):
        yield Echo(denied, full, down, odd, tls_alert_pg, kerberos_pg, secure_transport)


def canary_jobs(pki: TestPKI, pg: PostgresServer, pg_tls: PostgresServer,
                maria: MariaDBServer, mongo: MongoWireServer, faults: Faults, echo: Echo,
                *, dns: bool = True) -> list[tuple[dict[str, Any], str]]:
    """One job per failure class that can be produced here, each with the canary
    password (and certificate material): (job, expected code)."""
    ca = pki.ca_pem()
    p12 = pki.ca_pkcs12("right")
    C = ErrorCode
    cases: list[tuple[dict[str, Any], ErrorCode]] = [
        (job("mysql", faults.refused.port, "u", PASSWORD), C.CONNECTION_REFUSED),
        (job("postgresql", faults.blackhole.port, "u", PASSWORD), C.CONNECT_TIMEOUT),
        (job("postgresql", faults.reset.port, "u", PASSWORD), C.CONNECTION_RESET),
        (job("mysql", faults.silent.port, "u", PASSWORD), C.HANDSHAKE_TIMEOUT),
        (job("postgresql", faults.garbage.port, "u", PASSWORD), C.PROTOCOL_MISMATCH),
        ({**job("postgresql", pg.port, "u", PASSWORD), "ip": "169.254.169.254"},
         C.NETWORK_POLICY_DENIED),
        (job("postgresql", pg.port, "u", PASSWORD,
             **tls_fields(NOT_A_CERT, "cAnArY.pem")), C.SSL_CERT_INVALID),
        (job("mysql", maria.port, "u", PASSWORD,
             **tls_fields(p12, "ca.p12", password=P12_PASSWORD)), C.SSL_CERT_INVALID),
        (job("mongodb", mongo.port, "u", PASSWORD,
             **tls_fields(ca, checksum=sha256_hex(p12))), C.SSL_CHECKSUM_MISMATCH),
        (job("postgresql", echo.tls_alert_pg.port, "u", PASSWORD, **tls_fields(ca)),
         C.SSL_HANDSHAKE_FAILED),
        (job("postgresql", pg_tls.port, PG_USER.name, PASSWORD,
             **tls_fields(pki.ca_pem("other"))), C.SSL_VERIFY_FAILED),
        (job("postgresql", pg.port, PG_USER.name, PASSWORD, **tls_fields(ca)),
         C.SSL_NOT_ENABLED_ON_SERVER),
        (job("mysql", maria.port, MARIA_USER.name, PASSWORD_UNICODE,
             **tls_fields(p12, "ca.p12", password="right")), C.SSL_NOT_ENABLED_ON_SERVER),
        (job("postgresql", pg_tls.port, PG_USER.name, PASSWORD), C.SSL_REQUIRED_BY_SERVER),
        (job("mysql", echo.secure_transport.port, "u", PASSWORD), C.SSL_REQUIRED_BY_SERVER),
        (job("postgresql", pg.port, PG_USER.name, PASSWORD), C.AUTH_FAILED),
        (job("mysql", maria.port, MARIA_USER.name, PASSWORD_UNICODE), C.AUTH_FAILED),
        (job("mongodb", mongo.port, MONGO_USER.name, PASSWORD), C.AUTH_FAILED),
        (job("postgresql", echo.kerberos_pg.port, "u", PASSWORD), C.AUTH_METHOD_UNSUPPORTED),
        (job("postgresql", pg.port, PG_USER.name, PG_USER.password, db_name="no_such_db"),
         C.DATABASE_NOT_FOUND),
        (job("mysql", echo.denied.port, "u", PASSWORD), C.ACCESS_DENIED),
        (job("mysql", echo.full.port, "u", PASSWORD), C.TOO_MANY_CONNECTIONS),
        (job("mysql", echo.down.port, "u", PASSWORD_UNICODE), C.SERVER_UNAVAILABLE),
        (job("mongodb", f"127.0.0.1:{faults.refused.port},127.0.0.1:{faults.reset.port}",
             "u", PASSWORD), C.NO_REACHABLE_MEMBER),
        (job("mysql", echo.odd.port, "u", PASSWORD), C.INTERNAL),
        ({"id": "invalid", "db_type": "nosql", "db_password": PASSWORD}, C.PARAMETER_EMPTY),
        ({**job("mysql", 1, "u", PASSWORD), "db_port": PASSWORD}, C.PARAMETER_INVALID),
    ]
    if dns:
        cases.append(({**job("mysql", 3306, "u", PASSWORD), "ip": "nowhere.probe.test"},
                      C.DNS_FAILURE))
    return [({**body, "id": f"c{i}"} if body.get("id") != "invalid" else body, code.value)
            for i, (body, code) in enumerate(cases)]


FAST = ProbeSettings(deadline=2, connect_timeout=0.5)
LOGGERS = ("probe", "asyncpg", "aiomysql", "pymongo", "asyncio", "uvicorn", "httpx")


def debug_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


class BuggyChecker(Checker):
    """A checker whose driver raises with the password in its message."""

    name = "mysql"
    default_port = 3306

    async def check(self, target: Target, trace: Trace) -> Facts:
        raise RuntimeError(f"driver bug: dsn=mysql://u:{target.password}@h/db")


async def test_a_password_typed_into_another_field_is_masked(pg: PostgresServer) -> None:
    # A job whose db_name is its (correct) password: the server says the database
    # does not exist, and the answer names db_name without echoing it.
    body = job("postgresql", pg.port, PG_USER.name, PG_USER.password, db_name=PG_USER.password)
    result = (await Prober(FAST).run({"jobs": [body]})).results[0]
    assert result.error_code == ErrorCode.DATABASE_NOT_FOUND.value
    assert PG_USER.password not in (result.error_msg or "") and "***" in (result.error_msg or "")


async def test_a_password_typed_as_the_host_is_masked(net: Network, faults: Faults) -> None:
    # The resolver answers a name lowercased; the batch deadline answers jobs it
    # never started from the job's own label: neither may echo the password.
    net.names["canary-pw-7731"] = ["127.0.0.1"]
    canary = {**job("mysql", faults.refused.port, "u", "Canary-Pw-7731"), "ip": "Canary-Pw-7731"}
    blackhole = job("mysql", faults.blackhole.port, "u", "p", id="first")
    ran = await Prober(FAST).run({"jobs": [canary]})
    settings = ProbeSettings(deadline=2, concurrency=1, batch_deadline=0.3)
    cut = await Prober(settings).run({"jobs": [blackhole, canary]})
    answers = [ran.results[0], cut.results[1]]
    assert [r.error_code for r in answers] == [ErrorCode.CONNECTION_REFUSED.value,
                                               ErrorCode.INTERNAL.value], answers
    for result in answers:
        assert "canary-pw-7731" not in (result.error_msg or "").lower(), result
    assert "testing ***:" in (cut.results[1].error_msg or ""), cut.results[1]


async def test_no_secret_leaves_the_library(
    net: Network, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    pki: TestPKI, pg: PostgresServer, pg_tls: PostgresServer, maria: MariaDBServer,
    mongo: MongoWireServer, faults: Faults, echo: Echo,
) -> None:
    debug_everything(caplog)
    secrets = secrets_of(pki)
    cases = canary_jobs(pki, pg, pg_tls, maria, mongo, faults, echo)
    batch = {"jobs": [body for body, _ in cases]}

    async def answer(lang: str) -> None:
        response = await Prober(FAST).run(batch, detail=True, lang=lang)
        assert codes(response) == [code for _, code in cases]  # every class was produced
        text = json.dumps(response.to_json(), ensure_ascii=False) + repr(response)
        assert_clean(text, secrets, f"the {lang} results")

    # The failures themselves, as a library user would log them.
    async def show(body: dict[str, Any]) -> None:
        outcome = await Prober(FAST).probe(Endpoint.model_validate(body))
        assert outcome.failure is not None
        shown = [repr(outcome), str(outcome.failure), repr(outcome.failure),
                 "".join(traceback.format_exception(outcome.failure))]
        for lang in ("en-us", "zh-cn"):
            shown.append(outcome.failure.message(lang))
        assert_clean("\n".join(shown), secrets, f"the failure of {body['id']}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer, "en-us")
        tg.start_soon(answer, "zh-cn")
        for body, code in cases:
            if not code.startswith("DRS.M"):
                tg.start_soon(show, body)

    buggy = await Prober(FAST, checkers={"mysql": BuggyChecker()}).run(
        {"jobs": [job("mysql", 1, "u", PASSWORD)]})
    assert codes(buggy) == [ErrorCode.INTERNAL.value]
    with pytest.raises(RequestInvalid) as caught:
        await Prober(FAST).run({"jobs": [body for body, _ in cases]}, strict=True)
    shown = [repr(caught.value), str(caught.value), caught.value.message("zh-cn"),
             "".join(traceback.format_exception(caught.value))]
    assert_clean("\n".join(shown), secrets, "the strict-mode exception")

    out = capsys.readouterr()
    assert_clean(out.out + out.err, secrets, "stdout/stderr")
    assert_clean(logged(caplog), secrets, "the DEBUG log")
    assert any(r.name.startswith("pymongo") for r in caplog.records)  # DEBUG really was on
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)


def test_no_secret_in_the_repr_of_any_model(pki: TestPKI) -> None:
    secrets = secrets_of(pki)
    raw = job("mysql", 3306, "u", PASSWORD, **tls_fields(pki.ca_pkcs12("right"), "ca.p12",
                                                         password=P12_PASSWORD))
    endpoint = Endpoint.model_validate(raw)
    material = MaterialCache().load(raw["ssl_cert_key"], "ca.p12", raw["ssl_cert_check_sum"],
                                    "right")
    target = Target(db_type="mysql", hosts=endpoint.hosts(), user="u", password=PASSWORD,
                    database=None, tls=material)
    request = BatchConnectionRequest(jobs=[endpoint])
    failure = ProbeFailure(ErrorCode.AUTH_FAILED, target="127.0.0.1:3306")
    outcome = Outcome(None, failure, 1.0, {"login": 1.0})
    result = outcome.result(endpoint, "en-us", detail=True)
    options = ServeOptions(tokens_file="/etc/probe/tokens.json")
    config = ServiceConfig(tokens=TokenTable({TOKEN: "*"}))
    with pytest.raises(ValueError) as caught:  # pydantic's ValidationError
        Endpoint.model_validate({**raw, "db_port": PASSWORD, "ssl_cert_check_sum": PASSWORD})
    validation = f"{caught.value!r}\n{caught.value}"
    shown = [
        repr(endpoint), str(endpoint), endpoint.model_dump_json(),
        json.dumps(endpoint.model_dump(mode="json")), repr(endpoint.model_dump()),
        repr(request), request.model_dump_json(), repr(target), str(target), repr(material),
        repr(result), repr(outcome), repr(options), repr(config), repr(config.tokens),
        repr(parse_jobs({"jobs": [raw, {**raw, "db_type": "x"}]})), validation,
        repr(CheckJobResp(id="x", status="failed", success=False)),
    ]
    assert_clean("\n".join(shown), secrets, "a repr")


def run_cli(args: list[str], stdin: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    env = {k: v for k, v in env.items() if not k.startswith("PROBE_")}
    return subprocess.run([sys.executable, "-m", "probe.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_no_secret_leaves_the_cli(
    tmp_path: Path, pki: TestPKI, pg: PostgresServer, pg_tls: PostgresServer,
    maria: MariaDBServer, mongo: MongoWireServer, faults: Faults, echo: Echo,
) -> None:
    secrets = secrets_of(pki)
    # No names here: a subprocess has no loopback guard, and must not ask the resolver.
    cases = canary_jobs(pki, pg, pg_tls, maria, mongo, faults, echo, dns=False)
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"jobs": [body for body, _ in cases]}), encoding="utf-8")
    fast = ["--timeout", "1.5", "--connect-timeout", "0.5"]
    runs = [
        run_cli(["run", str(batch), "--detail", *fast]),
        run_cli(["run", "-", "--format", "table", "--lang", "zh-cn", *fast],
                stdin=batch.read_text()),
        run_cli(["run", str(batch), "--strict", *fast]),
    ]
    assert [r.returncode for r in runs] == [1, 1, 2], [r.stderr[-500:] for r in runs]
    answered = json.loads(runs[0].stdout)["results"]
    assert [r.get("error_code") for r in answered] == [code for _, code in cases]
    for run in runs:
        assert "Traceback" not in run.stderr
        assert_clean(run.stdout + run.stderr, secrets, f"probe {' '.join(run.args[3:5])}")


async def test_no_secret_leaves_the_http_service(
    net: Network, caplog: pytest.LogCaptureFixture, pki: TestPKI, pg: PostgresServer,
    pg_tls: PostgresServer, maria: MariaDBServer, mongo: MongoWireServer, faults: Faults,
    echo: Echo,
) -> None:
    debug_everything(caplog)
    secrets = secrets_of(pki)
    cases = [(b, c) for b, c in canary_jobs(pki, pg, pg_tls, maria, mongo, faults, echo)
             if not c.startswith("DRS.M")]
    config = ServiceConfig(tokens=TokenTable({TOKEN: ["p1"]}), settings=FAST)
    transport = httpx.ASGITransport(app=create_app(config))
    bodies: list[str] = []
    url = "/v3/p1/jobs/batch-connection"

    async def client_in(lang: str) -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
            headers = {"X-Auth-Token": TOKEN, "X-Language": lang}
            resp = await client.post(url, json={"jobs": [b for b, _ in cases]},
                                     headers=headers, params={"detail": "true"})
            assert resp.status_code == 200, resp.text
            assert [r.get("error_code") for r in resp.json()["results"]] == [
                c for _, c in cases]
            bodies.append(resp.text)
            # 400s with the secrets in the offending fields, 401/403 with a canary token.
            for bad in ({"jobs": [{**cases[0][0], "db_type": PASSWORD}]},
                        {"jobs": [{**cases[0][0], "db_port": PASSWORD,
                                   "ssl_cert_password": P12_PASSWORD}]},
                        {"jobs": [cases[6][0], {"id": PASSWORD}]}):
                resp = await client.post(url, json=bad, headers=headers)
                assert resp.status_code == 400
                bodies.append(resp.text)
            for token, project in ((TOKEN + "x", "p1"), (TOKEN, "p2"), (PASSWORD, "p1")):
                resp = await client.post(f"/v3/{project}/jobs/batch-connection",
                                         json={"jobs": [cases[0][0]]},
                                         headers={"X-Auth-Token": token, "X-Language": lang})
                assert resp.status_code in (401, 403)
                bodies.append(resp.text)
            bodies.append((await client.get("/metrics")).text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(client_in, "en-us")
        tg.start_soon(client_in, "zh-cn")
    assert_clean("\n".join(bodies), secrets, "an HTTP body")
    assert_clean(logged(caplog), secrets, "the DEBUG log")


# ================================================================ 7. input limits


@asynccontextmanager
async def traced() -> AsyncIterator[Callable[[], int]]:
    gc.collect()
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MiB = 1024 * 1024


async def test_a_16_mib_body_is_answered_with_bounded_memory(net: Network, faults: Faults) -> None:
    """The default body limit, filled: 1,000 jobs (the default batch limit) padded
    with long unknown fields to just under 16 MiB; one byte more is refused."""
    config = ServiceConfig(tokens=None, settings=ProbeSettings(deadline=5))
    assert (config.max_body, config.max_jobs) == (16 * MiB, 1000)
    jobs = [job("mysql", faults.refused.port, f"user{i}", "pw", id=f"j{i}") for i in range(1000)]
    empty = len(json.dumps({"jobs": [{**j, "pad": ""} for j in jobs]}))
    pad = (16 * MiB - empty) // 1000
    body = json.dumps({"jobs": [{**j, "pad": "x" * pad} for j in jobs]}).encode()
    assert 16 * MiB - 1000 < len(body) <= 16 * MiB
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://probe",
                                 timeout=60) as client:
        url = "/v3/p1/jobs/batch-connection"
        headers = {"Content-Type": "application/json"}
        async with traced() as peak:
            resp = await client.post(url, content=body, headers=headers)
            used = peak()
        assert resp.status_code == 200, resp.text[:300]
        results = resp.json()["results"]
        assert [r["id"] for r in results] == [f"j{i}" for i in range(1000)]
        assert {r["error_code"] for r in results} == {ErrorCode.CONNECTION_REFUSED.value}
        assert used < 8 * len(body), f"{used / MiB:.0f} MiB for a 16 MiB body"

        too_big = body[:-1] + b" " * (16 * MiB - len(body) + 1) + b"}"
        resp = await client.post(url, content=too_big, headers=headers)
        assert resp.status_code == 400 and resp.json()["error_code"] == "DRS.M00202"

        async def endless() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            yield b'{"jobs": ["'
            for _ in range(64):
                yield b"x" * MiB

        async with traced() as peak:
            resp = await client.post(url, content=endless(), headers=headers)
            used = peak()
        assert resp.status_code == 400 and resp.json()["error_code"] == "DRS.M00202"
        assert used < 24 * MiB, f"{used / MiB:.0f} MiB to refuse a 64 MiB body"


async def test_a_thousand_jobs_share_one_500_kib_certificate(
    net: Network, pki: TestPKI, pg_tls: PostgresServer, faults: Faults
) -> None:
    """One SSLContext for all of them, memory that does not grow with the number
    of jobs, and the right answer from each."""
    ca, other = pki.ca_pem(), pki.ca_pem("other")
    bundle = other * ((MAX_CERT_BYTES - len(ca)) // len(other)) + ca
    assert MAX_CERT_BYTES - len(other) < len(bundle) <= MAX_CERT_BYTES
    fields = tls_fields(bundle, "bundle.pem")  # one string, shared by every job
    jobs = [job("postgresql" if i % 2 else "mysql", faults.refused.port, f"user{i}", "pw",
                id=f"j{i}", **fields) for i in range(995)]
    jobs += [job("postgresql", pg_tls.port, PG_USER.name, PG_USER.password, db_name="appdb",
                 id=f"live{i}", **fields) for i in range(5)]
    prober = Prober(ProbeSettings(deadline=10))
    async with traced() as peak:
        started = time.monotonic()
        response = await prober.run({"jobs": jobs})
        elapsed = time.monotonic() - started
        used = peak()
    assert prober.materials.built == 1
    assert codes(response) == [ErrorCode.CONNECTION_REFUSED.value] * 995 + [None] * 5
    assert used < 64 * MiB, f"{used / MiB:.0f} MiB"  # 1,000 copies would be 680 MiB
    assert elapsed < 20


@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("id", ErrorCode.PARAMETER_INVALID), ("net_type", ErrorCode.PARAMETER_INVALID),
        ("db_type", ErrorCode.PARAMETER_INVALID), ("ip", ErrorCode.PARAMETER_INVALID),
        ("db_user", ErrorCode.PARAMETER_INVALID), ("db_name", ErrorCode.PARAMETER_INVALID),
        ("db_password", ErrorCode.AUTH_FAILED), ("end_point_type", ErrorCode.PARAMETER_INVALID),
        ("inst_id", None), ("unknown_field", None), ("ssl_cert_name", None),
    ],
)
async def test_very_long_strings_get_a_correct_answer(
    net: Network, pg: PostgresServer, maria: MariaDBServer, field: str, code: ErrorCode | None
) -> None:
    long = "x" * (4 * MiB)
    bodies = [job("postgresql", pg.port, PG_USER.name, PG_USER.password, db_name="appdb"),
              job("mysql", maria.port, MARIA_USER.name, MARIA_USER.password)]
    for body in bodies:
        body[field] = long
    response = await Prober(ProbeSettings(deadline=5)).run({"jobs": bodies})
    expected = code.value if code is not None else None
    assert codes(response) == [expected, expected]
    for result in response.results:
        assert len(result.model_dump_json()) < 1000  # never echoed


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"db_name": "d" * 100}, ErrorCode.DATABASE_NOT_FOUND),  # MySQL: no such name (1102)
        ({"db_name": "d" * 1024}, ErrorCode.DATABASE_NOT_FOUND),
        ({"db_user": "u" * 1024}, ErrorCode.AUTH_FAILED),
        ({"db_user": "u" * 1025}, ErrorCode.PARAMETER_INVALID),
        ({"db_user": "probe\0database\0postgres"}, ErrorCode.PARAMETER_INVALID),  # NUL
        ({"db_name": "appdb\0options\0-c log_connections=off"}, ErrorCode.PARAMETER_INVALID),
        ({"db_password": "\ud800 lone surrogate"}, ErrorCode.PARAMETER_INVALID),
        ({"db_password": "p" * (MiB // 4)}, ErrorCode.AUTH_FAILED),
    ],
)
@pytest.mark.parametrize("db_type", ["postgresql", "mysql", "mongodb"])
async def test_long_and_odd_names_are_bad_values_not_network_faults(
    net: Network, pg: PostgresServer, maria: MariaDBServer, mongo: MongoWireServer,
    db_type: str, change: dict[str, str], code: ErrorCode,
) -> None:
    server, user = {"postgresql": (pg.port, PG_USER), "mysql": (maria.port, MARIA_USER),
                    "mongodb": (mongo.port, MONGO_USER)}[db_type]
    body = {**job(db_type, server, user.name, user.password), **change}
    response = await Prober(ProbeSettings(deadline=5)).run({"jobs": [body]})
    expected = code
    if db_type != "mysql" and code is ErrorCode.DATABASE_NOT_FOUND:
        # PostgreSQL says so for any name; the MongoDB auth database is checked by the
        # login, which fails for a user that does not live there.
        expected = (ErrorCode.DATABASE_NOT_FOUND if db_type == "postgresql"
                    else ErrorCode.AUTH_FAILED)
    assert codes(response) == [expected.value]


async def test_deep_json_is_refused_cleanly_everywhere(net: Network, tmp_path: Path,
                                                       faults: Faults) -> None:
    deep = b'{"jobs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    nested = {"x": [[[[[[[[[[[]]]]]]]]]]]}
    for _ in range(500):  # inside a valid job, within what JSON decoding allows
        nested = {"x": nested}
    valid = {**job("mysql", faults.refused.port, "u", "p"), "extra": nested}
    config = ServiceConfig(tokens=None)
    transport = httpx.ASGITransport(app=create_app(config))
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        url = "/v3/p1/jobs/batch-connection"
        resp = await client.post(url, content=deep, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error_code"] == "DRS.M00200"
        resp = await client.post(url, json={"jobs": [valid]})
        assert resp.status_code == 200
        assert resp.json()["results"][0]["error_code"] == ErrorCode.CONNECTION_REFUSED.value
    # The library takes the Python objects as they are.
    deep_value: Any = []
    for _ in range(100_000):
        deep_value = [deep_value]
    response = await Prober().run({"jobs": [{**valid, "db_name": deep_value}, valid]})
    assert codes(response) == [ErrorCode.PARAMETER_INVALID.value,
                               ErrorCode.CONNECTION_REFUSED.value]
    # The CLI: one line and exit 2, not a RecursionError traceback.
    path = tmp_path / "deep.json"
    path.write_bytes(deep)
    for args, stdin in ((["run", str(path)], None), (["run", "-"], deep.decode())):
        run = run_cli(args, stdin=stdin)
        assert run.returncode == 2, run.stderr[-500:]
        assert run.stderr.startswith("probe: DRS.M00200") and run.stderr.count("\n") == 1


def test_guard_names_are_never_sent_to_the_system_resolver() -> None:
    """The guard itself: unknown names fail without asking anyone."""
    net = Network({"known.probe.test": ["127.0.0.1"]})
    assert net.answer("known.probe.test", 5432, 0)[0][4] == ("127.0.0.1", 5432)
    with pytest.raises(socket.gaierror):
        net.answer("unknown.probe.test", 5432, 0)
    with pytest.raises(OSError):
        net.attempt("169.254.169.254", 80, "test")
    assert net.blocked and not net.connects
