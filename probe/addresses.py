"""Where an endpoint lives: the `ip` grammar, resolution, and the network policy.

The `ip` field is one host for MySQL/PostgreSQL (IPv4, IPv6 with or without
brackets, or a DNS name; the port lives in `db_port`) and a comma-separated
list of ``host[:port]`` for MongoDB (a missing port means 27017).

Every address a probe connects to comes out of `resolve()`, which applies the
`NetworkPolicy` to each resolved address; checkers connect to those literal
addresses, never to the name again, so a second DNS answer cannot slip past
the policy.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio

from probe.errors import ErrorCode, ProbeFailure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MONGODB_DEFAULT_PORT = 27017
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # fullmatch: "$" would allow a "\n"
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an IPv6 zone: an interface name or number


@dataclass(frozen=True, slots=True)
class HostPort:
    """One ``host:port`` as the user wrote it (host is a name or an IP literal)."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def hosts_label(hosts: Sequence[HostPort]) -> str:
    """The hosts as the user wrote them, for messages: ``10.0.0.1:3306`` or ``a:1,b:2``."""
    return ",".join(str(h) for h in hosts)


def _valid_host(host: str) -> str:
    """`host` normalised (IP literals compressed), or ValueError with the reason."""
    if not host:
        raise ValueError("empty host")
    if host.startswith("[") and host.endswith("]"):
        try:
            return _literal(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError("not a valid IPv6 address") from None
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    else:
        return host  # a dotted quad; inet_pton refuses leading zeros, as ipaddress does
    try:
        return _literal(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        raise ValueError("not a valid IPv6 address")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError("not a valid IP address or host name")
    if all(label.isdigit() for label in name.split(".")):
        raise ValueError("not a valid IPv4 address")
    return name.lower()


def _literal(address: IPAddress) -> str:
    """An IP literal as text; ValueError for an IPv6 zone that is no interface name."""
    zone = getattr(address, "scope_id", None)
    if zone is not None and not _ZONE.fullmatch(zone):
        raise ValueError("not a valid IPv6 address")
    return str(address)


def _valid_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return int(text)


def parse_host(ip: str, port: int) -> HostPort:
    """The one host of a MySQL/PostgreSQL `ip` field; ValueError says what is wrong."""
    text = ip.strip()
    if text.count(":") == 1 or (text.startswith("[") and "]:" in text):
        raise ValueError("ip holds a port; put the port in db_port")
    return HostPort(_valid_host(text), port)


def parse_host_list(ip: str, default_port: int = MONGODB_DEFAULT_PORT) -> tuple[HostPort, ...]:
    """The hosts of a MongoDB `ip` field (``h1:p1,h2,[::1]:p3``); ValueError says what is wrong."""
    hosts: list[HostPort] = []
    for raw in ip.split(","):
        entry = raw.strip()
        if not entry:
            raise ValueError("empty entry in the host list")
        if entry.startswith("["):
            host, _, rest = entry.partition("]")
            host += "]"
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad entry {entry!r}")
            port = _valid_port(rest[1:]) if rest else default_port
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
            port = _valid_port(port_text)
        else:
            host, port = entry, default_port
        hosts.append(HostPort(_valid_host(host), port))
    if len(hosts) > 64:
        raise ValueError("more than 64 hosts")
    return tuple(dict.fromkeys(hosts))


# ---------------------------------------------------------------- network policy

DEFAULT_DENY: tuple[str, ...] = (
    "0.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata
    "224.0.0.0/4",  # multicast
    "255.255.255.255/32",  # broadcast
    "::/128",
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)


@dataclass(frozen=True)
class NetworkPolicy:
    """Which resolved addresses and ports a probe may connect to.

    An address is allowed when it is in no `deny` network and, if `allow` is
    not empty, in one of the `allow` networks; a port when `ports` is empty or
    holds it. Deny wins over allow.
    """

    deny: tuple[IPNetwork, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in DEFAULT_DENY)
    )
    allow: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()

    @classmethod
    def build(
        cls,
        *,
        deny: Iterable[str] = (),
        allow: Iterable[str] = (),
        ports: Iterable[int] = (),
        default_deny: bool = True,
    ) -> NetworkPolicy:
        base = DEFAULT_DENY if default_deny else ()
        return cls(
            deny=tuple(ipaddress.ip_network(n, strict=False) for n in (*base, *deny)),
            allow=tuple(ipaddress.ip_network(n, strict=False) for n in allow),
            ports=frozenset(ports),
        )

    @classmethod
    def from_text(cls, deny: str = "", allow: str = "", ports: str = "") -> NetworkPolicy:
        """The policy of comma-separated option values (PROBE_DENY_CIDR, PROBE_ALLOW_CIDR,
        PROBE_ALLOW_PORTS); ValueError names the option and the item it cannot use."""
        for option, text in (("deny", deny), ("allow", allow)):
            for item in _items(text):
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"--{option}-cidr / PROBE_{option.upper()}_CIDR: "
                                     f"{item!r} is not a network (e.g. 10.0.0.0/8)") from None
        return cls.build(deny=_items(deny), allow=_items(allow),
                         ports=parse_ports(ports, "--allow-ports / PROBE_ALLOW_PORTS"))

    def allows(self, address: IPAddress, port: int) -> bool:
        if self.ports and port not in self.ports:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny):
            return False
        return not self.allow or any(address in net for net in self.allow)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_ports(text: str, source: str) -> list[int]:
    """The ports of a comma-separated list; ValueError names `source` and the bad item."""
    ports: list[int] = []
    for item in _items(text):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"{source}: {item!r} is not a port from 1 to 65535")
        ports.append(int(item))
    return ports


# ---------------------------------------------------------------- resolution


@dataclass(frozen=True, slots=True)
class Resolved:
    """One address to connect to: the literal IP, its port, and the name it came from."""

    ip: str
    port: int
    family: int
    origin: HostPort

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


async def resolve(target: HostPort, policy: NetworkPolicy) -> list[Resolved]:
    """The addresses of `target` that the policy allows, in resolver order.

    Raises ProbeFailure(DNS_FAILURE) when the name does not resolve and
    ProbeFailure(NETWORK_POLICY_DENIED) when every address is denied.
    """
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:  # one address, parsed once
        plain = ipaddress.ip_address(target.host.split("%")[0]) if "%" in target.host else literal
        if not policy.allows(plain, target.port):
            raise ProbeFailure(ErrorCode.NETWORK_POLICY_DENIED, target=str(target))
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        mapped = literal.ipv4_mapped if isinstance(literal, ipaddress.IPv6Address) else None
        # Python 3.11 writes ::ffff:127.0.0.1 as ::ffff:7f00:1: keep the readable form
        text = f"::ffff:{mapped}" if mapped is not None and "%" not in target.host else str(literal)
        return [Resolved(text, target.port, family, target)]
    try:
        infos = await anyio.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise ProbeFailure(
            ErrorCode.DNS_FAILURE, target=str(target), cause=_gai_cause(exc)
        ) from exc
    found = dict.fromkeys((int(fam), str(sa[0])) for fam, _, _, _, sa in infos)
    allowed = [
        Resolved(ip, target.port, fam, target)
        for fam, ip in found
        if policy.allows(ipaddress.ip_address(ip.split("%")[0]), target.port)
    ]
    if not allowed:
        raise ProbeFailure(ErrorCode.NETWORK_POLICY_DENIED, target=str(target))
    return allowed


def _gai_cause(exc: socket.gaierror) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
        return "no such host"
    if exc.errno == socket.EAI_AGAIN:
        return "temporary failure in name resolution"
    return "resolver error"
