"""The request/response models against every rule of shared/CONTRACT.md."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from probe.errors import ErrorCode, RequestInvalid
from probe.models import CheckJobResp, Endpoint, parse_job, parse_jobs

# A copy of shared/seed/batch-connection.txt (tests/test_contract_copies.py keeps it honest).
SEED = Path(__file__).resolve().parent / "data" / "batch-connection.txt"


def seed_examples() -> list[dict[str, Any]]:
    """The three example request bodies of the original API page."""
    text = SEED.read_text(encoding="utf-8")
    bodies = re.findall(r"^    \{\n      \"jobs\".*?^    \}$", text, flags=re.S | re.M)
    return [json.loads(b) for b in bodies]


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "140b5236-88ad-43c8-811c-1268453jb101",
        "net_type": "eip",
        "db_type": "mysql",
        "ip": "192.168.0.27",
        "db_port": 3306,
        "db_user": "root",
        "db_password": "secret-pass",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def problem(raw: dict[str, Any]) -> RequestInvalid:
    result = parse_job(raw, 0)
    assert isinstance(result, RequestInvalid), f"expected a problem, got {result!r}"
    return result


def test_the_seed_examples_validate() -> None:
    examples = seed_examples()
    assert len(examples) == 3
    for body in examples:
        parsed = parse_jobs(body, strict=True)
        assert all(isinstance(p, Endpoint) for p in parsed)
    dds = parse_jobs(examples[0], strict=True)[0]
    assert isinstance(dds, Endpoint)
    assert [str(h) for h in dds.hosts()] == ["192.168.4.66:8635", "192.168.4.83:8635"]
    assert dds.db_port == 0 and dds.database() == "admin"


def test_defaults() -> None:
    e = Endpoint.model_validate(job(db_port=..., end_point_type=...))
    assert e.db_port == 3306 and e.end_point_type == "so" and e.ssl_link is False
    pg = Endpoint.model_validate(job(db_type="postgresql", db_port=...))
    assert pg.db_port == 5432 and pg.database() == "postgres"
    assert Endpoint.model_validate(job(db_type="taurus", db_port=...)).db_port == 3306


def test_unknown_fields_are_ignored_and_ids_may_repeat() -> None:
    body = {"jobs": [job(colour="blue"), job(end_point_type="ta")], "extra": 1}
    parsed = parse_jobs(body, strict=True)
    assert [p.id for p in parsed if isinstance(p, Endpoint)] == [job()["id"]] * 2


def test_strict_names_the_first_invalid_job_and_counts_the_others() -> None:
    body = {"jobs": [job(), job(db_port=0), job(db_type="db2"), job(net_type="lan")]}
    with pytest.raises(RequestInvalid) as info:
        parse_jobs(body, strict=True)
    assert info.value.field == "jobs[1].db_port"
    assert info.value.message().endswith("(2 more invalid jobs)")
    assert info.value.message("zh-cn").endswith("（另有 2 个任务无效）")
    body["jobs"] = body["jobs"][:2]
    with pytest.raises(RequestInvalid) as info:
        parse_jobs(body, strict=True)
    assert "more invalid" not in info.value.message()


def test_empty_password_is_allowed_but_missing_is_not() -> None:
    assert isinstance(parse_job(job(db_password=""), 0), Endpoint)
    p = problem(job(db_password=...))
    assert p.code is ErrorCode.PARAMETER_EMPTY and p.field == "jobs[0].db_password"


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"id": ...}, ErrorCode.PARAMETER_EMPTY, "id"),
        ({"id": ""}, ErrorCode.PARAMETER_EMPTY, "id"),
        ({"id": "a b"}, ErrorCode.PARAMETER_INVALID, "id"),
        ({"id": "x" * 65}, ErrorCode.PARAMETER_INVALID, "id"),
        ({"net_type": "lan"}, ErrorCode.PARAMETER_INVALID, "net_type"),
        ({"db_type": "oracle"}, ErrorCode.PARAMETER_INVALID, "db_type"),
        ({"db_type": ...}, ErrorCode.PARAMETER_EMPTY, "db_type"),
        ({"ip": ""}, ErrorCode.PARAMETER_EMPTY, "ip"),
        ({"ip": "   "}, ErrorCode.PARAMETER_EMPTY, "ip"),
        ({"ip": "300.1.1.1"}, ErrorCode.PARAMETER_INVALID, "ip"),
        ({"ip": "10.0.0.1:3306"}, ErrorCode.PARAMETER_INVALID, "ip"),
        ({"ip": "a..b"}, ErrorCode.PARAMETER_INVALID, "ip"),
        ({"db_port": 0}, ErrorCode.PARAMETER_INVALID, "db_port"),
        ({"db_port": 70000}, ErrorCode.PARAMETER_INVALID, "db_port"),
        ({"db_port": "3306"}, ErrorCode.PARAMETER_INVALID, "db_port"),
        ({"db_user": ""}, ErrorCode.PARAMETER_EMPTY, "db_user"),
        ({"ssl_link": "yes"}, ErrorCode.PARAMETER_INVALID, "ssl_link"),
        ({"ssl_link": True}, ErrorCode.PARAMETER_EMPTY, "ssl_cert_key"),
        ({"end_point_type": "xx"}, ErrorCode.PARAMETER_INVALID, "end_point_type"),
        ({"db_type": "mongodb", "db_port": 27017}, ErrorCode.PARAMETER_INVALID, "db_port"),
        ({"db_type": "mongodb", "ip": "a:1,,b:2", "db_port": 0},
         ErrorCode.PARAMETER_INVALID, "ip"),
        ({"db_type": "mongodb", "ip": "a:99999", "db_port": 0},
         ErrorCode.PARAMETER_INVALID, "ip"),
    ],
)
def test_each_rule_names_its_field(overrides: dict[str, Any], code: ErrorCode, field: str) -> None:
    p = problem(job(**overrides))
    assert (p.code, p.field) == (code, f"jobs[0].{field}")


def test_ssl_fields_are_required_together_and_checksum_is_hex() -> None:
    ssl = {"ssl_link": True, "ssl_cert_key": "QUJD", "ssl_cert_name": "ca.pem",
           "ssl_cert_check_sum": "ab" * 32}
    assert isinstance(parse_job(job(**ssl), 0), Endpoint)
    assert isinstance(parse_job(job(**{**ssl, "ssl_cert_check_sum": "AB" * 32}), 0), Endpoint)
    assert problem(job(**{**ssl, "ssl_cert_name": ...})).field == "jobs[0].ssl_cert_name"
    p = problem(job(**{**ssl, "ssl_cert_check_sum": "xyz"}))
    assert (p.code, p.field) == (ErrorCode.PARAMETER_INVALID, "jobs[0].ssl_cert_check_sum")


def test_mongodb_port_may_be_absent_or_zero() -> None:
    for port in (..., 0):
        e = parse_job(job(db_type="mongodb", ip=" h1:1 , [::1]:2,h3 ", db_port=port), 0)
        assert isinstance(e, Endpoint)
        assert [str(h) for h in e.hosts()] == ["h1:1", "[::1]:2", "h3:27017"]


def test_envelope_problems() -> None:
    for body, code in (
        ([], ErrorCode.MALFORMED_BODY),
        ({}, ErrorCode.PARAMETER_EMPTY),
        ({"jobs": []}, ErrorCode.PARAMETER_EMPTY),
        ({"jobs": {}}, ErrorCode.PARAMETER_INVALID),
    ):
        with pytest.raises(RequestInvalid) as caught:
            parse_jobs(body)
        assert caught.value.code is code


def test_partial_mode_keeps_the_valid_jobs_and_strict_mode_rejects() -> None:
    body = {"jobs": [job(), job(db_type="db2"), "not a job", job(id="ok-2")]}
    parsed = parse_jobs(body)
    assert [type(p).__name__ for p in parsed] == [
        "Endpoint", "RequestInvalid", "RequestInvalid", "Endpoint"
    ]
    assert isinstance(parsed[1], RequestInvalid) and parsed[1].job_id == job()["id"]
    with pytest.raises(RequestInvalid) as caught:
        parse_jobs(body, strict=True)
    assert caught.value.field == "jobs[1].db_type"


def test_no_secret_in_repr_or_problem() -> None:
    canary = "Canary-P4ss!"
    raw = job(db_password=canary, ssl_link=True, ssl_cert_key="Q0FOQVJZ" * 3,
              ssl_cert_name="a.p12", ssl_cert_check_sum="0" * 64,
              ssl_cert_password=canary)
    e = Endpoint.model_validate(raw)
    assert canary not in repr(e) and canary not in str(e) and "Q0FOQVJZ" not in repr(e)
    bad = copy.deepcopy(raw)
    bad["db_port"] = canary
    p = problem(bad)
    assert canary not in p.message() and canary not in p.message("zh-cn") and canary not in str(p)


def test_result_carries_exactly_the_contract_fields_without_detail() -> None:
    ok = CheckJobResp(id="a", status="success", success=True).to_json()
    assert ok == {"id": "a", "status": "success", "success": True}
    failed = CheckJobResp(id="a", status="failed", success=False, error_code="DRS.C10012",
                          error_msg="m").to_json()
    assert set(failed) == {"id", "status", "success", "error_code", "error_msg"}


def test_a_trailing_newline_is_not_a_valid_id_or_checksum() -> None:
    assert problem(job(id="abc\n")).field == "jobs[0].id"
    ssl = {"ssl_link": True, "ssl_cert_key": "QUJD", "ssl_cert_name": "ca.pem",
           "ssl_cert_check_sum": "ab" * 32 + "\n"}
    assert problem(job(**ssl)).field == "jobs[0].ssl_cert_check_sum"
