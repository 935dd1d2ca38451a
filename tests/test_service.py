"""The HTTP service against the real thing: uvicorn on a free loopback port, driven by httpx.

Every rule of CONTRACT.md's HTTP section, in both languages; the seed's example
bodies pointed at the local servers; 50 concurrent clients; a client disconnect
cancelling its probes; the startup rules of ``probe serve``; ``/openapi.json``
against the contract's field tables. Nothing here leaves 127.0.0.0/8.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from probe import cli
from probe.errors import ErrorCode, render
from probe.models import DB_TYPES
from probe.runner import ProbeSettings
from probe.service import (
    OPTIONS_ENV,
    ConfigError,
    ServeOptions,
    ServiceConfig,
    ServiceMetrics,
    TokenTable,
    config_from,
    create_app,
    options_from,
    worker_app,
)
from probe.tasks import InMemoryTaskStates, TaskState
from probe.testing.faults import free_port
from probe.testing.mariadb import MariaDBServer
from probe.testing.mongo_wire import MongoWireServer
from probe.testing.postgres import PostgresServer
from tests.conftest import MARIA_USER, MONGO_USER, PG_USER, Faults, job
from tests.test_models import seed_examples

# A copy of shared/CONTRACT.md (tests/test_contract_copies.py keeps it honest).
CONTRACT = Path(__file__).resolve().parent / "data" / "CONTRACT.md"
PROJECT = "054ba152d480d55b2f5dc0069e7ddef0"
OTHER_PROJECT = "0549a6a31000d4e82fd1c00c3d6f2d76"
TOKEN_ALL = "tok-all-7f1c9a"
TOKEN_ONE = "tok-one-b2e4d0"
TOKENS: dict[str, Any] = {TOKEN_ALL: "*", TOKEN_ONE: [PROJECT]}
PATH = f"/v3/{PROJECT}/jobs/batch-connection"
MAX_JOBS = 30
MAX_BODY = 64 * 1024
LANGS = ("en-us", "zh-cn")


# ---------------------------------------------------------------- the live server


class LiveServer:
    """A uvicorn server for `app` on a free 127.0.0.1 port, on its own thread."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_config(**overrides: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "tokens": TokenTable(TOKENS),
        "settings": ProbeSettings(deadline=20, connect_timeout=5, per_host=32),
        "max_jobs": MAX_JOBS,
        "max_body": MAX_BODY,
    }
    values.update(overrides)
    return ServiceConfig(**values)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_app(make_config())) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def post(
    client: httpx.Client,
    body: Any,
    *,
    token: str | None = TOKEN_ALL,
    project: str = PROJECT,
    lang: str | None = None,
    content_type: str | None = "application/json",
    params: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {}
    if token is not None:
        headers["X-Auth-Token"] = token
    if lang is not None:
        headers["X-Language"] = lang
    if content_type is not None:
        headers["Content-Type"] = content_type
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"/v3/{project}/jobs/batch-connection", content=content,
                       headers=headers, params=params)


def assert_error(resp: httpx.Response, status: int, code: ErrorCode, lang: str = "en-us") -> str:
    """The response is an error body with `code` in `lang`; returns its message."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error_code", "error_msg"}
    assert body["error_code"] == code.value
    if lang == "zh-cn":
        assert re.search(r"[\u4e00-\u9fff]", body["error_msg"]), body["error_msg"]
    else:
        assert body["error_msg"].isascii(), body["error_msg"]
    return str(body["error_msg"])


def metrics(client: httpx.Client) -> str:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def pg_job(pg: PostgresServer, **extra: Any) -> dict[str, Any]:
    return job("postgresql", pg.port, PG_USER.name, PG_USER.password, **extra)


def bad_job(**extra: Any) -> dict[str, Any]:
    """A valid job whose probe fails at once (refused), without any server."""
    return {**job("mysql", 1, "root", "pw-refused"), **extra}


# ---------------------------------------------------------------- simple routes


def test_healthz_openapi_metrics_need_no_token(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert "probe_probes_in_flight" in resp.text


@pytest.mark.parametrize("lang", LANGS)
def test_unknown_api_and_method_are_json(client: httpx.Client, lang: str) -> None:
    resp = client.get("/v3/x/nothing", headers={"X-Language": lang})
    assert resp.status_code == 404 and set(resp.json()) == {"error_code", "error_msg"}
    assert resp.json()["error_code"] == "APIGW.0101"
    resp = client.get(PATH, headers={"X-Language": lang})
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error_code"] == "APIGW.0101"
    # a trailing slash is another path, not a redirect without a body
    resp = client.post(PATH + "/", json={"jobs": []}, headers={"X-Language": lang})
    assert resp.status_code == 404 and resp.json()["error_code"] == "APIGW.0101"


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("token", [None, "", "tok-all-7f1c9", "TOK-ALL-7F1C9A", "x" * 5000])
def test_missing_or_unknown_token_is_401(client: httpx.Client, token: str | None,
                                          lang: str) -> None:
    resp = post(client, {"jobs": [bad_job()]}, token=token, lang=lang)
    msg = assert_error(resp, 401, ErrorCode.INVALID_TOKEN, lang)
    assert msg == render(ErrorCode.INVALID_TOKEN, lang)  # type: ignore[arg-type]
    if token:
        assert token.strip() not in resp.text


@pytest.mark.parametrize("lang", LANGS)
def test_token_not_allowed_for_project_is_403(client: httpx.Client, lang: str) -> None:
    resp = post(client, {"jobs": [bad_job()]}, token=TOKEN_ONE, project=OTHER_PROJECT, lang=lang)
    msg = assert_error(resp, 403, ErrorCode.PROJECT_FORBIDDEN, lang)
    assert msg == render(ErrorCode.PROJECT_FORBIDDEN, lang)  # type: ignore[arg-type]
    assert TOKEN_ONE not in resp.text
    assert post(client, {"jobs": [bad_job()]}, token=TOKEN_ONE).status_code == 200
    assert post(client, {"jobs": [bad_job()]}, project=OTHER_PROJECT).status_code == 200


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("project", ["a" * 65, "bad_id", "bad.id", "%20", "a%2Fb", "", "é",
                                     "%0A", "abc%0A", "a/b"])
def test_invalid_project_id_is_403(client: httpx.Client, project: str, lang: str) -> None:
    resp = post(client, {"jobs": [bad_job()]}, project=project, lang=lang)
    msg = assert_error(resp, 403, ErrorCode.INVALID_PROJECT_ID, lang)
    assert msg == render(ErrorCode.INVALID_PROJECT_ID, lang)  # type: ignore[arg-type]


def test_auth_comes_before_the_project_id(client: httpx.Client) -> None:
    assert_error(post(client, {}, token=None, project="bad_id"), 401, ErrorCode.INVALID_TOKEN)
    assert post(client, {"jobs": [bad_job()]}, project="a" * 64).status_code == 200


# ---------------------------------------------------------------- request validation


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("ctype", [None, "text/plain", "application/jsonx",
                                   "application/x-www-form-urlencoded", "json"])
def test_content_type_must_be_json(client: httpx.Client, ctype: str | None, lang: str) -> None:
    resp = post(client, {"jobs": [bad_job()]}, content_type=ctype, lang=lang)
    assert "Content-Type" in assert_error(resp, 400, ErrorCode.PARAMETER_INVALID, lang)


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON",
                                   "application/json;charset=UTF-8"])
def test_content_type_parameters_are_fine(client: httpx.Client, ctype: str) -> None:
    assert post(client, {"jobs": [bad_job()]}, content_type=ctype).status_code == 200


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"\xff\xfe{}", b'{"jobs": NaN}', b"[]", b'"jobs"', b"null",
     b"[" * 60000, b'{"jobs": [' + b"{" * 30000 + b"]}"],
    ids=["empty", "open-brace", "text", "not-utf8", "nan", "array", "string", "null",
         "deep-array", "deep-object"],
)
def test_malformed_body_is_400_m00200(client: httpx.Client, raw: bytes, lang: str) -> None:
    msg = assert_error(post(client, raw, lang=lang), 400, ErrorCode.MALFORMED_BODY, lang)
    prefix = "Parameter error" if lang == "en-us" else "参数错误"
    assert msg.startswith(prefix)


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("body", [{}, {"jobs": []}, {"jobs": None}, {"job": [{}]}])
def test_missing_or_empty_jobs_is_400_m00201(client: httpx.Client, body: Any, lang: str) -> None:
    msg = assert_error(post(client, body, lang=lang), 400, ErrorCode.PARAMETER_EMPTY, lang)
    assert msg == ("The parameter jobs is empty." if lang == "en-us" else "参数 jobs 为空。")


@pytest.mark.parametrize("lang", LANGS)
def test_invalid_field_is_400_m00202_naming_the_path(
    client: httpx.Client, server: LiveServer, lang: str
) -> None:
    probes_before = sample(metrics(client), "probe_probes_total")
    jobs = [bad_job(id="a"), bad_job(id="b"), bad_job(id="c", db_type="oracle")]
    msg = assert_error(post(client, {"jobs": jobs}, lang=lang), 400,
                       ErrorCode.PARAMETER_INVALID, lang)
    assert "jobs[2].db_type" in msg and "oracle" not in msg
    # All or nothing: the valid jobs were not probed either.
    assert sample(metrics(client), "probe_probes_total") == probes_before


@pytest.mark.parametrize(
    ("change", "code", "path"),
    [
        ({"db_user": ...}, ErrorCode.PARAMETER_EMPTY, "jobs[1].db_user"),
        ({"db_password": ...}, ErrorCode.PARAMETER_EMPTY, "jobs[1].db_password"),
        ({"net_type": "lan"}, ErrorCode.PARAMETER_INVALID, "jobs[1].net_type"),
        ({"db_port": 70000}, ErrorCode.PARAMETER_INVALID, "jobs[1].db_port"),
        ({"db_port": "3306"}, ErrorCode.PARAMETER_INVALID, "jobs[1].db_port"),
        ({"id": "has space"}, ErrorCode.PARAMETER_INVALID, "jobs[1].id"),
        ({"ip": "10.0.0.1:3306"}, ErrorCode.PARAMETER_INVALID, "jobs[1].ip"),
        ({"ssl_link": True}, ErrorCode.PARAMETER_EMPTY, "jobs[1].ssl_cert_key"),
        ({"end_point_type": "xx"}, ErrorCode.PARAMETER_INVALID, "jobs[1].end_point_type"),
    ],
)
def test_each_invalid_job_field(client: httpx.Client, change: dict[str, Any], code: ErrorCode,
                                path: str) -> None:
    second = {k: v for k, v in {**bad_job(), **change}.items() if v is not ...}
    resp = post(client, {"jobs": [bad_job(), second]})
    assert path in assert_error(resp, 400, code)
    assert "pw-refused" not in resp.text


def test_jobs_not_an_array(client: httpx.Client) -> None:
    msg = assert_error(post(client, {"jobs": {"0": bad_job()}}), 400, ErrorCode.PARAMETER_INVALID)
    assert "jobs" in msg
    msg = assert_error(post(client, {"jobs": [bad_job(), "x"]}), 400, ErrorCode.PARAMETER_INVALID)
    assert "jobs[1]" in msg


@pytest.mark.parametrize("lang", LANGS)
def test_batch_size_limit(client: httpx.Client, lang: str) -> None:
    jobs = [bad_job(id=f"j{i}") for i in range(MAX_JOBS + 1)]
    msg = assert_error(post(client, {"jobs": jobs}, lang=lang), 400,
                       ErrorCode.PARAMETER_INVALID, lang)
    assert "jobs" in msg and str(MAX_JOBS) in msg
    resp = post(client, {"jobs": jobs[:MAX_JOBS]})
    assert resp.status_code == 200 and resp.json()["count"] == MAX_JOBS


@pytest.mark.parametrize("lang", LANGS)
def test_body_size_limit_declared_and_streamed(server: LiveServer, lang: str) -> None:
    padding = "x" * MAX_BODY
    big = json.dumps({"jobs": [bad_job()], "pad": padding}).encode()
    headers = {"X-Auth-Token": TOKEN_ALL, "Content-Type": "application/json", "X-Language": lang}
    with httpx.Client(base_url=server.url) as c:
        resp = c.post(PATH, content=big, headers=headers)  # Content-Length says it all
        assert str(MAX_BODY) in assert_error(resp, 400, ErrorCode.PARAMETER_INVALID, lang)

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to trust
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    with httpx.Client(base_url=server.url) as c:
        resp = c.post(PATH, content=chunks(), headers=headers)
        assert "content-length" not in resp.request.headers
        assert str(MAX_BODY) in assert_error(resp, 400, ErrorCode.PARAMETER_INVALID, lang)
    small = json.dumps({"jobs": [bad_job()], "pad": "x" * (MAX_BODY - 500)}).encode()
    with httpx.Client(base_url=server.url) as c:
        assert c.post(PATH, content=iter([small]), headers=headers).status_code == 200


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    resp = post(client, {"jobs": [bad_job(colour="blue")], "trace": {"x": 1}})
    assert resp.status_code == 200


# ---------------------------------------------------------------- answers


def test_results_in_request_order_with_exactly_the_contract_fields(
    client: httpx.Client, pg: PostgresServer
) -> None:
    jobs = [pg_job(pg, id="ok-1"), bad_job(id="refused"),
            pg_job(pg, id="ok-2", end_point_type="ta"),
            pg_job(pg, id="wrong-pw", db_password="definitely-wrong-pw")]
    resp = post(client, {"jobs": jobs})
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"results", "count"} and body["count"] == 4
    results = body["results"]
    assert [r["id"] for r in results] == ["ok-1", "refused", "ok-2", "wrong-pw"]
    assert results[0] == {"id": "ok-1", "status": "success", "success": True}
    assert results[1]["error_code"] == ErrorCode.CONNECTION_REFUSED.value
    assert set(results[1]) == {"id", "status", "success", "error_code", "error_msg"}
    assert results[1]["status"] == "failed" and results[1]["success"] is False
    assert results[3]["error_code"] == ErrorCode.AUTH_FAILED.value
    assert f"127.0.0.1:{pg.port}" in results[3]["error_msg"]
    assert "definitely-wrong-pw" not in resp.text and PG_USER.password not in resp.text


def test_result_messages_follow_x_language(client: httpx.Client) -> None:
    zh = post(client, {"jobs": [bad_job()]}, lang="zh-cn").json()["results"][0]
    assert zh["error_msg"].startswith("连接 127.0.0.1:1 被拒绝")
    other = post(client, {"jobs": [bad_job()]}, lang="fr-fr").json()["results"][0]
    assert other["error_msg"].startswith("Connection to 127.0.0.1:1 was refused")


def test_detail_true_adds_timings(client: httpx.Client, pg: PostgresServer) -> None:
    result = post(client, {"jobs": [pg_job(pg)]}, params={"detail": "true"}).json()["results"][0]
    assert result["success"] is True and result["end_point_type"] == "so"
    assert result["elapsed_ms"] > 0 and "login" in result["phases"]
    assert result["server_version"] and result["address"].startswith("127.0.0.1")
    plain = post(client, {"jobs": [pg_job(pg)]}, params={"detail": "false"}).json()["results"][0]
    assert set(plain) == {"id", "status", "success"}
    resp = post(client, {"jobs": [pg_job(pg)]}, params={"detail": "maybe"}, lang="zh-cn")
    assert "detail" in assert_error(resp, 400, ErrorCode.PARAMETER_INVALID, "zh-cn")
    resp = post(client, {"jobs": [pg_job(pg)]}, params={"detail": ""})
    assert "detail" in assert_error(resp, 400, ErrorCode.PARAMETER_INVALID, "en-us")


def test_the_seed_examples_against_local_servers(
    client: httpx.Client, maria: MariaDBServer, mongo: MongoWireServer
) -> None:
    examples = seed_examples()
    assert len(examples) == 3
    for body in examples:
        body = copy.deepcopy(body)
        (entry,) = body["jobs"]
        assert entry["ip"].startswith("192.168.")  # never contacted: rewritten below
        if entry["db_type"] == "mongodb":
            entry.update(ip=f"127.0.0.1:{mongo.port}", db_user=MONGO_USER.name,
                         db_password=MONGO_USER.password)
        else:
            entry.update(ip="127.0.0.1", db_port=maria.port, db_user=MARIA_USER.name,
                         db_password=MARIA_USER.password)
        resp = post(client, body)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "results": [{"success": True, "id": entry["id"], "status": "success"}],
            "count": 1,
        }


def test_error_bodies_never_echo_secrets(client: httpx.Client) -> None:
    secret = "S3cr3t-Pa55-9d1e"
    cert = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t"
    bodies: list[Any] = [
        {"jobs": [bad_job(db_password=secret, db_type="nosql")]},
        {"jobs": [bad_job(db_password=secret, ssl_link=True, ssl_cert_key=cert,
                          ssl_cert_name="ca.pem", ssl_cert_check_sum=secret)]},
        {"jobs": [bad_job(db_password=secret, ssl_link=True, ssl_cert_key=cert,
                          ssl_cert_name="ca.pem", ssl_cert_check_sum="0" * 64)]},
        {"jobs": [bad_job(db_password=secret, db_port=secret)]},
        {"jobs": [bad_job(db_user=secret, db_password=[secret])]},
        {"jobs": [bad_job(db_password=secret, ssl_cert_password=secret, id=secret + "!")]},
    ]
    for body in bodies:
        for lang in LANGS:
            for token in (TOKEN_ALL, secret):
                resp = post(client, body, lang=lang, token=token)
                assert secret not in resp.text and cert not in resp.text
                assert TOKEN_ALL not in resp.text


# ---------------------------------------------------------------- task rules, internal errors


class FlakyTaskStates(InMemoryTaskStates):
    """Task states whose lookup of one id fails unexpectedly (a broken backend)."""

    async def get(self, task_id: str) -> TaskState | None:
        if task_id == "task-boom":
            raise RuntimeError("backend down; password=boom-secret-123")
        return await super().get(task_id)


@pytest.fixture(scope="module")
def tasks_server() -> Iterator[LiveServer]:
    states = FlakyTaskStates({
        "task-ok": TaskState("CONFIGURATION"),
        "task-running": TaskState("FULL_TRANSFER_STARTED"),
        "task-parent": TaskState("CONFIGURATION", "parent"),
        "task-fwd-ready": TaskState("INCRE_TRANSFER_STARTED", "forward"),
        "task-fwd-early": TaskState("FULL_TRANSFER_STARTED", "forward"),
        "task-back-ok": TaskState("CONFIGURATION", "backward", "task-fwd-ready"),
        "task-back-early": TaskState("CONFIGURATION", "backward", "task-fwd-early"),
    })
    with LiveServer(create_app(make_config(task_states=states))) as live:
        yield live


@pytest.mark.parametrize("lang", LANGS)
def test_task_rules(tasks_server: LiveServer, pg: PostgresServer, lang: str) -> None:
    ids = ["task-ok", "task-unknown", "task-running", "task-parent", "task-back-ok",
           "task-back-early"]
    with httpx.Client(base_url=tasks_server.url, timeout=30) as c:
        resp = post(c, {"jobs": [pg_job(pg, id=i) for i in ids]}, lang=lang)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [r["id"] for r in results] == ids
    assert [r.get("error_code") for r in results] == [
        None, "DRS.10000010", "DRS.C10050", "DRS.C10052", None, "DRS.C10051"]
    assert "task-unknown" in results[1]["error_msg"]


@pytest.mark.parametrize("lang", LANGS)
def test_a_failing_task_lookup_fails_its_job_only(
    tasks_server: LiveServer, pg: PostgresServer, lang: str, caplog: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(base_url=tasks_server.url, timeout=30) as c:
        resp = post(c, {"jobs": [pg_job(pg, id="task-ok"), pg_job(pg, id="task-boom")]}, lang=lang)
    assert resp.status_code == 200, resp.text
    ok, boom = resp.json()["results"]
    assert ok["success"] is True
    assert boom["id"] == "task-boom" and boom["error_code"] == "DRS.C10099"
    for leak in ("Traceback", "RuntimeError", "boom-secret", "backend down", ".py"):
        assert leak not in resp.text
    # The log says what and where, never the exception's text.
    logged = [r.getMessage() for r in caplog.records if r.name == "probe"]
    assert any("task-boom" in m and "RuntimeError at " in m and "test_service.py" in m
               for m in logged), logged
    assert not any("boom-secret" in m for m in logged)


@pytest.mark.parametrize("lang", LANGS)
def test_unexpected_error_is_a_500_without_internals(
    pg: PostgresServer, lang: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every probe failure is answered per job, so the last-resort handler is
    # reached only by a bug of the service's own: one is planted in its metrics.
    def broken(self: Any, db_type: str, outcome: Any) -> None:
        raise RuntimeError("password=boom-secret-123")

    monkeypatch.setattr(ServiceMetrics, "observe", broken)
    with LiveServer(create_app(make_config())) as live, \
            httpx.Client(base_url=live.url, timeout=30) as c:
        resp = post(c, {"jobs": [pg_job(pg, id="task-ok")]}, lang=lang)
        assert resp.status_code == 500
        body = resp.json()
        assert body["error_code"] == "DRS.C10099" and set(body) == {"error_code", "error_msg"}
        for leak in ("Traceback", "RuntimeError", "boom-secret", ".py"):
            assert leak not in resp.text
        # The worker still serves.
        assert c.get("/healthz").status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "probe.service"]
    assert any("RuntimeError at " in m and "test_service.py" in m for m in logged), logged
    assert not any("boom-secret" in m for m in logged)


# ---------------------------------------------------------------- concurrency, disconnects


KINDS = ("pg", "maria", "mongo", "refused", "wrong-pw", "garbage")


def concurrent_job(kind: str, ident: str, pg: PostgresServer, maria: MariaDBServer,
                   mongo: MongoWireServer, faults: Faults) -> dict[str, Any]:
    if kind == "pg":
        return pg_job(pg, id=ident)
    if kind == "maria":
        return job("mysql", maria.port, MARIA_USER.name, MARIA_USER.password, id=ident)
    if kind == "mongo":
        return job("mongodb", mongo.port, MONGO_USER.name, MONGO_USER.password, id=ident)
    if kind == "refused":
        return job("taurus", faults.refused.port, "u", "p", id=ident)
    if kind == "wrong-pw":
        return pg_job(pg, id=ident, db_password="wrong-pw-xyz")
    return job("postgresql", faults.garbage.port, "u", "p", id=ident)


EXPECTED = {"pg": None, "maria": None, "mongo": None, "refused": "DRS.C10012",
            "wrong-pw": "DRS.C10030", "garbage": "DRS.C10016"}


@pytest.mark.anyio
async def test_fifty_concurrent_clients_get_their_own_results_in_order(
    server: LiveServer, pg: PostgresServer, maria: MariaDBServer, mongo: MongoWireServer,
    faults: Faults,
) -> None:
    failures: list[str] = []

    async def one_client(n: int) -> None:
        lang = LANGS[n % 2]
        kinds = [KINDS[(n + i) % len(KINDS)] for i in range(20)]
        jobs = [concurrent_job(k, f"c{n}-j{i}", pg, maria, mongo, faults)
                for i, k in enumerate(kinds)]
        headers = {"X-Auth-Token": TOKEN_ALL, "X-Language": lang}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            resp = await c.post(PATH, json={"jobs": jobs}, headers=headers)
        body = resp.json()
        if resp.status_code != 200 or body["count"] != 20:
            failures.append(f"client {n}: {resp.status_code} {resp.text[:200]}")
            return
        for i, (kind, result) in enumerate(zip(kinds, body["results"], strict=True)):
            ok = (result["id"] == f"c{n}-j{i}"
                  and result.get("error_code") == EXPECTED[kind]
                  and result["success"] is (EXPECTED[kind] is None))
            if ok and not result["success"]:
                ok = bool(re.search(r"[\u4e00-\u9fff]", result["error_msg"])) == (lang == "zh-cn")
            if not ok:
                failures.append(f"client {n} job {i} ({kind}): {result}")

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(one_client, n)
    assert not failures, failures[:5]
    assert time.monotonic() - started < 20


async def in_flight(client: httpx.AsyncClient) -> float:
    resp = await client.get("/metrics")
    return sample(resp.text, "probe_probes_in_flight")


@pytest.mark.anyio
async def test_client_disconnect_cancels_its_probes(server: LiveServer, faults: Faults) -> None:
    # Silent servers never greet: these probes would run for the whole 20 s deadline.
    jobs = [job("mysql", faults.silent.port, f"user{i}", "pw", id=f"silent-{i}")
            for i in range(5)]
    accepted = faults.silent.accepted
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as watcher:
        assert await in_flight(watcher) == 0

        async def doomed() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                await c.post(PATH, json={"jobs": jobs}, headers={"X-Auth-Token": TOKEN_ALL})

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed)
            with anyio.fail_after(10):
                while await in_flight(watcher) < 5:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()  # the client goes away mid-batch
        assert faults.silent.accepted - accepted == 5
        with anyio.fail_after(5):
            # The prober's sockets to the silent server close too.
            while await in_flight(watcher) > 0 or faults.silent.open_connections:
                await anyio.sleep(0.02)
        assert time.monotonic() - started < 10
        text = (await watcher.get("/metrics")).text
    assert sample(text, "probe_probes_total", error_code="DRS.C10015") == 0


# ---------------------------------------------------------------- metrics


def test_metrics_count_probes_batches_and_durations(client: httpx.Client,
                                                     pg: PostgresServer) -> None:
    before = metrics(client)
    jobs = [pg_job(pg, id="m1"), bad_job(id="m2"), bad_job(id="m3", db_user="other")]
    assert post(client, {"jobs": jobs}).status_code == 200
    after = metrics(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("probe_probes_total", db_type="postgresql", status="success", error_code="") == 1
    assert delta("probe_probes_total", db_type="mysql", status="failed",
                 error_code="DRS.C10012") == 2
    assert delta("probe_probe_duration_seconds_count", db_type="postgresql") == 1
    assert delta("probe_batch_size_count") == 1 and delta("probe_batch_size_sum") == 3
    assert delta("probe_http_responses_total", status="200") == 1
    assert sample(after, "probe_probes_in_flight") == 0
    # One registry per application: a second app starts from zero.
    fresh = create_app(make_config()).state.service.metrics.exposition().decode()
    assert sample(fresh, "probe_probes_total") == 0


# ---------------------------------------------------------------- /openapi.json vs the contract


def contract_table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in CONTRACT.md, split into cells."""
    lines = CONTRACT.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and the --- line


TYPES = {"string": "string", "integer": "integer", "boolean": "boolean"}


def test_openapi_schemas_match_the_contract_tables(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    endpoint = schemas["TestEndPoint"]
    props = endpoint["properties"]
    conditional = endpoint["allOf"][0]["then"]["required"]
    contract_fields: set[str] = set()
    for name_cell, required, kind, rule in contract_table("## Request"):
        for name in re.findall(r"[a-z_]+", name_cell):
            contract_fields.add(name)
            assert props[name]["type"] == TYPES[kind], name
            if required == "yes":
                assert name in endpoint["required"], name
            else:
                assert name not in endpoint["required"], name
            if required.startswith("yes, default"):
                default = re.search(r"`(\w+)`", required)
                assert default is not None and props[name]["default"] == default.group(1)
            if required == "if ssl_link":
                assert name in conditional, name
            enum = props[name].get("enum")
            if enum is not None:
                assert set(enum) == set(re.findall(r"`([a-z]+)`", rule)), name
    assert set(props) == contract_fields
    assert set(props["db_type"]["enum"]) == set(DB_TYPES)
    for name in ("net_type", "db_type", "end_point_type"):
        assert "enum" in props[name], name
    assert re.fullmatch(props["id"]["pattern"].strip("^$"), "140b5236-88ad-43c8-811c-1268453jb101")
    assert endpoint["additionalProperties"] is True  # unknown fields are ignored

    result = schemas["CheckJobResp"]
    for name, kind, meaning in contract_table("## Response"):
        assert result["properties"][name]["type"] == TYPES[kind], name
        if meaning.startswith("only when failed"):
            assert name not in result["required"]
        else:
            assert name in result["required"]
        enum = result["properties"][name].get("enum")
        if name == "status":
            assert set(enum) == {"success", "failed"}
    assert set(result["properties"]["error_code"]["enum"]) == {c.value for c in ErrorCode}

    envelope = schemas["BatchConnectionResponse"]
    assert envelope["required"] == ["results", "count"]
    items = envelope["properties"]["results"]["items"]
    assert items == {"$ref": "#/components/schemas/CheckJobResp"}
    assert envelope["properties"]["count"]["type"] == "integer"
    assert schemas["ErrorResponse"]["required"] == ["error_code", "error_msg"]
    assert set(schemas["ErrorResponse"]["properties"]) == {"error_code", "error_msg"}
    assert schemas["BatchConnectionRequest"]["required"] == ["jobs"]
    assert schemas["BatchConnectionRequest"]["properties"]["jobs"]["minItems"] == 1

    operation = doc["paths"]["/v3/{project_id}/jobs/batch-connection"]["post"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["project_id"]["schema"]["pattern"] == "^[A-Za-z0-9-]{1,64}$"
    assert params["X-Language"]["schema"]["enum"] == ["en-us", "zh-cn"]
    assert set(operation["responses"]) == {"200", "400", "401", "403", "500"}
    assert doc["components"]["securitySchemes"]["token"]["name"] == "X-Auth-Token"
    # Every $ref resolves.
    for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(doc)):
        assert ref in schemas


# ---------------------------------------------------------------- probe serve: configuration


def serve_args(*argv: str) -> Any:
    return cli.build_parser().parse_args(["serve", *argv])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("PROBE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv(OPTIONS_ENV, "")  # restored (removed) afterwards

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("uvicorn must not start here")

    monkeypatch.setattr(uvicorn, "run", no_server)
    return monkeypatch


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("argv", "tokens", "message"),
    [
        ((), None, "refusing to start without authentication"),
        (("--tokens-file", "{tokens}"), "{not json", "not valid JSON"),
        (("--tokens-file", "{tokens}"), ["tok"], "expected a JSON object"),
        (("--tokens-file", "{tokens}"), {"secret-tok": 5}, "list of project ids"),
        (("--tokens-file", "{tokens}"), {"secret-tok": ["bad_id"]}, "not a valid project id"),
        (("--tokens-file", "{tokens}"), {}, "no tokens"),
        (("--tokens-file", "/nonexistent/tokens.json"), None, "No such file"),
        (("--tokens-file", "{tokens}", "--insecure-no-auth"), TOKENS, "not both"),
        (("--insecure-no-auth", "--allow-ports", "80,x"), None, "not a port"),
        (("--insecure-no-auth", "--deny-cidr", "10.0.0.0/33"), None, "--deny-cidr"),
        (("--insecure-no-auth", "--allow-cidr", "10.0.0.0/8,fe80::/300"), None,
         "'fe80::/300' is not a network"),
        (("--insecure-no-auth", "--tasks-file", "{tokens}"), ["x"], "tasks file"),
        (("--insecure-no-auth", "--task-provider", "no_such_module:make"), None,
         "task provider"),
        (("--insecure-no-auth", "--task-provider", "probe.tasks"), None, "module:factory"),
    ],
)
def test_serve_refuses_bad_configuration_in_one_line(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...], tokens: Any, message: str,
) -> None:
    path = write(tmp_path, "tokens.json", tokens) if tokens is not None else ""
    code = cli.main(["serve", *(a.replace("{tokens}", path) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("probe: ") and message in err, err
    assert "secret-tok" not in err and "Traceback" not in err


def test_serve_refuses_a_bad_environment_in_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("PROBE_MAX_JOBS", "many")
    assert cli.main(["serve", "--insecure-no-auth"]) == 2
    assert capsys.readouterr().err == "probe: PROBE_MAX_JOBS must be a positive integer\n"


def test_options_come_from_flags_over_environment(clean_env: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    tokens = write(tmp_path, "tokens.json", TOKENS)
    tasks = write(tmp_path, "tasks.json", {"t1": "CONFIGURATION"})
    env = {"PROBE_TOKENS_FILE": tokens, "PROBE_PORT": "9001", "PROBE_MAX_JOBS": "7",
           "PROBE_MAX_BODY": "4096", "PROBE_TASKS_FILE": tasks, "PROBE_HOST": "127.0.0.2",
           "PROBE_ALLOW_PORTS": "3306,5432", "PROBE_DENY_CIDR": "10.0.0.0/8, 172.16.0.0/12",
           "PROBE_WORKERS": "3"}
    options = options_from(serve_args(), env)
    assert (options.host, options.port, options.workers) == ("127.0.0.2", 9001, 3)
    assert (options.max_jobs, options.max_body) == (7, 4096)
    assert options.allow_ports == [3306, 5432]
    assert options.deny_cidr == ["10.0.0.0/8", "172.16.0.0/12"]
    config = config_from(options)
    assert config.tokens is not None and len(config.tokens) == 2
    assert config.task_states is not None and config.max_jobs == 7
    assert config.settings.policy.ports == frozenset({3306, 5432})

    flags = serve_args("--port", "9002", "--max-jobs", "9", "--timeout", "3",
                       "--allow-ports", "27017", "--host", "127.0.0.3")
    options = options_from(flags, env)
    assert (options.port, options.max_jobs, options.host) == (9002, 9, "127.0.0.3")
    assert options.allow_ports == [27017]
    assert config_from(options).settings.deadline == 3

    provider = options_from(serve_args("--insecure-no-auth",
                                       "--task-provider", "probe.tasks:InMemoryTaskStates"), {})
    assert isinstance(config_from(provider).task_states, InMemoryTaskStates)
    assert config_from(provider).tokens is None


def test_worker_processes_rebuild_the_same_configuration(clean_env: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    tokens = write(tmp_path, "tokens.json", TOKENS)
    options = options_from(serve_args("--tokens-file", tokens, "--max-jobs", "5",
                                      "--timeout", "2.5"), {})
    clean_env.setenv(OPTIONS_ENV, options.to_env())
    assert ServeOptions.from_env(options.to_env()) == options
    service = worker_app().state.service
    assert service.config.max_jobs == 5 and service.config.settings.deadline == 2.5
    assert service.config.tokens.check(TOKEN_ONE.encode(), PROJECT) is None


def test_serve_hands_uvicorn_an_app_or_a_factory(clean_env: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    clean_env.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    tokens = write(tmp_path, "tokens.json", TOKENS)
    assert cli.main(["serve", "--tokens-file", tokens, "--port", "9100"]) == 0
    app, kwargs = calls[-1]
    assert isinstance(app, Starlette) and kwargs["port"] == 9100
    assert kwargs["host"] == "127.0.0.1"
    assert cli.main(["serve", "--tokens-file", tokens, "--workers", "2"]) == 0
    app, kwargs = calls[-1]
    assert app == "probe.service:worker_app" and kwargs["factory"] is True
    assert kwargs["workers"] == 2
    assert json.loads(os.environ[OPTIONS_ENV])["tokens_file"] == tokens


def test_token_table_rules() -> None:
    table = TokenTable({"a-token": ["p1", "p2"], "b-token": "*", "c-token": ["*"]})
    assert table.check(b"a-token", "p1") is None
    assert table.check(b"a-token", "p3") is ErrorCode.PROJECT_FORBIDDEN
    assert table.check(b"b-token", "anything") is None
    assert table.check(b"c-token", "anything") is None
    assert table.check(b"a-token", "bad_id") is ErrorCode.INVALID_PROJECT_ID
    assert table.check(b"nope", "bad_id") is ErrorCode.INVALID_TOKEN
    assert table.check(None, "p1") is ErrorCode.INVALID_TOKEN
    assert table.check(b"", "p1") is ErrorCode.INVALID_TOKEN
    assert "a-token" not in repr(table)
    with pytest.raises(ValueError):
        TokenTable({"": "*"})


def test_config_error_is_an_exception_with_one_line() -> None:
    with pytest.raises(ConfigError, match="refusing"):
        config_from(ServeOptions())


# ---------------------------------------------------------------- probe serve: the real command


def serve_process(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "probe.cli", "serve", *argv], env={**base, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"probe serve exited: {proc.communicate()[1]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("probe serve did not come up")


def serve_on_free_port(
    processes: list[subprocess.Popen[str]], argv: list[str], env: dict[str, str],
    *, port_from_env: bool = False,
) -> tuple[str, subprocess.Popen[str]]:
    """`probe serve` on a free port, healthy; another port if that one was taken meanwhile."""
    for _ in range(3):
        port = str(free_port())
        proc = serve_process(argv if port_from_env else [*argv, "--port", port],
                             {**env, "PROBE_PORT": port} if port_from_env else env)
        processes.append(proc)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
        except AssertionError as exc:
            if "address already in use" in str(exc):
                continue
            raise
        return url, proc
    raise AssertionError("no free port for probe serve in three tries")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_probe_serve_insecure_single_worker(processes: list[subprocess.Popen[str]],
                                            pg: PostgresServer) -> None:
    url, proc = serve_on_free_port(processes, ["--insecure-no-auth", "--max-jobs", "3"], {})
    with httpx.Client(base_url=url, timeout=30) as c:
        resp = c.post(PATH, json={"jobs": [pg_job(pg)]})  # no token needed
        assert resp.json() == {"results": [{"id": "job-1", "status": "success", "success": True}],
                               "count": 1}
        resp = c.post(PATH, json={"jobs": [bad_job()] * 4})
        assert resp.status_code == 400 and resp.json()["error_code"] == "DRS.M00202"
        assert "server" not in resp.headers
    code, err = stop(proc)
    assert code == 0, err
    assert "warning: no authentication" in err


def test_probe_serve_tokens_and_workers_from_the_environment(
    processes: list[subprocess.Popen[str]], pg: PostgresServer, tmp_path: Path
) -> None:
    tokens = write(tmp_path, "tokens.json", TOKENS)
    url, proc = serve_on_free_port(processes, [], {"PROBE_TOKENS_FILE": tokens,
                                                   "PROBE_WORKERS": "2"}, port_from_env=True)
    for _ in range(4):  # new connections: both workers get some
        with httpx.Client(base_url=url, timeout=30) as c:
            assert post(c, {"jobs": [pg_job(pg)]}, token=None).status_code == 401
            resp = post(c, {"jobs": [pg_job(pg)]}, token=TOKEN_ONE)
            assert resp.status_code == 200 and resp.json()["results"][0]["success"] is True
    code, err = stop(proc)
    assert code == 0, err
    assert TOKEN_ONE not in err and TOKEN_ALL not in err


def test_probe_serve_cannot_listen_is_one_line() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, says in ((["--port", port], "address already in use"),
                           (["--port", "70000"], "from 1 to 65535")):
            done = subprocess.run([sys.executable, "-m", "probe.cli", "serve",
                                   "--insecure-no-auth", *argv], env=base,
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert says in lines[-1] and "Traceback" not in done.stderr, done.stderr
            assert len(lines) <= 2  # the no-authentication warning, then why it stopped


def test_probe_serve_without_tokens_exits_2_in_one_line() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}
    done = subprocess.run([sys.executable, "-m", "probe.cli", "serve"], env=base,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--insecure-no-auth" in done.stderr

