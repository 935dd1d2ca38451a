"""Fuzzed requests against the real server: never a 500, never a secret in the answer.

The server runs with fake engines (no network at all), so a fuzzed `ip` that
happens to be a real host name is never looked up or contacted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from probe.checkers import Checker, Facts, Target, Trace
from probe.errors import ErrorCode, ProbeFailure
from probe.models import DB_TYPES
from probe.runner import ProbeSettings
from probe.service import ServiceConfig, TokenTable, create_app
from tests.test_service import LiveServer

PROJECT = "054ba152d480d55b2f5dc0069e7ddef0"
TOKEN = "tok-fuzz-5e0b7d93c1"
# Secrets carry a mark no valid id, host or user name has, so finding one in an
# answer means it was echoed, not that a fuzzed field happened to equal it.
PASSWORD = "PW§fuzz-a8d3f0c2e1"
CERT = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nfuzz-cert-77c1e0\n").decode()
SECRETS = (PASSWORD, "fuzz-a8d3f0c2e1", TOKEN, CERT, "fuzz-cert-77c1e0")
FIELDS = ("id", "net_type", "db_type", "ip", "db_port", "db_user", "db_password", "ssl_link",
          "ssl_cert_key", "ssl_cert_name", "ssl_cert_check_sum", "ssl_cert_password",
          "end_point_type", "db_name", "inst_id", "vpc_id", "subnet_id", "region", "project_id")


class FakeChecker(Checker):
    """Answers from the user name alone: ``ok*`` succeeds, ``boom*`` raises a bug
    quoting the password, anything else fails authentication."""

    async def check(self, target: Target, trace: Trace) -> Facts:
        if target.user.startswith("ok"):
            return Facts(server_version="fake 1.0", address=target.label)
        if target.user.startswith("boom"):
            raise RuntimeError(f"driver bug: password={target.password}")
        raise ProbeFailure(ErrorCode.AUTH_FAILED, target=target.label)


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[httpx.Client]:
    config = ServiceConfig(
        tokens=TokenTable({TOKEN: "*"}),
        settings=ProbeSettings(deadline=5),
        max_jobs=4,
        max_body=16 * 1024,
        checkers=dict.fromkeys(DB_TYPES, FakeChecker()),
    )
    with LiveServer(create_app(config)) as live, httpx.Client(base_url=live.url,
                                                                timeout=30) as client:
        yield client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
good_values: dict[str, st.SearchStrategy[Any]] = {
    "id": st.sampled_from(["job-1", "140b5236-88ad-43c8-811c-1268453jb101", "a" * 64]),
    "net_type": st.sampled_from(["vpn", "vpc", "eip"]),
    "db_type": st.sampled_from(DB_TYPES),
    "ip": st.sampled_from(["127.0.0.1", "::1", "[::1]", "localhost",
                           "127.0.0.1:27017,127.0.0.2", "db.example.invalid"]),
    "db_port": st.sampled_from([0, 1, 3306, 5432, 65535]),
    "db_user": st.sampled_from(["ok-user", "boom-user", "fail-user"]),
    "db_password": st.sampled_from([PASSWORD, ""]),
    "ssl_link": st.booleans(),
    "ssl_cert_key": st.just(CERT),
    "ssl_cert_name": st.sampled_from(["ca.pem", "ca.p12", "x"]),
    "ssl_cert_check_sum": st.sampled_from(["0" * 64, "F" * 64, PASSWORD]),
    "ssl_cert_password": st.just(PASSWORD),
    "end_point_type": st.sampled_from(["so", "ta"]),
}


@st.composite
def jobs(draw: st.DrawFn) -> Any:
    """A job near validity: good values, some replaced by arbitrary JSON, some dropped."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    job: dict[str, Any] = {
        "id": "job-1", "net_type": "eip", "db_type": "mysql", "ip": "127.0.0.1",
        "db_port": 3306, "db_user": "ok-user", "db_password": PASSWORD,
    }
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5)):
        strategy = good_values.get(name, st.text(max_size=10))
        job[name] = draw(strategy | json_values if draw(st.booleans()) else strategy)
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=2)):
        job.pop(name, None)
    if draw(st.booleans()):
        job[draw(st.text(max_size=8))] = draw(json_values)
    return job


bodies = st.one_of(
    st.lists(jobs(), max_size=5).map(lambda js: {"jobs": js}),
    st.dictionaries(st.sampled_from(["jobs", "job", "JOBS", ""]), json_values, max_size=2),
    json_values,
).map(lambda body: json.dumps(body, ensure_ascii=False).encode())
raw_bodies = st.one_of(
    bodies,
    bodies.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
    st.binary(max_size=200),
    st.just(b"[" * 5000 + PASSWORD.encode()),
)
requests = st.fixed_dictionaries({
    "body": raw_bodies,
    "token": st.sampled_from([TOKEN, TOKEN, TOKEN, None, "wrong", TOKEN + "x"]),
    "lang": st.sampled_from([None, "en-us", "zh-cn", "ZH-CN", "fr-fr"]),
    "content_type": st.sampled_from(["application/json", "application/json", None,
                                     "application/json; charset=utf-8", "text/plain"]),
    # "." and ".." are dot segments: the client removes them from the path
    "project": st.one_of(st.just(PROJECT), st.just(PROJECT),
                         st.text(max_size=70).filter(lambda p: p not in (".", ".."))),
    "detail": st.sampled_from([None, "true", "false", "yes", ""]),
})


def check_answer(resp: httpx.Response, body: bytes) -> None:
    assert resp.status_code in (200, 400, 401, 403), (resp.status_code, resp.text)
    data = resp.json()
    text = json.dumps(data, ensure_ascii=False)
    for secret in SECRETS:
        assert secret not in resp.text and secret not in text, (secret, text)
    if resp.status_code != 200:
        assert set(data) == {"error_code", "error_msg"}, data
        assert data["error_code"].startswith("DRS.M"), data
        return
    sent = json.loads(body.decode("utf-8-sig"))["jobs"]
    assert data["count"] == len(data["results"]) == len(sent)
    assert [r["id"] for r in data["results"]] == [j["id"] for j in sent]
    for result in data["results"]:
        assert result["status"] in ("success", "failed")


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests)
def test_fuzzed_requests_never_fail_the_server_nor_echo_secrets(
    fuzz_client: httpx.Client, request: dict[str, Any]
) -> None:
    headers = {"Content-Type": request["content_type"], "X-Auth-Token": request["token"],
               "X-Language": request["lang"]}
    params = {"detail": request["detail"]} if request["detail"] is not None else None
    resp = fuzz_client.post(
        f"/v3/{quote(request['project'], safe='')}/jobs/batch-connection",
        content=request["body"],
        headers={k: v for k, v in headers.items() if v is not None},
        params=params,
    )
    event(f"{resp.status_code} {resp.json().get('error_code', '')}")
    check_answer(resp, request["body"])


@settings(max_examples=150, deadline=None, database=None)
@given(jobs=st.lists(jobs(), min_size=1, max_size=4), lang=st.sampled_from(["en-us", "zh-cn"]))
def test_fuzzed_jobs_with_valid_envelope(fuzz_client: httpx.Client, jobs: list[Any],
                                         lang: str) -> None:
    body = json.dumps({"jobs": jobs}, ensure_ascii=False).encode()
    resp = fuzz_client.post(
        f"/v3/{PROJECT}/jobs/batch-connection", content=body,
        headers={"Content-Type": "application/json", "X-Auth-Token": TOKEN, "X-Language": lang},
        params={"detail": "true"},
    )
    event(f"{resp.status_code} {resp.json().get('error_code', '')}")
    check_answer(resp, body)
