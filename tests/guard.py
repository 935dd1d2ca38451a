"""The loopback guard: no test probe reaches beyond 127.0.0.0/8 and ::1, or the resolver.

`loopback_only()` sits on the running loop, underneath the probe's own loop
hook: it refuses (before any packet) every connect outside loopback and answers
host names from a table of its own, never from the system resolver (whose
server is not on this machine). Tests that resolve names, or that could reach
a non-loopback address through a bug, take the `net` fixture (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from probe.checkers.base import install_loop_hook

Addresses = list[str] | Callable[[], list[str]]


def _literal(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


@dataclass
class Network:
    """What the probes did on the network inside `loopback_only()`.

    `names` answers lookups (a list, or a callable giving the list of this
    lookup); `connects` holds every (ip, port) a connect was attempted to (the
    asyncio loop reports a `create_connection` twice: once itself, once through
    `sock_connect`); `blocked` every attempt the guard refused; `source`, when
    set, binds the probes' sockets to that loopback address.
    """

    names: dict[str, Addresses] = field(default_factory=dict)
    source: str | None = None
    connects: list[tuple[str, int]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def attempt(self, host: object, port: object, how: str) -> None:
        address = _literal(host)
        if address is None or not address.is_loopback:
            self.blocked.append(f"{how} {host!r}:{port}")
            raise OSError(errno.ENETUNREACH, "blocked by the tests' loopback guard")
        self.connects.append((str(address), int(port)))  # type: ignore[call-overload]

    def reached(self, ip: str) -> bool:
        return any(host == ip for host, _ in self.connects)

    def answer(self, name: str, port: Any, family: int) -> list[Any]:
        self.lookups.append(name)
        entry = self.names.get(name)
        addresses = entry() if callable(entry) else (entry or [])
        infos: list[Any] = []
        for ip in addresses:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family not in (0, fam):
                continue
            number = int(port or 0)
            sockaddr = (ip, number, 0, 0) if fam == socket.AF_INET6 else (ip, number)
            infos.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos


@asynccontextmanager
async def loopback_only(
    names: dict[str, Addresses] | None = None, *, source: str | None = None
) -> AsyncIterator[Network]:
    """Guard the running loop (see the module docstring); yields the `Network` record."""
    loop = asyncio.get_running_loop()
    if getattr(loop, "_probe_hooked", False):
        raise RuntimeError("loopback_only() must come before the first probe on its loop")
    net = Network(dict(names or {}), source=source)
    create_connection, sock_connect, getaddrinfo = (
        loop.create_connection, loop.sock_connect, loop.getaddrinfo)

    async def guarded_create_connection(factory: Any, host: Any = None, port: Any = None,
                                        **kwargs: Any) -> Any:
        if kwargs.get("sock") is None:
            net.attempt(host, port, "create_connection")
            if net.source is not None:
                kwargs.setdefault("local_addr", (net.source, 0))
        return await create_connection(factory, host, port, **kwargs)

    async def guarded_sock_connect(sock: Any, address: Any) -> Any:
        net.attempt(address[0], address[1], "sock_connect")
        return await sock_connect(sock, address)

    async def guarded_getaddrinfo(host: Any, port: Any, *, family: int = 0, type: int = 0,
                                  proto: int = 0, flags: int = 0) -> Any:
        name = host.decode("idna") if isinstance(host, bytes) else host
        if name is None or _literal(name) is not None or name == "localhost":
            return await getaddrinfo(host, port, family=family, type=type, proto=proto,
                                     flags=flags)
        return net.answer(name, port, family)

    loop.create_connection = guarded_create_connection  # type: ignore[method-assign]
    loop.sock_connect = guarded_sock_connect  # type: ignore[method-assign]
    loop.getaddrinfo = guarded_getaddrinfo  # type: ignore[method-assign]
    install_loop_hook()  # the probe's hook goes on top: the guard sees what really goes out
    try:
        yield net
    finally:
        loop.create_connection = create_connection  # type: ignore[method-assign]
        loop.sock_connect = sock_connect  # type: ignore[method-assign]
        loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
        del loop._probe_hooked  # type: ignore[attr-defined]


