"""MySQL and taurus (GaussDB for MySQL), through aiomysql.

aiomysql needs three corrections for a prober, all made here:

- its `connect_timeout` covers only the TCP connect and its `_connect()` does
  not close the socket when cancelled: the connect runs under our deadline
  and the connection is closed on every path;
- it waits forever for a greeting: a server that never greets gets a short
  greeting window, then one PostgreSQL SSLRequest as a nudge, so that a
  PostgreSQL port (whose server waits for the client to speak first) is
  reported as a protocol mismatch rather than a timeout;
- it silently continues in plaintext when TLS is requested and the server
  does not offer it, and it encodes passwords as latin-1: both are fixed
  before authentication is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from typing import Any

import aiomysql
import anyio
from pymysql.constants import CLIENT, CR, ER

from probe.addresses import Resolved
from probe.checkers.base import Facts, SingleHostChecker, Target, Trace, network_failure
from probe.errors import ErrorCode, ProbeFailure, scrub
from probe.tls import tls_facts

_ERRNO_CODES: dict[int, ErrorCode] = {
    ER.ACCESS_DENIED_ERROR: ErrorCode.AUTH_FAILED,  # 1045 wrong user or password
    ER.DBACCESS_DENIED_ERROR: ErrorCode.ACCESS_DENIED,  # 1044 no grant on db_name
    ER.HOST_NOT_PRIVILEGED: ErrorCode.ACCESS_DENIED,  # 1130 account not allowed from here
    ER.HOST_IS_BLOCKED: ErrorCode.ACCESS_DENIED,  # 1129 too many connection errors
    1227: ErrorCode.ACCESS_DENIED,  # ER_SPECIFIC_ACCESS_DENIED_ERROR
    4151: ErrorCode.ACCESS_DENIED,  # ER_ACCOUNT_HAS_BEEN_LOCKED (MariaDB)
    3118: ErrorCode.ACCESS_DENIED,  # ER_ACCOUNT_HAS_BEEN_LOCKED (MySQL)
    ER.BAD_DB_ERROR: ErrorCode.DATABASE_NOT_FOUND,  # 1049
    ER.WRONG_DB_NAME: ErrorCode.DATABASE_NOT_FOUND,  # 1102 no database can have that name
    ER.CON_COUNT_ERROR: ErrorCode.TOO_MANY_CONNECTIONS,  # 1040
    1203: ErrorCode.TOO_MANY_CONNECTIONS,  # ER_TOO_MANY_USER_CONNECTIONS
    1226: ErrorCode.TOO_MANY_CONNECTIONS,  # ER_USER_LIMIT_REACHED
    ER.SERVER_SHUTDOWN: ErrorCode.SERVER_UNAVAILABLE,  # 1053
    1077: ErrorCode.SERVER_UNAVAILABLE,  # ER_NORMAL_SHUTDOWN
    3159: ErrorCode.SSL_REQUIRED_BY_SERVER,  # ER_SECURE_TRANSPORT_REQUIRED
    ER.NOT_SUPPORTED_AUTH_MODE: ErrorCode.AUTH_METHOD_UNSUPPORTED,  # 1251
    CR.CR_AUTH_PLUGIN_CANNOT_LOAD: ErrorCode.AUTH_METHOD_UNSUPPORTED,  # 2059
    ER.HANDSHAKE_ERROR: ErrorCode.PROTOCOL_MISMATCH,  # 1043 bad handshake
    CR.CR_SERVER_LOST: ErrorCode.CONNECTION_RESET,  # 2013
    CR.CR_SERVER_GONE_ERROR: ErrorCode.CONNECTION_RESET,  # 2006
}

# The account a probe logs in as, with no password, to end a handshake it will not
# finish with the user's credentials (see `_decline_login`).
_THROWAWAY_USER = "drs_probe_no_tls"
# What a PostgreSQL client sends first; a PostgreSQL server answers it with one byte.
_PG_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_GREETING_WINDOW = 3.0
_COM_QUIT = b"\x01\x00\x00\x00\x01"  # length 1, sequence 0, COM_QUIT (as ensure_closed sends)
_MAYBE_TLS_REQUIRED = (
    "; or, on MariaDB, the server requires SSL (it reports that the same way): "
    "then set ssl_link to true"
)


class _ProbeConnection(aiomysql.Connection):  # type: ignore[misc]
    """aiomysql's connection with the greeting and TLS checks a prober needs."""

    def __init__(self, *args: Any, trace: Trace, target: Target, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._probe_trace = trace
        self._probe_target = str(target.hosts[0])
        self._probe_wants_tls = target.tls is not None

    def _set_keep_alive(self) -> None:
        self._socket_still_open()
        super()._set_keep_alive()

    def _set_nodelay(self, value: bool) -> None:
        self._socket_still_open()
        super()._set_nodelay(value)

    def _socket_still_open(self) -> None:
        # A server that resets at once can close the transport before aiomysql
        # tunes the socket; aiomysql then raises a RuntimeError. Say what it is.
        if self._writer.transport.get_extra_info("socket") is None:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by the server")

    async def _get_server_information(self) -> None:
        await self._await_greeting()
        await super()._get_server_information()
        if self.protocol_version != 10:
            raise ProbeFailure(
                ErrorCode.PROTOCOL_MISMATCH,
                target=self._probe_trace.address or self._probe_target,
                cause="the greeting is not a MySQL greeting",
            )
        self._probe_trace.server_offers_tls = bool(self.server_capabilities & CLIENT.SSL)
        if self._probe_wants_tls and not self.server_capabilities & CLIENT.SSL:
            await self._decline_login()
            raise ProbeFailure(
                ErrorCode.SSL_NOT_ENABLED_ON_SERVER,
                target=self._probe_trace.address or self._probe_target,
            )

    async def _decline_login(self) -> None:
        """Finish the handshake as a throwaway account, without a password.

        Hanging up after the greeting is an aborted handshake, which MySQL counts
        against `max_connect_errors` and, after enough of them, blocks this host:
        a failed login is not counted. Nothing of the user's is sent in the clear.
        """
        self._user, self._password, self._db = _THROWAWAY_USER, "", None
        self._ssl_context = None
        self.client_flag &= ~(CLIENT.SSL | CLIENT.CONNECT_WITH_DB)  # as the packet will be
        # The expected "access denied", or a server that is gone: either way, done.
        with (
            anyio.move_on_after(max(0.0, min(1.0, self._probe_trace.remaining() - 0.1))),
            contextlib.suppress(Exception),
        ):
            await super()._request_authentication()

    async def _await_greeting(self) -> None:
        reader: asyncio.StreamReader = self._reader
        if reader._buffer:  # type: ignore[attr-defined]  # the greeting is here: no timer
            return
        where = self._probe_trace.address or self._probe_target
        window = max(0.1, min(_GREETING_WINDOW, self._probe_trace.remaining() - 1.0))
        with anyio.move_on_after(window):
            first = await reader.readexactly(1)
            # Hand the byte back: aiomysql reads the greeting from the start.
            reader._buffer[0:0] = first  # type: ignore[attr-defined]
            return
        # Silent so far. A PostgreSQL server waits for the client to speak:
        # say what a PostgreSQL client says first and see whether it answers.
        self._writer.write(_PG_SSL_REQUEST)
        answer = b""
        # Up to the deadline itself: a timeout is never reported before it.
        with anyio.move_on_after(max(0.1, self._probe_trace.remaining())):
            answer = await reader.read(64)
        if (answer[:1] in (b"N", b"S") and len(answer) == 1) or answer[:1] == b"E":
            raise ProbeFailure(
                ErrorCode.PROTOCOL_MISMATCH, target=where,
                cause="a PostgreSQL server answers on this port",
            )
        if answer:
            raise ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where,
                               cause=f"the server sent nothing for {window:.1f} s, then "
                                     "something that is not a MySQL greeting")
        raise ProbeFailure(ErrorCode.HANDSHAKE_TIMEOUT, target=where,
                           cause="the server accepted TCP but sent no greeting")


class MySQLChecker(SingleHostChecker):
    name = "mysql"
    default_port = 3306

    async def check_address(self, target: Target, address: Resolved, trace: Trace) -> Facts:
        conn = _ProbeConnection(
            host=address.ip,
            port=address.port,
            user=target.user,
            # aiomysql sends password.encode("latin1"); MySQL hashed the UTF-8
            # bytes. Handing it the UTF-8 bytes as latin-1 text sends those.
            password=target.password.encode("utf-8").decode("latin-1"),
            db=target.database,
            charset="utf8mb4",
            ssl=target.tls.context if target.tls else None,
            connect_timeout=None,  # the TCP connect is bounded by the loop hook
            autocommit=True,
            trace=trace,
            target=target,
        )
        try:
            with trace.phase("login"):
                await conn._connect()
            with trace.phase("query"):
                async with conn.cursor() as cursor:
                    await cursor.execute("SELECT 1")
                    await cursor.fetchone()
            transport = conn._writer.transport if conn._writer else None
            return Facts(
                server_version=_version(conn.get_server_info()),
                address=str(address),
                tls=tls_facts(transport.get_extra_info("ssl_object") if transport else None),
            )
        except ProbeFailure:
            raise
        except Exception as exc:
            # Not "from exc": a driver's message may quote the password (scrubbed in
            # the cause), and a logged traceback would print it.
            raise classify(exc, target, address, trace) from None
        finally:
            with anyio.CancelScope(shield=True):
                await _close(conn)


async def _close(conn: _ProbeConnection) -> None:
    if conn._writer is None:
        return
    transport = conn._writer.transport
    try:
        conn._writer.write(_COM_QUIT)  # a clean goodbye, not an aborted client
        if transport.get_write_buffer_size():  # not handed to the kernel yet (TLS, full buffer)
            with anyio.move_on_after(1):
                await conn._writer.drain()
    except Exception:
        pass
    finally:
        # After COM_QUIT there is nothing left to say: release the socket now
        # rather than wait for a TLS close_notify exchange.
        transport.abort()
        conn.close()


def _version(info: str | None) -> str | None:
    # MariaDB prefixes "5.5.5-" for the sake of old clients.
    return info.removeprefix("5.5.5-") if info else None


def classify(exc: BaseException, target: Target, address: Resolved, trace: Trace) -> ProbeFailure:
    """The one place MySQL errors become catalog codes."""
    where = str(address)
    number = exc.args[0] if isinstance(exc, aiomysql.Error) and exc.args else None
    if isinstance(number, int) and number != CR.CR_CONN_HOST_ERROR:
        code = _ERRNO_CODES.get(number)
        message = scrub(str(exc.args[1]) if len(exc.args) > 1 else "", target.password)
        if code is ErrorCode.DATABASE_NOT_FOUND:
            return ProbeFailure(code, target=where, cause=target.database_shown)
        if number == ER.DBACCESS_DENIED_ERROR:
            # Also the answer for a database that does not exist, to an account
            # without rights on it: the server does not tell which.
            return ProbeFailure(ErrorCode.ACCESS_DENIED, target=where,
                                cause=f"no privilege on {target.database_shown}, or no "
                                      "such database (the server does not say which)")
        if code is ErrorCode.AUTH_FAILED and target.tls is None and trace.server_offers_tls:
            # MariaDB answers a plaintext login under require_secure_transport
            # with this same 1045 (MDEV-30178): nothing on the wire tells them apart.
            return ProbeFailure(code, target=where, cause=_MAYBE_TLS_REQUIRED)
        if code in (ErrorCode.AUTH_FAILED, ErrorCode.TOO_MANY_CONNECTIONS,
                    ErrorCode.SSL_REQUIRED_BY_SERVER):
            return ProbeFailure(code, target=where)
        if code is not None:
            return ProbeFailure(code, target=where, cause=message[:200])
        if number < 2000:  # a server error we have no class for
            return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=f"MySQL error {number}")
    found = network_failure(exc, where, trace)
    if found is not None:
        return found
    if isinstance(exc, aiomysql.InternalError) and "sequence number" in str(exc):
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where,
                            cause="the server's answer is not MySQL")
    if isinstance(exc, (struct.error, UnicodeDecodeError, IndexError, ValueError)):
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where,
                            cause="the server's greeting could not be read as MySQL")
    return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=type(exc).__name__)
