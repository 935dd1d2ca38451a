"""The one shape every engine's checker has, and what checkers share.

A `Checker` turns a `Target` into `Facts` (server version, address reached,
TLS facts) or raises `ProbeFailure` with a catalog code. Single-host engines
(`SingleHostChecker`) implement `check_address()`; their `check()` resolves the
host (through the network policy) and tries each address within the deadline.

`Trace` records where a probe is (resolve, connect, login, query) and how long
each phase took. The TCP connect inside a driver is observed through a
`create_connection` hook installed once on the running loop: it marks the
moment TCP is established (so a deadline that fires afterwards is a handshake
timeout, not a connect timeout) and bounds the TCP connect by the connect
timeout for drivers whose own timeout covers the whole login (asyncpg). It
also lets a checker judge the server's first bytes (`_Sniffer`), so a probe
pointed at the wrong kind of server fails at once as a protocol mismatch.
The same hook applies the probe's `NetworkPolicy` to every address a driver
resolves (denied ones are taken out of the answer) and connects to, so the
addresses a driver finds by itself (PyMongo re-resolves host names and connects
to the replica-set members a server advertises) are held to the policy too.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import ipaddress
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import anyio

from probe.addresses import HostPort, NetworkPolicy, Resolved, hosts_label, resolve
from probe.errors import ErrorCode, ProbeFailure, scrub
from probe.tls import PeerHandshake, observe_handshakes, recording_handshakes

if TYPE_CHECKING:
    from probe.tls import TLSMaterial


@dataclass(frozen=True, slots=True, repr=False)
class Target:
    """Everything a checker needs to probe one endpoint. The password never shows in repr."""

    db_type: str
    hosts: tuple[HostPort, ...]
    user: str
    password: str
    database: str | None
    tls: TLSMaterial | None = None
    policy: NetworkPolicy = field(default_factory=NetworkPolicy)

    @property
    def label(self) -> str:
        return hosts_label(self.hosts)

    @property
    def database_shown(self) -> str:
        """``db_name 'x'`` for a message, masked first: quoting escapes what a
        later scrub would look for."""
        return f"db_name {scrub(self.database or '', self.password)!r}"

    def __repr__(self) -> str:
        return f"Target({self.db_type} {self.user}@{self.label}, tls={self.tls is not None})"


@dataclass(slots=True)
class Facts:
    """What a successful probe learned."""

    server_version: str | None = None
    address: str | None = None
    tls: dict[str, str | None] | None = None
    replica_set: dict[str, Any] | None = None


class Trace:
    """Where one probe is and how long each phase took (milliseconds)."""

    def __init__(
        self, deadline: float, connect_timeout: float, policy: NetworkPolicy | None = None,
        *, batch_deadline: bool = False,
    ) -> None:
        self.deadline = deadline  # loop time
        self.connect_timeout = connect_timeout
        self.policy = policy  # applied by the loop hook to every connect of this probe
        self.stage = "queued"
        self.batch_deadline = batch_deadline  # the deadline is the batch's, before the probe's own
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.address: str | None = None
        self.tcp_connected = False
        # Set by a checker: given the server's first bytes, why they are not
        # this protocol (None when they may be). Set by the sniffer: that reason.
        self.first_answer_check: Callable[[bytes], str | None] | None = None
        self.mismatch: str | None = None
        self.on_mismatch: Callable[[], object] | None = None  # called when `mismatch` is set
        self.closed_unanswered = False  # a server closed a connection before sending a byte
        self.first_answer: bytes | None = None  # the first bytes a server sent, if any
        self.server_offers_tls = False  # the server's greeting advertised TLS (MySQL)
        # The TLS connections made over sockets a driver connected itself (PyMongo),
        # by peer (ip, port): their SSL objects, for the TLS facts.
        self.tls_peers: dict[tuple[str, int], Any] = {}
        # The last TLS handshake as the server sent it, kept when it failed.
        self.handshake = PeerHandshake()

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def connect_budget(self) -> float:
        return max(0.0, min(self.connect_timeout, self.remaining()))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.stage = self.stage, name
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            self.phases[name] = round(self.phases.get(name, 0.0) + elapsed, 3)
            self.stage = previous if name == "connect" else self.stage

    def mismatch_failure(self, target: str) -> ProbeFailure:
        """What the server's unexpected first bytes mean (call when `mismatch` is set)."""
        if self.mismatch == TLS_SPEAKER:
            return ProbeFailure(ErrorCode.SSL_REQUIRED_BY_SERVER, target=target)
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=target, cause=self.mismatch or "")

    def timeout_failure(self, target: str) -> ProbeFailure:
        """The failure to report when the deadline cut this probe where it stood."""
        if self.mismatch is not None:
            return self.mismatch_failure(target)
        if self.stage == "resolve":
            return ProbeFailure(ErrorCode.DNS_FAILURE, target=target, cause="timed out")
        # Whether TCP had connected decides, not the stage name: a deadline that
        # cuts the connect inside a driver's "login" is still a connect timeout.
        if self.stage in ("queued", "connect") or not self.tcp_connected:
            return ProbeFailure(ErrorCode.CONNECT_TIMEOUT, target=target, cause=self._waited())
        return ProbeFailure(ErrorCode.HANDSHAKE_TIMEOUT, target=target, cause=self._waited())

    def allows(self, host: object, port: object) -> bool:
        """Whether the policy lets this probe connect to host:port (a host name
        passes here: what it resolves to is checked when it is resolved)."""
        if self.policy is None:
            return True
        text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
        try:
            address = ipaddress.ip_address(text.split("%")[0])
            number = int(port)  # type: ignore[call-overload]
        except (ValueError, TypeError):
            return True
        return self.policy.allows(address, number)

    def check_policy(self, host: object, port: object) -> None:
        """Raise NETWORK_POLICY_DENIED unless the policy allows connecting to host:port."""
        if not self.allows(host, port):
            text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
            shown = f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
            raise ProbeFailure(ErrorCode.NETWORK_POLICY_DENIED, target=shown)

    def failure_facts(self) -> Facts | None:
        """What a failed probe still learned: the address that answered, the TLS facts."""
        tls = self.handshake.facts()
        address = self.address if self.tcp_connected else None
        return Facts(address=address, tls=tls) if tls or address else None

    def _waited(self) -> str:
        waited = time.perf_counter() - self.started  # phases nest (login holds connect)
        if self.batch_deadline:  # the user's batch deadline cut it, not the target's silence
            return f"cut by the batch deadline (--batch-timeout) after {waited:.1f} s"
        return f"waited {waited:.1f} s" if self.phases else ""


_current: ContextVar[Trace | None] = ContextVar("probe_trace", default=None)


@contextmanager
def tracing(trace: Trace) -> Iterator[None]:
    """Make `trace` the one the loop hook reports TCP connects to, in this task."""
    install_loop_hook()
    token = _current.set(trace)
    try:
        with recording_handshakes(trace.handshake):
            yield
    finally:
        _current.reset(token)


def install_loop_hook() -> None:
    loop = asyncio.get_running_loop()
    if getattr(loop, "_probe_hooked", False):
        return
    original: Callable[..., Awaitable[Any]] = loop.create_connection
    original_sock_connect: Callable[..., Awaitable[Any]] = loop.sock_connect
    original_getaddrinfo: Callable[..., Awaitable[Any]] = loop.getaddrinfo

    async def create_connection(
        protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> Any:
        trace = _current.get()
        if trace is None:
            return await original(protocol_factory, *args, **kwargs)

        def sniffing_factory() -> asyncio.BaseProtocol:
            inner = protocol_factory()
            if isinstance(inner, asyncio.BufferedProtocol):
                return _BufferedSniffer(inner, trace)
            if isinstance(inner, asyncio.Protocol):
                return _Sniffer(inner, trace)
            return inner

        if kwargs.get("sock") is not None:
            # An already connected socket (PyMongo connects it with sock_connect,
            # aiomysql hands it over for TLS): look at its bytes, time nothing.
            if isinstance(kwargs.get("ssl"), ssl.SSLContext):
                # PyMongo's context, built per client from our CA file (ours are
                # observed when they are built)
                observe_handshakes(kwargs["ssl"])
            transport, protocol = await original(sniffing_factory, *args, **kwargs)
            if kwargs.get("ssl") is not None:
                peer = transport.get_extra_info("peername")
                if peer:
                    trace.tls_peers[(peer[0], peer[1])] = transport.get_extra_info("ssl_object")
            return transport, getattr(protocol, "inner", protocol)

        host = args[0] if args else kwargs.get("host")
        port = args[1] if len(args) > 1 else kwargs.get("port")
        trace.check_policy(host, port)
        with trace.phase("connect"):
            # Not asyncio.wait_for: cancelled (the probe's deadline, a cancelled
            # batch) just as the connect completes, it drops the new transport,
            # left open with nobody to close it. Awaited directly, the connect
            # closes its own socket when it is cancelled.
            with anyio.move_on_after(trace.connect_budget()) as budget:
                transport, protocol = await original(sniffing_factory, *args, **kwargs)
            if budget.cancelled_caught:
                raise ProbeFailure(
                    ErrorCode.CONNECT_TIMEOUT,
                    target=trace.address or "",
                    cause=f"no answer within {trace.connect_timeout:g} s",
                )
            trace.tcp_connected = True
            return transport, getattr(protocol, "inner", protocol)

    async def sock_connect(sock: Any, address: Any) -> None:
        # PyMongo connects its own sockets (with its own timeout), to addresses
        # it resolved itself: hold them to the policy, and note success.
        trace = _current.get()
        if trace is not None and isinstance(address, tuple) and len(address) >= 2:
            try:
                trace.check_policy(address[0], address[1])
            except ProbeFailure:
                sock.close()  # PyMongo closes its socket only after an OSError
                raise
        try:
            await original_sock_connect(sock, address)
        except asyncio.CancelledError:
            # PyMongo closes the socket of a failed connect, but not of a
            # cancelled one (a probe that ends while a monitor still connects).
            sock.close()
            raise
        if trace is not None:
            trace.tcp_connected = True

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        # A name a driver resolves by itself comes back with the denied addresses
        # taken out, so the driver tries the allowed ones, as `resolve()` does.
        # When all are denied the answer stays whole and the connect is refused:
        # PyMongo deadlocks in close() when its own lookup fails.
        infos = await original_getaddrinfo(host, port, *args, **kwargs)
        trace = _current.get()
        if trace is None:
            return infos
        return [info for info in infos if trace.allows(info[4][0], info[4][1])] or infos

    loop.create_connection = create_connection  # type: ignore[method-assign]
    loop.sock_connect = sock_connect  # type: ignore[method-assign]
    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
    loop._probe_hooked = True  # type: ignore[attr-defined]


class _Forwarder(asyncio.BaseProtocol):
    """Forwards a transport's events to the driver's protocol, looking at the first bytes.

    When the checker said what a first answer of its protocol looks like
    (`Trace.first_answer_check`) and the server says something else, the
    connection is aborted at once and the trace records why: a PostgreSQL
    probe pointed at a MySQL or SSH port fails in milliseconds, not at its deadline.
    """

    def __init__(self, inner: asyncio.BaseProtocol, trace: Trace) -> None:
        self.inner: Any = inner
        self._trace: Trace | None = trace
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.inner.connection_made(transport)

    def _first_bytes_wrong(self, data: bytes) -> bool:
        """Judge the first bytes once; True when the connection was aborted for them."""
        trace, self._trace = self._trace, None
        if trace is not None and trace.first_answer is None:
            trace.first_answer = bytes(data[:16])
        check = trace.first_answer_check if trace is not None else None
        cause = check(data) if check is not None else None
        if trace is None or cause is None or self._transport is None:
            return False
        trace.mismatch = cause
        self._transport.abort()
        if trace.on_mismatch is not None:
            trace.on_mismatch()
        return True

    def eof_received(self) -> bool | None:
        if self._trace is not None:
            self._trace.closed_unanswered = True
        keep_open: bool | None = self.inner.eof_received()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        if self._trace is not None and isinstance(exc, ConnectionResetError):
            self._trace.closed_unanswered = True
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Sniffer(_Forwarder, asyncio.Protocol):
    """A forwarder for a driver protocol that takes bytes (asyncpg, aiomysql)."""

    def data_received(self, data: bytes) -> None:
        if self._trace is not None and self._first_bytes_wrong(data):
            return
        self.inner.data_received(data)


class _BufferedSniffer(_Forwarder, asyncio.BufferedProtocol):
    """A forwarder for a driver protocol that reads into its own buffers (PyMongo).

    Deliberately not a subclass of asyncio.Protocol: event loops (uvloop among
    them) choose the buffered path by what the protocol is an instance of.
    """

    _buffer: Any = None

    def get_buffer(self, sizehint: int) -> Any:
        self._buffer = self.inner.get_buffer(sizehint)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._trace is not None and nbytes and self._first_bytes_wrong(
            bytes(self._buffer[:nbytes])
        ):
            return
        self.inner.buffer_updated(nbytes)


# ---------------------------------------------------------------- classification helpers


TLS_SPEAKER = "the server speaks TLS from the first byte on this port"


def looks_like_tls(data: bytes | None) -> bool:
    """A TLS record: handshake (22) or alert (21), version 3.x."""
    return data is not None and len(data) >= 3 and data[0] in (21, 22) and data[1] == 3


def describe_stranger(data: bytes) -> str | None:
    """What kind of server sent `data` first, when it is one we can name."""
    if looks_like_tls(data):
        return TLS_SPEAKER
    if data.startswith(b"SSH-"):
        return "an SSH server answers on this port"
    # MySQL greeting: 3-byte length, sequence 0, protocol version 10, version text.
    if len(data) >= 6 and data[3] == 0 and data[4] == 10 and data[5:6].isdigit():
        return "a MySQL server answers on this port"
    if data[:1] in (b"R", b"E") and len(data) >= 5 and data[1:3] == b"\0\0":
        return "a PostgreSQL server answers on this port"
    if data[:5] in (b"HTTP/", b"<html", b"<!DOC"):
        return "an HTTP server answers on this port"
    return None


_OS_ERRNO_CODES: dict[int, ErrorCode] = {
    errno.ECONNREFUSED: ErrorCode.CONNECTION_REFUSED,
    errno.ENETUNREACH: ErrorCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ErrorCode.NETWORK_UNREACHABLE,
    errno.EHOSTDOWN: ErrorCode.NETWORK_UNREACHABLE,
    errno.ECONNRESET: ErrorCode.CONNECTION_RESET,
    errno.EPIPE: ErrorCode.CONNECTION_RESET,
    errno.ECONNABORTED: ErrorCode.CONNECTION_RESET,
    errno.ETIMEDOUT: ErrorCode.CONNECT_TIMEOUT,
}
_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it was raised from or while handling, without loops."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def network_failure(exc: BaseException, target: str, trace: Trace) -> ProbeFailure | None:
    """The catalog failure for an OS-level, TLS or stream error anywhere on the chain.

    Checks the most specific evidence first: our own failures, TLS errors, then
    errnos, then a peer that closed the stream.
    """
    if trace.mismatch is not None:
        return trace.mismatch_failure(target)
    links = list(chain(exc))
    for link in links:
        if isinstance(link, ProbeFailure):
            return link
    for link in links:
        if isinstance(link, ssl.SSLCertVerificationError):
            return ProbeFailure(
                ErrorCode.SSL_VERIFY_FAILED, target=target, cause=link.verify_message or ""
            )
        if isinstance(link, ssl.SSLError) and not isinstance(link, ssl.SSLEOFError):
            return ProbeFailure(
                ErrorCode.SSL_HANDSHAKE_FAILED, target=target, cause=link.reason or ""
            )
    for link in links:
        if isinstance(link, OSError) and link.errno in _LOCAL_ERRNOS:
            return ProbeFailure(
                ErrorCode.INTERNAL,
                target=target,
                cause=f"{errno.errorcode[link.errno]}, {os.strerror(link.errno).lower()}",
                local=True,
            )
        if isinstance(link, OSError) and link.errno in _OS_ERRNO_CODES:
            return ProbeFailure(_OS_ERRNO_CODES[link.errno], target=target)
    for link in links:
        if isinstance(link, TimeoutError):
            code = ErrorCode.HANDSHAKE_TIMEOUT if trace.tcp_connected else ErrorCode.CONNECT_TIMEOUT
            return ProbeFailure(code, target=target)
        if isinstance(link, (ConnectionError, EOFError, ssl.SSLEOFError)):
            return ProbeFailure(
                ErrorCode.CONNECTION_RESET, target=target, cause="connection closed by the server"
            )
    return None


# Failures after which the next address of the same name is worth trying.
NEXT_ADDRESS = frozenset(
    {
        ErrorCode.CONNECTION_REFUSED,
        ErrorCode.CONNECT_TIMEOUT,
        ErrorCode.NETWORK_UNREACHABLE,
        ErrorCode.NETWORK_POLICY_DENIED,
    }
)


class Checker(abc.ABC):
    """One engine family's probe: `check()` returns Facts or raises ProbeFailure."""

    name: ClassVar[str]
    default_port: ClassVar[int]
    default_database: ClassVar[str | None] = None
    host_list: ClassVar[bool] = False  # the ip field is a host list (MongoDB)

    def fds(self, hosts: int) -> int:
        """File descriptors one probe of `hosts` listed hosts may hold at once: its
        socket and the duplicate aiomysql's TLS upgrade makes."""
        return 2

    @abc.abstractmethod
    async def check(self, target: Target, trace: Trace) -> Facts:
        """Probe `target` within `trace`'s deadline."""


class SingleHostChecker(Checker):
    """An engine reached at one host: subclasses implement `check_address`."""

    async def check(self, target: Target, trace: Trace) -> Facts:
        """Resolve the host and try each allowed address until one answers."""
        host = target.hosts[0]
        with trace.phase("resolve"):
            addresses = await resolve(host, target.policy)
        failure: ProbeFailure | None = None
        for address in addresses:
            trace.address = str(address)
            trace.tcp_connected = False
            trace.handshake.clear()
            try:
                return await self.check_address(target, address, trace)
            except ProbeFailure as exc:
                failure = exc
                if exc.code not in NEXT_ADDRESS or trace.remaining() <= 0:
                    raise
        assert failure is not None
        raise failure

    @abc.abstractmethod
    async def check_address(self, target: Target, address: Resolved, trace: Trace) -> Facts:
        """Log in at `address`, run a trivial command, and report the facts."""
