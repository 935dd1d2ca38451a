"""Property-based tests (hypothesis) for the request models and the `ip` grammar.

Whatever arrives, validation answers with a value or a request problem
(`RequestInvalid` from the models, `ValueError` from the grammar), never with
another exception; and what it accepts is what a checker can use as it is.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe.addresses import DEFAULT_DENY, HostPort, NetworkPolicy, parse_host, parse_host_list
from probe.errors import ErrorCode, RequestInvalid
from probe.models import Endpoint, parse_job, parse_jobs
from probe.runner import _dedupe_key

PROPERTIES = settings(max_examples=300, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

# Characters that break naive parsers: separators of the grammar, whitespace,
# NUL, non-ASCII digits and letters, lone surrogates.
TRICKY = st.sampled_from(list(
    ":[]%,./ \t\n\r\x00-_@0123456789abcdefABCDEF\u0663\u00b2\u0130\u212a\ud800\uff1a\u3002"))
# Dotted names and IPv6 zones built from those characters (a "\n" inside a label, a
# space in a zone) are rarely hit by plain random text.
DOTTED = st.lists(st.text(TRICKY, min_size=1, max_size=4), min_size=2, max_size=4).map(".".join)
ZONED = st.tuples(st.sampled_from(["::1", "fe80::1", "[::1"]), st.text(TRICKY, max_size=4)).map(
    lambda parts: f"{parts[0]}%{parts[1]}" + ("]" if parts[0].startswith("[") else ""))
HOSTILE_TEXT = st.text(TRICKY, max_size=40) | st.text(max_size=40) | DOTTED | ZONED

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | HOSTILE_TEXT,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)

FIELDS = ["id", "net_type", "db_type", "ip", "db_port", "db_user", "db_password", "ssl_link",
          "ssl_cert_key", "ssl_cert_name", "ssl_cert_check_sum", "ssl_cert_password",
          "end_point_type", "db_name", "inst_id", "vpc_id", "subnet_id", "region",
          "project_id"]

VALID: dict[str, dict[str, Any]] = {
    "mysql": {"id": "t-1", "net_type": "eip", "db_type": "mysql", "ip": "10.0.0.27",
              "db_port": 3306, "db_user": "root", "db_password": "pw"},
    "postgresql": {"id": "t-2", "net_type": "vpc", "db_type": "postgresql", "ip": "::1",
                   "db_user": "postgres", "db_password": ""},
    "mongodb": {"id": "t-3", "net_type": "vpn", "db_type": "mongodb", "db_port": 0,
                "ip": "192.168.4.66:8635,[::1]:27018, db.example.com", "db_user": "root",
                "db_password": "pw", "db_name": "admin", "end_point_type": "ta"},
}

LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,20}[A-Za-z0-9])?", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join).filter(
    lambda name: not all(label.isdigit() for label in name.split(".")))
IP = st.ip_addresses()


def host_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address, bracket: bool) -> str:
    return f"[{address}]" if address.version == 6 and bracket else str(address)


ENTRY = st.one_of(
    st.tuples(IP.map(lambda a: host_text(a, True)), st.none() | st.integers(1, 65535)),
    st.tuples(HOSTNAME, st.none() | st.integers(1, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.none()),  # bare IPv6: no port possible
)


def check_endpoint(endpoint: Endpoint) -> None:
    """What a checker relies on, for any job validation let through."""
    hosts = endpoint.hosts()
    assert hosts and all(1 <= h.port <= 65535 for h in hosts)
    for h in hosts:
        assert_usable_host(h.host)
    endpoint.database()
    _dedupe_key(endpoint)
    for text in (endpoint.db_user, endpoint.db_name or "",
                 endpoint.db_password.get_secret_value()):
        text.encode("utf-8")  # the drivers send UTF-8
    assert "\0" not in endpoint.db_user + (endpoint.db_name or "")
    if endpoint.ssl_link:
        assert endpoint.ssl_cert_key and endpoint.ssl_cert_name
        assert re.fullmatch(r"[0-9A-Fa-f]{64}", endpoint.ssl_cert_check_sum or "")


def check_problem(problem: RequestInvalid) -> None:
    assert problem.code in (ErrorCode.PARAMETER_EMPTY, ErrorCode.PARAMETER_INVALID)
    assert problem.field.startswith("jobs[")
    for lang in ("en-us", "zh-cn"):
        assert problem.message(lang)  # type: ignore[arg-type]


NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def assert_usable_host(host: str) -> None:
    """An IP literal (with at most an interface zone) or a lowercase DNS name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        assert NAME.fullmatch(host) and len(host) <= 253, repr(host)
        return
    assert str(address) == host
    zone = getattr(address, "scope_id", None)
    assert zone is None or re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", zone), repr(host)


# ---------------------------------------------------------------- the models


@PROPERTIES
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=14))
def test_any_object_is_a_job_or_a_request_problem(raw: dict[str, Any]) -> None:
    result = parse_job(raw, 3)
    if isinstance(result, Endpoint):
        check_endpoint(result)
    else:
        assert isinstance(result, RequestInvalid)
        check_problem(result)
        assert result.field.startswith("jobs[3]")


@PROPERTIES
@given(st.sampled_from(sorted(VALID)), st.sampled_from(FIELDS), JSON | HOSTILE_TEXT)
def test_one_field_of_a_valid_job_replaced_by_anything(db_type: str, name: str,
                                                       value: Any) -> None:
    raw = {**VALID[db_type], name: value}
    result = parse_job(raw, 0)
    if isinstance(result, Endpoint):
        check_endpoint(result)
    else:
        check_problem(result)
        assert result.field == f"jobs[0].{name}", (result.field, name)


@PROPERTIES
@given(JSON)
def test_any_body_is_jobs_or_a_request_problem(body: Any) -> None:
    try:
        jobs = parse_jobs(body)
    except RequestInvalid as problem:
        assert problem.code in (ErrorCode.MALFORMED_BODY, ErrorCode.PARAMETER_EMPTY,
                                ErrorCode.PARAMETER_INVALID)
        return
    assert isinstance(body, dict) and len(jobs) == len(body["jobs"])
    for job in jobs:
        check_endpoint(job) if isinstance(job, Endpoint) else check_problem(job)


@PROPERTIES
@given(st.sampled_from(sorted(VALID)), st.lists(st.sampled_from(FIELDS), max_size=4),
       st.booleans())
def test_strict_mode_raises_only_request_problems(db_type: str, missing: list[str],
                                                  strict: bool) -> None:
    raw = {k: v for k, v in VALID[db_type].items() if k not in missing}
    try:
        jobs = parse_jobs({"jobs": [raw, VALID["mysql"]]}, strict=strict)
    except RequestInvalid as problem:
        assert strict
        check_problem(problem)
        return
    assert len(jobs) == 2 and isinstance(jobs[1], Endpoint)


# ---------------------------------------------------------------- the ip grammar


@PROPERTIES
@given(HOSTILE_TEXT, st.integers(1, 65535))
def test_any_text_is_a_host_or_a_value_error(text: str, port: int) -> None:
    try:
        host = parse_host(text, port)
    except ValueError:
        return
    assert_usable_host(host.host)
    assert host.port == port
    assert parse_host(host.host, port) == host  # normal form is a fixed point


@PROPERTIES
@given(HOSTILE_TEXT)
def test_any_text_is_a_host_list_or_a_value_error(text: str) -> None:
    try:
        hosts = parse_host_list(text)
    except ValueError:
        return
    assert 1 <= len(hosts) <= 64 and len(set(hosts)) == len(hosts)
    for host in hosts:
        assert_usable_host(host.host)
    assert parse_host_list(",".join(str(h) for h in hosts)) == hosts


@PROPERTIES
@given(IP, st.booleans(), st.text(" \t", max_size=2))
def test_ip_literals_are_accepted_in_every_spelling(address: Any, bracket: bool,
                                                   space: str) -> None:
    text = space + host_text(address, bracket) + space
    assert parse_host(text, 5432) == HostPort(str(address), 5432)
    if address.version == 6:
        upper = space + str(address).upper() + space
        assert parse_host(upper, 1) == HostPort(str(address), 1)


@PROPERTIES
@given(HOSTNAME, st.booleans())
def test_host_names_are_accepted_and_lowercased(name: str, trailing_dot: bool) -> None:
    assert parse_host(name + ("." if trailing_dot else ""), 3306) == HostPort(name.lower(), 3306)


@PROPERTIES
@given(st.lists(ENTRY, min_size=1, max_size=8), st.text(" ", max_size=2))
def test_host_lists_round_trip(entries: list[tuple[str, int | None]], space: str) -> None:
    text = ",".join(space + (f"{h}:{p}" if p is not None else h) + space for h, p in entries)
    hosts = parse_host_list(text)
    expected = [HostPort(str(ipaddress.ip_address(h.strip("[]"))) if _is_ip(h) else h.lower(),
                         p or 27017) for h, p in entries]
    assert list(hosts) == list(dict.fromkeys(expected))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("text", ["a\n.b", "db\n.example.com", "::1%a b", "::1%x\ty",
                                  "[::1%a,b]"])
def test_hosts_with_control_characters_or_odd_zones_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text, 1)


@pytest.mark.parametrize("text", ["h:\u0663\u0663\u0660\u0666", "h:\u00b2", "h:+80", "h: 80x"])
def test_ports_are_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="port must be"):
        parse_host_list(text)


# ---------------------------------------------------------------- the network policy


POLICIES = [
    NetworkPolicy(),
    NetworkPolicy.build(allow=["10.0.0.0/8", "127.0.0.0/8"], deny=["10.9.0.0/16"],
                        ports=[3306, 5432]),
    NetworkPolicy.build(deny=["0.0.0.0/0", "::/0"]),
]


@PROPERTIES
@given(st.ip_addresses(v=4), st.integers(1, 65535), st.sampled_from(range(len(POLICIES))))
def test_ipv4_mapped_addresses_get_the_ipv4_answer(address: ipaddress.IPv4Address, port: int,
                                                   which: int) -> None:
    policy = POLICIES[which]
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert policy.allows(mapped, port) == policy.allows(address, port)


@PROPERTIES
@given(IP, st.integers(1, 65535))
def test_the_default_policy_denies_its_ranges_and_nothing_else(address: Any, port: int) -> None:
    denied = any(address in ipaddress.ip_network(net) for net in DEFAULT_DENY
                 if ipaddress.ip_network(net).version == address.version)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        v4 = address.ipv4_mapped
        denied = any(v4 in ipaddress.ip_network(net) for net in DEFAULT_DENY
                     if ipaddress.ip_network(net).version == 4)
    assert NetworkPolicy().allows(address, port) is not denied
