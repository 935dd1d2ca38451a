"""The ip grammar, resolution and the network policy."""

from __future__ import annotations

import ipaddress

import pytest

from probe.addresses import HostPort, NetworkPolicy, parse_host, parse_host_list, resolve
from probe.errors import ErrorCode, ProbeFailure
from tests.guard import Network


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("192.168.0.27", "192.168.0.27"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("2001:DB8::0:1", "2001:db8::1"),
        ("db.example.com", "db.example.com"),
        ("DB-1.Example.COM.", "db-1.example.com"),
    ],
)
def test_single_hosts(text: str, host: str) -> None:
    assert parse_host(text, 5432) == HostPort(host, 5432)


@pytest.mark.parametrize(
    "text", ["", "1.2.3.4:5", "[::1]:5", "999.1.1.1", "1.2.3", "a b", "-a.com", "a..b", "[zz]"]
)
def test_bad_single_hosts(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text, 1)


def test_host_lists() -> None:
    hosts = parse_host_list("192.168.4.66:8635, 192.168.4.83:8635,[::1]:27018,name,::1")
    assert [str(h) for h in hosts] == [
        "192.168.4.66:8635", "192.168.4.83:8635", "[::1]:27018", "name:27017", "[::1]:27017"
    ]
    assert len(parse_host_list("a:1,a:1")) == 1
    for bad in ("a:1,", "a:0", "a:x", "[::1]x", ",", "a:1:2:zz"):
        with pytest.raises(ValueError):
            parse_host_list(bad)


def test_default_policy_denies_metadata_and_link_local() -> None:
    policy = NetworkPolicy()
    for denied in ("169.254.169.254", "0.0.0.0", "fe80::1", "224.0.0.1", "255.255.255.255",
                   "::ffff:169.254.169.254"):
        assert not policy.allows(ipaddress.ip_address(denied), 80), denied
    for allowed in ("127.0.0.1", "::1", "10.1.2.3"):
        assert policy.allows(ipaddress.ip_address(allowed), 80)


def test_allow_lists_and_ports() -> None:
    policy = NetworkPolicy.build(allow=["127.0.0.0/8"], deny=["127.0.0.2/32"], ports=[5432])
    assert policy.allows(ipaddress.ip_address("127.0.0.1"), 5432)
    assert not policy.allows(ipaddress.ip_address("127.0.0.1"), 3306)
    assert not policy.allows(ipaddress.ip_address("127.0.0.2"), 5432)
    assert not policy.allows(ipaddress.ip_address("10.0.0.1"), 5432)


@pytest.mark.anyio
async def test_resolution(net: Network) -> None:
    found = await resolve(HostPort("localhost", 5432), NetworkPolicy())
    assert found and all(r.ip in ("127.0.0.1", "::1") for r in found)
    literal = await resolve(HostPort("::1", 1), NetworkPolicy())
    assert [str(r) for r in literal] == ["[::1]:1"]
    mapped = await resolve(HostPort("::FFFF:127.0.0.1", 1), NetworkPolicy())
    assert [str(r) for r in mapped] == ["[::ffff:127.0.0.1]:1"]  # not [::ffff:7f00:1]
    with pytest.raises(ProbeFailure) as caught:
        await resolve(HostPort("no-such-host.invalid", 1), NetworkPolicy())
    assert caught.value.code is ErrorCode.DNS_FAILURE
    with pytest.raises(ProbeFailure) as caught:
        await resolve(HostPort("169.254.169.254", 80), NetworkPolicy())
    assert caught.value.code is ErrorCode.NETWORK_POLICY_DENIED
