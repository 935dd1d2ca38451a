"""PostgreSQL, through asyncpg.

TLS is explicit: ``ssl=False`` when ssl_link is false (never asyncpg's default
``prefer``), a verifying context when true. Failures are classified from the
SQLSTATE the server sent, then from the OS/TLS evidence on the exception chain.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
import asyncpg
import asyncpg.exceptions as pgerr

from probe.addresses import Resolved
from probe.checkers.base import (
    Facts,
    SingleHostChecker,
    Target,
    Trace,
    describe_stranger,
    network_failure,
)
from probe.errors import ErrorCode, ProbeFailure, scrub
from probe.tls import tls_facts

_SQLSTATE_CODES: dict[str, ErrorCode] = {
    "28P01": ErrorCode.AUTH_FAILED,  # invalid_password (also sent for unknown roles)
    "28000": ErrorCode.ACCESS_DENIED,  # pg_hba rejects, or role may not log in
    "3D000": ErrorCode.DATABASE_NOT_FOUND,
    "42501": ErrorCode.ACCESS_DENIED,  # no CONNECT privilege on the database
    "53300": ErrorCode.TOO_MANY_CONNECTIONS,
    "53000": ErrorCode.TOO_MANY_CONNECTIONS,  # insufficient_resources (reserved slots)
    "57P01": ErrorCode.SERVER_UNAVAILABLE,  # admin_shutdown
    "57P02": ErrorCode.SERVER_UNAVAILABLE,  # crash_shutdown
    "57P03": ErrorCode.SERVER_UNAVAILABLE,  # cannot_connect_now: starting, stopping, recovery
    "0A000": ErrorCode.PROTOCOL_MISMATCH,  # unsupported frontend protocol
    "08P01": ErrorCode.PROTOCOL_MISMATCH,  # protocol_violation
}


class PostgreSQLChecker(SingleHostChecker):
    name = "postgresql"
    default_port = 5432
    default_database = "postgres"

    async def check_address(self, target: Target, address: Resolved, trace: Trace) -> Facts:
        conn: asyncpg.Connection | None = None
        trace.first_answer_check = first_answer_problem
        try:
            with trace.phase("login"):
                conn = await asyncpg.connect(
                    host=address.ip,
                    port=address.port,
                    user=target.user,
                    password=target.password,
                    database=target.database,
                    ssl=target.tls.context if target.tls else False,
                    # Our deadline scope is what stops a probe; this only keeps
                    # asyncpg's own default (60 s) out of the way.
                    timeout=max(trace.remaining(), 0.001) + 5,
                    statement_cache_size=0,
                    server_settings={"application_name": "probe"},
                )
            with trace.phase("query"):
                await conn.fetchval("SELECT 1")
            return Facts(
                server_version=conn.get_settings().server_version,
                address=str(address),
                tls=tls_facts(conn._transport.get_extra_info("ssl_object")),
            )
        except ProbeFailure:
            raise
        except Exception as exc:
            # Not "from exc": a driver's message may quote the password (scrubbed in
            # the cause), and a logged traceback would print it.
            raise classify(exc, target, address, trace) from None
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        with anyio.fail_after(1):
            await conn.close()
    except Exception:
        conn.terminate()


_NO_SUCH_ROLE = re.compile(r'role ".*" does not exist')


def first_answer_problem(data: bytes) -> str | None:
    """Why `data` cannot be a PostgreSQL server's first answer, or None.

    A PostgreSQL server speaks only when spoken to, and its first answer is
    an authentication request (R), an error (E), a protocol negotiation (v),
    or, to an SSLRequest, one byte S or N.
    """
    if data in (b"N", b"S"):
        return None
    if data[:1] in (b"R", b"E", b"v") and (
        len(data) < 5 or 8 <= int.from_bytes(data[1:5], "big") <= 1_000_000
    ):
        return None
    return describe_stranger(data) or "the server's answer is not PostgreSQL"


def classify(exc: BaseException, target: Target, address: Resolved, trace: Trace) -> ProbeFailure:
    """The one place PostgreSQL errors become catalog codes."""
    where = str(address)
    state: str = getattr(exc, "sqlstate", "") or ""
    if isinstance(exc, pgerr.PostgresError) and state in _SQLSTATE_CODES:
        code = _SQLSTATE_CODES[state]
        message = scrub(str(exc), target.password)
        if state == "28000" and "no encryption" in message and target.tls is None:
            return ProbeFailure(ErrorCode.SSL_REQUIRED_BY_SERVER, target=where)
        if state == "28000" and _NO_SUCH_ROLE.search(message):
            # 28000 is also a pg_hba rejection; only without a password (trust,
            # peer, cert) does the server name an unknown role, and only its
            # text tells (a server with translated messages stays ACCESS_DENIED)
            return ProbeFailure(ErrorCode.AUTH_FAILED, target=where, cause=_short(message))
        if code is ErrorCode.DATABASE_NOT_FOUND:
            return ProbeFailure(code, target=where, cause=target.database_shown)
        return ProbeFailure(code, target=where, cause=_short(message))
    if target.tls is not None and trace.first_answer == b"N":
        # The server answered our SSLRequest with N: it does not do TLS.
        return ProbeFailure(ErrorCode.SSL_NOT_ENABLED_ON_SERVER, target=where)
    found = network_failure(exc, where, trace)
    if found is not None:
        return found
    if isinstance(exc, pgerr.PostgresError):
        return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=f"SQLSTATE {state}")
    if isinstance(exc, pgerr.InterfaceError) and "authentication method" in str(exc):
        return ProbeFailure(ErrorCode.AUTH_METHOD_UNSUPPORTED, target=where,
                            cause=_short(scrub(str(exc), target.password)))
    if isinstance(exc, (pgerr._base.ProtocolError, pgerr.ProtocolViolationError)):
        return ProbeFailure(ErrorCode.PROTOCOL_MISMATCH, target=where,
                            cause="the server's answer is not PostgreSQL")
    return ProbeFailure(ErrorCode.INTERNAL, target=where, cause=type(exc).__name__)


def _short(message: Any) -> str:
    text = str(message).splitlines()[0] if message else ""
    return text[:200]
