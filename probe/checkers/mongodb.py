"""MongoDB and DDS, through PyMongo's native async API (`pymongo.AsyncMongoClient`).

Credentials go in as ``username=``/``password=``/``authSource=`` arguments,
never pasted into a URI. One host: ``directConnection=True``; several: the
driver discovers the replica set. Every PyMongo timeout is bounded by what is
left of the endpoint's deadline (PyMongo otherwise waits 30 s to select a
server), and the client is closed on every path.

When server selection fails, the driver's topology description says what each
member answered; that, not the error text, decides the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
from pymongo import AsyncMongoClient
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ProtocolError,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
    ServerHeartbeatFailedEvent,
    ServerHeartbeatListener,
    ServerHeartbeatStartedEvent,
    ServerHeartbeatSucceededEvent,
)

from probe.addresses import HostPort, hosts_label, resolve
from probe.checkers.base import (
    TLS_SPEAKER,
    Checker,
    Facts,
    Target,
    Trace,
    chain,
    describe_stranger,
    looks_like_tls,
    network_failure,
)
from probe.errors import ErrorCode, ProbeFailure, scrub
from probe.tls import tls_facts

log = logging.getLogger("probe")

# MongoDB server error codes (src/mongo/base/error_codes.yml).
_SERVER_CODES: dict[int, ErrorCode] = {
    18: ErrorCode.AUTH_FAILED,  # AuthenticationFailed
    11: ErrorCode.AUTH_FAILED,  # UserNotFound
    13: ErrorCode.ACCESS_DENIED,  # Unauthorized
    334: ErrorCode.AUTH_METHOD_UNSUPPORTED,  # MechanismUnavailable
    91: ErrorCode.SERVER_UNAVAILABLE,  # ShutdownInProgress
    11600: ErrorCode.SERVER_UNAVAILABLE,  # InterruptedAtShutdown
    11602: ErrorCode.SERVER_UNAVAILABLE,  # InterruptedDueToReplStateChange
    13436: ErrorCode.SERVER_UNAVAILABLE,  # NotPrimaryOrSecondary (recovering)
    189: ErrorCode.SERVER_UNAVAILABLE,  # PrimarySteppedDown
}
_MIN_MS = 100  # PyMongo rejects timeouts of 0
# Several hosts: stop waiting for a usable member this long before the deadline.
_SELECTION_MARGIN = 0.1


def _ms(seconds: float) -> int:
    return max(_MIN_MS, int(seconds * 1000))


@contextlib.contextmanager
def _ca_file(ca_pem: bytes | None) -> Iterator[str | None]:
    """The CA certificates in a private file (PyMongo wants a path), removed on every path."""
    if ca_pem is None:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="probe-ca-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(ca_pem)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# Closes that outlived their wait, referenced until they end or are given up.
_closing: set[asyncio.Task[None]] = set()
_CLOSE_WAIT = 5.0
_CLOSE_GIVE_UP = 60.0


async def _close(client: AsyncMongoClient[dict[str, Any]]) -> None:
    """Close the client, shielded from our cancellation, waiting at most _CLOSE_WAIT.

    close() waits for the monitor tasks to end; on a loop busy with hundreds of
    clients that can take seconds. It is never cancelled (PyMongo's cleanup
    does not survive anyio's repeated cancellation): past the wait it goes on
    in the background, so the probe answers. One that has not ended after
    _CLOSE_GIVE_UP (a topology lock leaked) is cancelled once and let go, so
    the garbage collector can stop the client's monitors and close its sockets.
    """
    task = asyncio.ensure_future(client.close())
    _closing.add(task)
    task.add_done_callback(_closed)
    with anyio.CancelScope(shield=True):
        await asyncio.wait([task], timeout=_CLOSE_WAIT)
    if not task.done():
        asyncio.get_running_loop().call_later(_CLOSE_GIVE_UP, _give_up, task)


def _give_up(task: asyncio.Task[None]) -> None:
    if not task.done():
        log.warning("a MongoDB client did not close in %g s; left to the garbage collector",
                    _CLOSE_WAIT + _CLOSE_GIVE_UP)
        task.cancel()  # once: a plain asyncio cancellation
    _closing.discard(task)


def _closed(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failed close changes no answer


def _ssl_object(
    peers: dict[tuple[str, int], Any], server: tuple[str, int | None] | None
) -> Any:
    """The SSL object of a connection to `server`, the member that answered.

    PyMongo names members as the topology does (perhaps by host name), the
    connections know only addresses: matched by address, else by port, else
    taken when every connection went to one address.
    """
    if server is None:
        return None
    if server in peers:
        return peers[server]
    by_port = [ssl_object for (_, port), ssl_object in peers.items() if port == server[1]]
    if len(by_port) == 1:
        return by_port[0]
    return next(iter(peers.values())) if len(peers) == 1 else None


class MongoDBChecker(Checker):
    name = "mongodb"
    default_port = 27017
    default_database = "admin"
    host_list = True

    def fds(self, hosts: int) -> int:
        # A monitor connection per listed host, the connection that runs the
        # command, and one member the seeds may advertise (measured: N seeds of
        # a set, N + 1 connections at peak).
        return hosts + 2

    async def check(self, target: Target, trace: Trace) -> Facts:
        with trace.phase("resolve"):
            seeds = await self._allowed_seeds(target)
        trace.address = hosts_label(seeds)
        remaining = trace.remaining()
        single = len(seeds) == 1
        # Several hosts: PyMongo's own timeouts end before ours, so that the
        # topology (what each member answered) decides the code.
        margin = 0.0 if single else _SELECTION_MARGIN
        heartbeat = _Heartbeats()
        answered_by = _AnsweredBy()  # which member's connection carried the commands
        client: AsyncMongoClient[dict[str, Any]] | None = None
        try:
            with trace.phase("login"):
                tls: dict[str, Any] = {"tls": target.tls is not None}
                with _ca_file(target.tls.ca_pem if target.tls else None) as ca_file:
                    if target.tls is not None:
                        tls["tlsCAFile"] = ca_file
                        tls["tlsAllowInvalidHostnames"] = not target.tls.context.check_hostname
                    # The client loads the CA file when it is built: the file can go at once.
                    client = AsyncMongoClient(
                        [str(h) for h in seeds],
                        username=target.user,
                        password=target.password,
                        authSource=target.database or "admin",
                        directConnection=len(seeds) == 1,
                        # A backstop: commands wait for a usable member in _ping.
                        serverSelectionTimeoutMS=_ms(remaining - margin),
                        # One host: up to the deadline itself, so that a timeout is
                        # never reported before it.
                        connectTimeoutMS=_ms(
                            min(trace.connect_timeout, remaining - margin)
                        ),
                        socketTimeoutMS=_ms(remaining),
                        appname="probe",
                        maxPoolSize=1,
                        # Polling: no streaming hello and no RTT-monitor connection,
                        # so a probe holds two sockets per member, not three.
                        serverMonitoringMode="poll",
                        retryReads=False,
                        retryWrites=False,
                        connect=False,
                        event_listeners=[
                            heartbeat, *([answered_by] if target.tls is not None else []),
                        ],
                        **tls,
                    )
                await self._ping(client, target, trace, heartbeat, single)
            with trace.phase("query"):
                build = await client.admin.command("buildInfo")
            return Facts(
                server_version=str(build.get("version")) if build.get("version") else None,
                address=trace.address,
                tls=tls_facts(_ssl_object(trace.tls_peers, answered_by.address)),
                replica_set=_replica_set(client),
            )
        except (ProbeFailure, PyMongoError) as exc:
            failure = exc if isinstance(exc, ProbeFailure) else classify(exc, target, trace, client)
            if failure.cause == _HUNG_UP:
                failure = (await _hung_up_on(seeds[0], failure, trace) if target.tls is None
                           else ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=failure.target,
                                             cause=_HUNG_UP_IN_TLS))
            raise failure from None
        finally:
            if client is not None:
                await _close(client)

    @staticmethod
    async def _ping(
        client: AsyncMongoClient[dict[str, Any]],
        target: Target,
        trace: Trace,
        heartbeat: _Heartbeats,
        single: bool,
    ) -> None:
        """Authenticate and ping, once the heartbeats say a member can answer.

        No command is sent before: one waiting in PyMongo's server selection
        cannot be cancelled safely. PyMongo waits for its topology in
        asyncio.wait_for around a Condition.wait; anyio cancels again at every
        await, and cancelled again while wait_for waits for that wait to take
        the lock back, it returns without the lock: ``Lock is not acquired``,
        and the topology lock left to a task nobody waits for.

        One host: its first heartbeat (or first bytes that are not MongoDB)
        decides. Several: a member able to take the command, or every member
        failed, or the margin before the deadline, whichever comes first.
        """
        await client.aconnect()  # starts the monitors: the first heartbeats
        where = trace.address or ""
        if single:
            trace.first_answer_check = first_answer_problem
            trace.on_mismatch = heartbeat.answered.set
            await heartbeat.answered.wait()
            if trace.mismatch is not None:
                raise trace.mismatch_failure(where)
            if heartbeat.error is not None:
                raise _member_failure(heartbeat.error, where, trace, single=True)
        else:
            give_up = trace.deadline - _SELECTION_MARGIN
            while True:
                beat = heartbeat.rearm()
                description = client.topology_description
                if description.has_writable_server():
                    break
                now = anyio.current_time()
                if now >= give_up or all(sd.error is not None
                                         for sd in description.server_descriptions().values()):
                    raise _topology_failure(client, target, trace)
                # A heartbeat is published before the topology records it: look
                # again after each, and at least every 0.1 s.
                with anyio.move_on_after(min(0.1, give_up - now)):
                    await beat.wait()
        await client.admin.command("ping")

    async def _allowed_seeds(self, target: Target) -> list[HostPort]:
        """The listed hosts that resolve and that the network policy allows."""
        allowed: list[HostPort] = []
        failure: ProbeFailure | None = None
        for host in target.hosts:
            try:
                await resolve(host, target.policy)
            except ProbeFailure as exc:
                failure = exc
                continue
            allowed.append(host)
        if not allowed:
            assert failure is not None
            if len(target.hosts) > 1:
                raise ProbeFailure(
                    ErrorCode.NO_REACHABLE_MEMBER,
                    cause=f"no listed host resolves or is allowed ({failure.code.value})",
                )
            raise failure
        return allowed


_HUNG_UP = ("the server closed the connection without answering the MongoDB hello: it is not "
            "MongoDB, or it requires TLS (then set ssl_link to true)")
_HUNG_UP_IN_TLS = ("the server completed the TLS handshake, then closed the connection "
                   "without answering the MongoDB hello: it is not MongoDB")
_HUNG_UP_NOT_TLS = ("the server closed the connection without answering the MongoDB hello, "
                    "and it does not speak TLS either")


async def _hung_up_on(host: HostPort, failure: ProbeFailure, trace: Trace) -> ProbeFailure:
    """What a server that hung up on a plaintext hello is: asked once in TLS.

    An OpenSSL server (mongod with requireTLS, DDS with SSL on) drops a
    plaintext client without a word, exactly as a PostgreSQL server drops a
    MongoDB hello: a TLS answer to a ClientHello tells them apart. Nothing of
    the user's is sent on that connection.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    speaks_tls: bool | None = None
    with anyio.move_on_after(max(0.0, min(1.0, trace.remaining()))):
        try:
            _, writer = await asyncio.open_connection(host.host, host.port, ssl=context)
            writer.transport.abort()
            speaks_tls = True
        except ssl.SSLError as exc:  # an alert is TLS too; a hang-up or plaintext is not
            speaks_tls = not isinstance(exc, ssl.SSLEOFError) and \
                exc.reason != "WRONG_VERSION_NUMBER"
        except Exception:  # refused now, reset, the policy: no answer either way
            speaks_tls = False
    if speaks_tls:
        return ProbeFailure(ErrorCode.SSL_REQUIRED_BY_SERVER, target=failure.target)
    if speaks_tls is False:
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=failure.target,
                            cause=_HUNG_UP_NOT_TLS)
    return failure  # no time left to ask: both stay possible


class _AnsweredBy(CommandListener):
    """The address of the member that answered the last command (for the TLS facts)."""

    def __init__(self) -> None:
        self.address: tuple[str, int | None] | None = None

    def started(self, event: CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: CommandSucceededEvent) -> None:
        self.address = event.connection_id

    def failed(self, event: CommandFailedEvent) -> None:
        pass


class _Heartbeats(ServerHeartbeatListener):
    """Heartbeats of the client's monitors: `answered` is set by the first, `error`
    is the first one's failure, and each sets the event `rearm()` last returned."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.answered = anyio.Event()
        self.beat = anyio.Event()

    def rearm(self) -> anyio.Event:
        self.beat = anyio.Event()
        return self.beat

    def started(self, event: ServerHeartbeatStartedEvent) -> None:
        pass

    def succeeded(self, event: ServerHeartbeatSucceededEvent) -> None:
        self.answered.set()
        self.beat.set()

    def failed(self, event: ServerHeartbeatFailedEvent) -> None:
        if not self.answered.is_set() and isinstance(event.reply, BaseException):
            self.error = event.reply
        self.answered.set()
        self.beat.set()


def _replica_set(client: AsyncMongoClient[dict[str, Any]]) -> dict[str, Any] | None:
    description = client.topology_description
    servers = description.server_descriptions()
    name = description.replica_set_name
    if name is None:
        return None
    members: set[str] = set()
    for sd in servers.values():
        members.update(f"{h}:{p}" for h, p in sd.all_hosts)
    return {
        "name": name,
        "members": sorted(members),
        "answered": sorted(f"{h}:{p}" for (h, p), sd in servers.items() if sd.error is None
                           and sd.server_type_name != "Unknown"),
    }


_ERRNO_TEXT = re.compile(r"\[Errno (-?\d+)\]")


def first_answer_problem(data: bytes) -> str | None:
    """Why `data` cannot start a MongoDB reply, or None (a 16-byte header:
    length, request id, response-to, opcode OP_REPLY/OP_COMPRESSED/OP_MSG)."""
    if looks_like_tls(data):
        return TLS_SPEAKER
    if len(data) < 16:
        return None  # too little to judge
    length, _, _, opcode = struct.unpack_from("<iiii", data)
    if opcode in (1, 2012, 2013) and 16 <= length <= 48_000_000:
        return None
    return describe_stranger(data) or "the server's answer is not MongoDB"


def _member_failure(
    error: BaseException | None, where: str, trace: Trace, single: bool, unknown: bool = True
) -> ProbeFailure:
    """What one member's error means.

    PyMongo keeps only its own wrapper of a monitor's error (no cause chain),
    so the evidence is, in order: our own observations (the first bytes, the
    TCP connect), the exception class, and the errno PyMongo quotes.
    """
    if single and trace.mismatch is not None:
        return trace.mismatch_failure(where)
    if error is None and unknown:  # its first check has not finished: no answer in time
        connected = single and trace.tcp_connected
        code = ErrorCode.HANDSHAKE_TIMEOUT if connected else ErrorCode.CONNECT_TIMEOUT
        return ProbeFailure(code, target=where)
    if error is None:
        return ProbeFailure(ErrorCode.SERVER_UNAVAILABLE, target=where,
                            cause="the member answers but is neither primary nor secondary")
    found = network_failure(error, where, trace)
    if found is not None and found.code is not ErrorCode.CONNECTION_RESET:
        return found
    for link in chain(error):
        if isinstance(link, OperationFailure) and link.code in _SERVER_CODES:
            return ProbeFailure(_SERVER_CODES[link.code], target=where)
        if isinstance(link, ProtocolError):
            return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where,
                                cause="the server's answer is not MongoDB")
        if isinstance(link, NetworkTimeout):
            connected = single and trace.tcp_connected
            code = ErrorCode.HANDSHAKE_TIMEOUT if connected else ErrorCode.CONNECT_TIMEOUT
            return ProbeFailure(code, target=where)
    text = str(error)
    tls = _tls_failure(text, where)
    if tls is not None:
        return tls
    quoted = _ERRNO_TEXT.search(text)
    if quoted is not None:
        number = int(quoted.group(1))
        if number < 0:  # getaddrinfo's EAI_* codes are negative
            return ProbeFailure(ErrorCode.DNS_FAILURE, target=where, cause="no such host")
        return network_failure(OSError(number, ""), where, trace) or ProbeFailure(
            ErrorCode.INTERNAL, target=where, cause=f"errno {number}"
        )
    if single and trace.closed_unanswered:
        # mongod always answers a hello; a server that hangs up on it is
        # something else (PostgreSQL does exactly this), or demands TLS: the
        # checker asks it in TLS to tell which (`_hung_up_on`).
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where, cause=_HUNG_UP)
    if found is not None or isinstance(error, AutoReconnect):
        return ProbeFailure(ErrorCode.CONNECTION_RESET, target=where,
                            cause="connection closed by the server")
    return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=type(error).__name__)


_NOT_TLS_SIGNS = ("WRONG_VERSION_NUMBER", "wrong version number", "EOF occurred in violation",
                  "UNEXPECTED_EOF")
# "SSL handshake failed: host:port:  (configured timeouts...": no reason at all,
# the server closed the connection on our ClientHello.
_HANDSHAKE_HUNG_UP = re.compile(r"SSL handshake failed: \S+:\s+\(")
_VERIFY_TEXT = re.compile(r"certificate verify failed: ([^(]+?) \(_ssl")


def _tls_failure(text: str, where: str) -> ProbeFailure | None:
    """TLS failures, read from PyMongo's message: it keeps the SSL error only as text."""
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        reason = _VERIFY_TEXT.search(text)
        return ProbeFailure(ErrorCode.SSL_VERIFY_FAILED, target=where,
                            cause=reason.group(1) if reason else "")
    if any(sign in text for sign in _NOT_TLS_SIGNS) or _HANDSHAKE_HUNG_UP.search(text):
        # The server answered our ClientHello with something that is not TLS,
        # or hung up on it: it does not do TLS on this port.
        return ProbeFailure(ErrorCode.SSL_NOT_ENABLED_ON_SERVER, target=where)
    if "[SSL" in text or "SSL handshake failed" in text:
        return ProbeFailure(ErrorCode.SSL_HANDSHAKE_FAILED, target=where)
    return None


def classify(
    exc: PyMongoError,
    target: Target,
    trace: Trace,
    client: AsyncMongoClient[dict[str, Any]] | None,
) -> ProbeFailure:
    """The one place PyMongo errors become catalog codes."""
    where = trace.address or target.label
    if isinstance(exc, OperationFailure):
        code = _SERVER_CODES.get(exc.code or 0)
        if code is not None:
            return ProbeFailure(code, target=where)
        return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=f"server error {exc.code}")
    if isinstance(exc, NotPrimaryError) and isinstance(exc.details, Mapping):
        # "not primary" / "node is recovering" / shutting down: a server answer
        # that PyMongo raises as a lost connection
        code = _SERVER_CODES.get(exc.details.get("code") or 0)
        if code is not None:
            return ProbeFailure(code, target=where)
    if isinstance(exc, ConfigurationError):
        return ProbeFailure(ErrorCode.INTERNAL, target=where,
                            cause=scrub(str(exc), target.password)[:200])
    if (isinstance(exc, ServerSelectionTimeoutError) and client is not None
            and client.topology_description.server_descriptions()):
        return _topology_failure(client, target, trace)
    return _member_failure(exc, where, trace, len(target.hosts) == 1)


def _topology_failure(
    client: AsyncMongoClient[dict[str, Any]], target: Target, trace: Trace
) -> ProbeFailure:
    """No member could take a command: what each answered, from the topology."""
    where = trace.address or target.label
    single = len(target.hosts) == 1
    failures = {
        str(member): _member_failure(sd.error, str(member), trace, single,
                                     unknown=sd.server_type_name == "Unknown")
        for member, sd in (
            (HostPort(host, port or 27017), sd)
            for (host, port), sd in client.topology_description.server_descriptions().items()
        )
    }
    if single and len(failures) == 1:
        return next(iter(failures.values()))
    listed = {str(h).lower() for h in target.hosts}  # PyMongo lowercases host names
    advertised = sorted(set(failures) - listed)
    summary = "; ".join(f"{m}: {f.code.name.lower().replace('_', ' ')} ({f.code.value})"
                        for m, f in sorted(failures.items()))
    if advertised:
        summary = (f"the listed hosts answered, then advertised members that cannot be "
                   f"reached from here: {summary}")
    else:
        summary = f"tried {summary}"
    return ProbeFailure(ErrorCode.NO_REACHABLE_MEMBER, target=where, cause=summary[:600])
