"""A MongoDB wire-protocol server for tests, demos and benchmarks.

No real ``mongod`` can be installed on the project's machines, so this module
speaks enough of the MongoDB wire protocol for the unmodified PyMongo driver
(``pymongo.MongoClient`` and ``pymongo.AsyncMongoClient``) to discover,
authenticate and run ``ping``/``buildInfo``:

* framing: ``OP_MSG`` (section kinds 0 and 1, ``checksumPresent`` verified with
  CRC-32C, ``moreToCome`` requests get no reply) and the legacy ``OP_QUERY``
  handshake (``hello``/``isMaster``/``ismaster`` on ``<db>.$cmd``) answered with
  ``OP_REPLY``. Garbage (a length outside 17..maxMessageSizeBytes, a bad section,
  bad BSON, an unknown opcode) closes the connection, as mongod does.
  ``OP_COMPRESSED`` is not supported and compression is never advertised.
* ``hello``/``isMaster``/``ismaster`` with the fields drivers read, including
  ``saslSupportedMechs`` and speculative authentication; replica-set fields in
  replica-set mode. ``topologyVersion`` is sent only with
  ``topology_version=True`` (drivers then use the streaming monitoring
  protocol: awaitable hellos, answered after ``maxAwaitTimeMS`` without
  ``moreToCome``, are counted in :attr:`awaitable_hellos`).
* real server-side SCRAM-SHA-1 and SCRAM-SHA-256 (``saslStart``/``saslContinue``,
  speculative ``saslStart`` inside ``hello``, ``skipEmptyExchange`` or the third
  empty round trip). Every authentication failure answers like mongod:
  ``{ok: 0, errmsg: "Authentication failed.", code: 18, codeName: "AuthenticationFailed"}``.
* ``ping``, ``buildInfo``, ``endSessions``, ``logout``, ``connectionStatus``
  without authentication; ``listDatabases`` and ``serverStatus`` need an
  authenticated connection when the server has users (else code 13
  ``Unauthorized``); any other command is code 59 ``CommandNotFound``.
* TLS with any server ``ssl.SSLContext`` (tests use ``trustme``).
* fault modes: ``silent`` (accepts TCP, never answers, not even the TLS
  handshake), ``close_after_hello`` (answers the first hello of each
  connection, then closes it), ``slow_hello`` (every hello reply is delayed by
  ``slow_hello_seconds``), ``shutting_down`` (hello and authentication answer,
  every other command fails with code 91 ``ShutdownInProgress``).
* :class:`MongoReplicaSet` starts several members on several loopback ports,
  all reporting one ``setName``. With ``unresolvable_names=True`` the members
  advertise host names that cannot resolve (see :data:`UNRESOLVABLE_HOST_TEMPLATE`).

Servers only ever bind loopback addresses (127.0.0.0/8 or ::1) and never
connect anywhere. Use them as async context managers, with ``start()``/``stop()``,
or from synchronous code with ``run_in_thread()``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import gc
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, cast

import bson
from bson.binary import Binary
from bson.objectid import ObjectId
from pymongo.saslprep import saslprep

__all__ = [
    "DEFAULT_VERSION",
    "MAX_BSON_OBJECT_SIZE",
    "MAX_MESSAGE_SIZE_BYTES",
    "MAX_WRITE_BATCH_SIZE",
    "SCRAM_MECHANISMS",
    "UNRESOLVABLE_HOST_TEMPLATE",
    "Fault",
    "MongoReplicaSet",
    "MongoUser",
    "MongoWireServer",
    "close_leaked_client_sockets",
    "crc32c",
    "wire_version_for",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants

OP_REPLY: Final = 1
OP_QUERY: Final = 2004
OP_COMPRESSED: Final = 2012
OP_MSG: Final = 2013

MAX_BSON_OBJECT_SIZE: Final = 16 * 1024 * 1024
MAX_MESSAGE_SIZE_BYTES: Final = 48_000_000
MAX_WRITE_BATCH_SIZE: Final = 100_000
DEFAULT_VERSION: Final = "7.0.12"
SCRAM_MECHANISMS: Final = ("SCRAM-SHA-1", "SCRAM-SHA-256")

#: Host names advertised by ``MongoReplicaSet(unresolvable_names=True)``.
#: The machine has a DNS resolver configured in /etc/resolv.conf, and glibc
#: sends a query for ``mongo-0.invalid`` to it (RFC 2606 reserves the TLD, but
#: nothing short-circuits it locally). A name whose first character is ``-``
#: is rejected by glibc's resolver before any packet is sent (checked with
#: strace: no socket to port 53 is opened) and fails with EAI_NONAME
#: ("Name or service not known"), the same ``socket.gaierror`` as an NXDOMAIN
#: answer. So the names stay in the ``.invalid`` TLD *and* fail locally. Pass
#: ``unresolvable_template="mongo-{index}.invalid"`` for names that do reach DNS.
UNRESOLVABLE_HOST_TEMPLATE: Final = "-mongo-{index}.invalid"

_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_OP_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned

_FLAG_CHECKSUM_PRESENT: Final = 1
_FLAG_MORE_TO_COME: Final = 1 << 1
_FLAG_REQUIRED_MASK: Final = 0xFFFF  # bits 0-15 must be understood (OP_MSG spec)
_KNOWN_FLAGS: Final = _FLAG_CHECKSUM_PRESENT | _FLAG_MORE_TO_COME
_REPLY_AWAIT_CAPABLE: Final = 8
_REPLY_QUERY_FAILURE: Final = 2

_HELLO_COMMANDS: Final = frozenset({"hello", "isMaster", "ismaster"})
#: Commands mongod runs without an authenticated user.
_NO_AUTH_COMMANDS: Final = frozenset(
    {
        "hello",
        "isMaster",
        "ismaster",
        "saslStart",
        "saslContinue",
        "ping",
        "buildInfo",
        "buildinfo",
        "endSessions",
        "logout",
        "connectionStatus",
    }
)

Fault = Literal["silent", "close_after_hello", "slow_hello", "shutting_down"]
_FAULTS: Final = frozenset({"silent", "close_after_hello", "slow_hello", "shutting_down"})
# What a mongod that is shutting down answers any command but hello and authentication.
_SHUTTING_DOWN_EXEMPT: Final = frozenset({"saslStart", "saslContinue"})

#: maxWireVersion reported by each mongod release line.
_WIRE_VERSIONS: Final[Mapping[tuple[int, int], int]] = {
    (3, 6): 6,
    (4, 0): 7,
    (4, 2): 8,
    (4, 4): 9,
    (5, 0): 13,
    (5, 1): 14,
    (5, 2): 15,
    (5, 3): 16,
    (6, 0): 17,
    (6, 1): 18,
    (6, 2): 19,
    (6, 3): 20,
    (7, 0): 21,
    (7, 1): 22,
    (7, 2): 23,
    (7, 3): 24,
    (8, 0): 25,
}
_SCRAM_DEFAULT_ITERATIONS: Final[Mapping[str, int]] = {
    "SCRAM-SHA-1": 10_000,  # mongod's scramIterationCount
    "SCRAM-SHA-256": 15_000,  # mongod's scramSHA256IterationCount
}
_SCRAM_HASH: Final[Mapping[str, str]] = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
_SCRAM_SALT_BYTES: Final[Mapping[str, int]] = {"SCRAM-SHA-1": 16, "SCRAM-SHA-256": 28}


def _version_array(version: str) -> list[int]:
    numbers = [int(n) for n in re.findall(r"\d+", version.split("-", 1)[0])[:4]]
    return [*numbers, 0, 0, 0, 0][:4]


def wire_version_for(version: str) -> int:
    """The maxWireVersion a mongod of ``version`` ("7.0.12") reports."""
    major, minor = _version_array(version)[:2]
    if (major, minor) in _WIRE_VERSIONS:
        return _WIRE_VERSIONS[(major, minor)]
    known = sorted(_WIRE_VERSIONS)
    if (major, minor) > known[-1]:
        return _WIRE_VERSIONS[known[-1]]
    older = [k for k in known if k <= (major, minor)]
    return _WIRE_VERSIONS[older[-1]] if older else 0


# --------------------------------------------------------------------------- users / SCRAM


@dataclass(frozen=True)
class MongoUser:
    """A user of the test server: ``name``/``password`` defined in database ``db``."""

    name: str
    password: str
    db: str = "admin"
    mechanisms: tuple[str, ...] = SCRAM_MECHANISMS

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("MongoUser.name must not be empty")
        if not self.db or "." in self.db:
            raise ValueError(f"invalid database name for MongoUser: {self.db!r}")
        unknown = set(self.mechanisms) - set(SCRAM_MECHANISMS)
        if unknown or not self.mechanisms:
            raise ValueError(
                f"MongoUser.mechanisms must be a non-empty subset of {SCRAM_MECHANISMS}"
            )


@dataclass(frozen=True)
class _ScramCredential:
    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@functools.lru_cache(maxsize=4096)
def _scram_credential(
    mechanism: str, user: str, password: str, iterations: int
) -> _ScramCredential:
    """What mongod stores for a user (cached: replica-set members share salts, as in mongod)."""
    hash_name = _SCRAM_HASH[mechanism]
    if mechanism == "SCRAM-SHA-1":
        # MongoDB's SCRAM-SHA-1 "password" is the hex MD5 of "user:mongo:password".
        secret = hashlib.md5(f"{user}:mongo:{password}".encode()).hexdigest().encode()
    else:
        try:
            secret = str(saslprep(password)).encode("utf-8")
        except ValueError as exc:
            raise ValueError(
                f"password of user {user!r} is not valid for SCRAM-SHA-256: {exc}"
            ) from None
    salt = os.urandom(_SCRAM_SALT_BYTES[mechanism])
    salted = hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    return _ScramCredential(mechanism, salt, iterations, stored_key, server_key)


class _AuthFailed(Exception):
    """Any SCRAM failure: answered as mongod does, with code 18 and no detail."""


@dataclass
class _ScramConversation:
    conversation_id: int
    user: MongoUser
    credential: _ScramCredential
    gs2_header: bytes
    client_first_bare: bytes
    server_first: bytes
    nonce: bytes
    skip_empty_exchange: bool
    step: int = 1


def _decode_sasl_name(raw: bytes) -> str:
    if re.search(rb"=(?!2C|3D)", raw):
        raise _AuthFailed("invalid saslname encoding")
    return raw.replace(b"=2C", b",").replace(b"=3D", b"=").decode("utf-8")


def _parse_client_first(payload: bytes) -> tuple[bytes, bytes, str, bytes]:
    """Split ``n,,n=user,r=nonce`` into (gs2 header, client-first-bare, user, nonce)."""
    parts = payload.split(b",", 2)
    if len(parts) != 3 or parts[0] not in (b"n", b"y"):
        # "p=..." asks for channel binding, which MongoDB never offers.
        raise _AuthFailed("unsupported GS2 header")
    if parts[1] and not parts[1].startswith(b"a="):
        raise _AuthFailed("bad authzid")
    gs2_header = parts[0] + b"," + parts[1] + b","
    bare = parts[2]
    attrs = bare.split(b",")
    if len(attrs) < 2 or not attrs[0].startswith(b"n=") or not attrs[1].startswith(b"r="):
        raise _AuthFailed("bad client-first-message")
    if attrs[0].startswith(b"m="):
        raise _AuthFailed("mandatory extension not supported")
    nonce = attrs[1][2:]
    if not nonce:
        raise _AuthFailed("empty nonce")
    return gs2_header, bare, _decode_sasl_name(attrs[0][2:]), nonce


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes):  # Binary is a bytes subclass
        return bytes(payload)
    if isinstance(payload, str):
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise _AuthFailed("payload is not base64") from None
    raise _AuthFailed("missing payload")


# --------------------------------------------------------------------------- framing


class _FrameError(Exception):
    """The peer sent something that is not a valid MongoDB message: close the connection."""


_CRC32C_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the OP_MSG checksum (pure Python: checksums are rare)."""
    if not _CRC32C_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _read_bson(data: bytes, pos: int, end: int) -> tuple[dict[str, Any], int]:
    if pos + 5 > end:
        raise _FrameError("truncated BSON document")
    (size,) = _INT32.unpack_from(data, pos)
    if size < 5 or pos + size > end or size > MAX_BSON_OBJECT_SIZE + 16 * 1024:
        raise _FrameError("bad BSON document length")
    try:
        doc: dict[str, Any] = bson.decode(data[pos : pos + size])
    except Exception as exc:  # InvalidBSON, UnicodeDecodeError, ...
        raise _FrameError(f"invalid BSON: {exc}") from None
    return doc, pos + size


def _parse_op_msg(header: bytes, data: bytes) -> tuple[int, dict[str, Any]]:
    """(flagBits, command document with kind-1 sequences merged in)."""
    if len(data) < 5:
        raise _FrameError("OP_MSG too short")
    (flags,) = _UINT32.unpack_from(data, 0)
    if flags & _FLAG_REQUIRED_MASK & ~_KNOWN_FLAGS:
        raise _FrameError(f"unknown required OP_MSG flag bits 0x{flags:x}")
    end = len(data)
    if flags & _FLAG_CHECKSUM_PRESENT:
        end -= 4
        if end < 5:
            raise _FrameError("OP_MSG too short for a checksum")
        (expected,) = _UINT32.unpack_from(data, end)
        if crc32c(header + data[:end]) != expected:
            raise _FrameError("OP_MSG checksum mismatch")
    pos = 4
    body: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    while pos < end:
        kind = data[pos]
        pos += 1
        if kind == 0:
            if body is not None:
                raise _FrameError("more than one kind-0 section")
            body, pos = _read_bson(data, pos, end)
        elif kind == 1:
            if pos + 4 > end:
                raise _FrameError("truncated document sequence")
            (size,) = _INT32.unpack_from(data, pos)
            section_end = pos + size
            if size < 5 or section_end > end:
                raise _FrameError("bad document sequence length")
            nul = data.find(b"\x00", pos + 4, section_end)
            if nul < 0:
                raise _FrameError("unterminated document sequence identifier")
            try:
                identifier = data[pos + 4 : nul].decode("utf-8")
            except UnicodeDecodeError:
                raise _FrameError("bad document sequence identifier") from None
            if identifier in sequences:
                raise _FrameError(f"duplicate document sequence {identifier!r}")
            docs: list[dict[str, Any]] = []
            p = nul + 1
            while p < section_end:
                doc, p = _read_bson(data, p, section_end)
                docs.append(doc)
            sequences[identifier] = docs
            pos = section_end
        else:
            raise _FrameError(f"unknown OP_MSG section kind {kind}")
    if body is None:
        raise _FrameError("OP_MSG without a body section")
    for identifier, docs in sequences.items():
        if identifier in body:
            raise _FrameError(f"document sequence {identifier!r} duplicates a body field")
        body[identifier] = docs
    return flags, body


def _parse_op_query(data: bytes) -> tuple[str, dict[str, Any]]:
    """(fullCollectionName, query document) of a legacy OP_QUERY."""
    nul = data.find(b"\x00", 4)
    if len(data) < 4 or nul < 0:
        raise _FrameError("bad OP_QUERY collection name")
    try:
        collection = data[4:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise _FrameError("bad OP_QUERY collection name") from None
    pos = nul + 1 + 8  # numberToSkip, numberToReturn
    query, _ = _read_bson(data, pos, len(data))
    return collection, query


def _op_msg(request_id: int, response_to: int, doc: Mapping[str, Any]) -> bytes:
    payload = b"\x00\x00\x00\x00\x00" + bson.encode(doc)  # flagBits 0, section kind 0
    return _HEADER.pack(16 + len(payload), request_id, response_to, OP_MSG) + payload


def _op_reply(request_id: int, response_to: int, doc: Mapping[str, Any], flags: int) -> bytes:
    payload = _OP_REPLY_PREFIX.pack(flags, 0, 0, 1) + bson.encode(doc)
    return _HEADER.pack(16 + len(payload), request_id, response_to, OP_REPLY) + payload


def _error(code: int, code_name: str, errmsg: str) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}


def _auth_failed() -> dict[str, Any]:
    return _error(18, "AuthenticationFailed", "Authentication failed.")


# --------------------------------------------------------------------------- server


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"host must be a loopback IP literal, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"refusing to bind {host!r}: only 127.0.0.0/8 and ::1 are allowed")
    return str(address)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Connection:
    id: int
    peer: str
    authenticated: set[tuple[str, str]] = field(default_factory=set)
    conversation: _ScramConversation | None = None
    next_conversation_id: int = 1
    hellos: int = 0


class _ServerStreamProtocol(asyncio.StreamReaderProtocol):
    """``asyncio.start_server``'s protocol, refusing connections once the server stops.

    A connection the kernel completed just before the listener closed still arrives
    here a few loop iterations later; it is aborted on the spot.
    """

    def __init__(self, owner: MongoWireServer) -> None:
        super().__init__(asyncio.StreamReader(limit=2**16), owner._handle)
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream_transport = cast("asyncio.Transport", transport)
        if self._owner._stopping:
            stream_transport.abort()
            return
        # Registered before any task runs: stop() aborts it even if no task ever starts.
        self._owner._transports.add(stream_transport)
        super().connection_made(transport)


class _PlainStream:
    """The connection's byte stream without TLS."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        await asyncio.wait_for(self._writer.wait_closed(), 1.0)


class _TlsStream(_PlainStream):
    """Server-side TLS over the plain stream, with ``ssl.MemoryBIO``.

    asyncio's own upgrade (``StreamWriter.start_tls``) loses a ClientHello that the
    plain StreamReader already read (CPython gh-142352) and hangs on uvloop
    (uvloop#707); ``start_server(ssl=...)`` hides handshakes in progress from
    ``stop()``. Doing TLS here works on every event loop and keeps every connection,
    handshaking or not, owned by its task.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        super().__init__(reader, writer)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._plain = bytearray()

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._writer.write(pending)
            await self._writer.drain()

    async def _receive(self) -> bool:
        """Feed more ciphertext to the TLS object; False at EOF."""
        await self._flush()
        data = await self._reader.read(65536)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                if not await self._receive():
                    raise ConnectionResetError("peer closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()  # the alert, so the client learns why
                raise
            else:
                break
        await self._flush()

    async def readexactly(self, n: int) -> bytes:
        while len(self._plain) < n:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                if not await self._receive():
                    raise asyncio.IncompleteReadError(bytes(self._plain), n) from None
                continue
            except ssl.SSLZeroReturnError:  # close_notify
                raise asyncio.IncompleteReadError(bytes(self._plain), n) from None
            except ssl.SSLEOFError:  # EOF without close_notify
                raise asyncio.IncompleteReadError(bytes(self._plain), n) from None
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(self._plain), n)
            self._plain += chunk
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()  # queue close_notify; the peer's answer is not awaited
        with contextlib.suppress(OSError):
            await self._flush()
        await super().close()


class _Runnable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _Startable:
    """`async with`, and `run_in_thread()` for sync code, over `start()`/`stop()`."""

    @property
    def _thread_name(self) -> str:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[Self]:
        """Run on its own event loop in a background thread (for sync code)."""
        with _run_in_thread(self, self._thread_name):
            yield self


class MongoWireServer(_Startable):
    """One MongoDB-speaking server on a loopback port.

    ``port=0`` picks a free port; after ``start()`` :attr:`port` and :attr:`address`
    hold the real one. Counters (:attr:`connections_open`, :attr:`connections_total`,
    :attr:`commands`, :attr:`auth_successes`, :attr:`auth_failures`,
    :attr:`auth_mechanisms`, :attr:`speculative_auth_started`, :attr:`errors`)
    let tests check what happened on the wire.
    """

    def __init__(
        self,
        *,
        users: Sequence[MongoUser] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        version: str = DEFAULT_VERSION,
        max_wire_version: int | None = None,
        fault: Fault | None = None,
        slow_hello_seconds: float = 0.0,
        replica_set: str | None = None,
        advertised_hosts: Sequence[str] | None = None,
        me: str | None = None,
        primary: str | None = None,
        is_primary: bool = True,
        set_version: int = 1,
        election_id: ObjectId | None = None,
        mongos: bool = False,
        logical_session_timeout_minutes: int | None = 30,
        scram_iterations: Mapping[str, int] | None = None,
        backlog: int = 1024,
        tls_handshake_timeout: float = 10.0,
        topology_version: bool = False,
    ) -> None:
        if fault is not None and fault not in _FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {sorted(_FAULTS)}")
        if fault == "slow_hello" and slow_hello_seconds <= 0:
            raise ValueError("fault='slow_hello' needs slow_hello_seconds > 0")
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        self.host = _loopback_host(host)
        self.port = port
        self.ssl_context = ssl_context
        self.version = version
        self.max_wire_version = (
            wire_version_for(version) if max_wire_version is None else max_wire_version
        )
        self.fault: Fault | None = fault
        self.slow_hello_seconds = slow_hello_seconds
        self.replica_set = replica_set
        self.advertised_hosts: list[str] | None = (
            None if advertised_hosts is None else list(advertised_hosts)
        )
        self.me = me
        self.primary = primary
        self.is_primary = is_primary
        self.set_version = set_version
        self.election_id = election_id or ObjectId("7fffffff0000000000000001")
        self.mongos = mongos
        self.logical_session_timeout_minutes = logical_session_timeout_minutes
        self.backlog = backlog
        self.tls_handshake_timeout = tls_handshake_timeout
        self.topology_version: dict[str, Any] | None = (
            {"processId": ObjectId(), "counter": 0} if topology_version else None
        )
        iterations = dict(_SCRAM_DEFAULT_ITERATIONS)
        iterations.update(scram_iterations or {})
        if any(n < 4096 for n in iterations.values()):
            raise ValueError("SCRAM iteration counts below 4096 are rejected by drivers")
        self._users: dict[tuple[str, str], MongoUser] = {}
        self._credentials: dict[tuple[str, str, str], _ScramCredential] = {}
        for user in users:
            key = (user.db, user.name)
            if key in self._users:
                raise ValueError(f"duplicate user {user.db}.{user.name}")
            self._users[key] = user
            for mechanism in user.mechanisms:
                self._credentials[(user.db, user.name, mechanism)] = _scram_credential(
                    mechanism, user.name, user.password, iterations[mechanism]
                )

        # observable state
        self.connections_open = 0
        self.connections_total = 0
        self.awaitable_hellos = 0  # streaming-protocol hellos (with maxAwaitTimeMS)
        self.commands: Counter[str] = Counter()
        self.auth_successes = 0
        self.auth_failures = 0
        self.auth_mechanisms: Counter[str] = Counter()
        self.speculative_auth_started = 0
        self.errors: list[str] = []

        self._server: asyncio.Server | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()  # one per connection, cancelled by stop()
        self._supervisors: set[asyncio.Task[Any]] = set()  # their supervisors, never cancelled
        self._transports: set[asyncio.WriteTransport] = set()
        self._idle: asyncio.Event | None = None
        self._next_connection_id = 1
        self._next_request_id = 1
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """``"127.0.0.1:port"`` (``"[::1]:port"`` for IPv6): what clients connect to."""
        return _format_address(self.host, self.port)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._users)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("server already started")
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ServerStreamProtocol(self),
            host=self.host,
            port=self.port,
            backlog=self.backlog,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started_at = time.monotonic()
        logger.debug("mongo wire server listening on %s", self.address)

    async def stop(self) -> None:
        """Close the listener and every client connection; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        # Stop accepting first, close the listener a few loop iterations later. On the
        # selector loop an accepted connection becomes a transport one iteration after
        # accept(); if Server.close() came in between, the transport's constructor fails
        # (Server._attach asserts the server is open), the error is swallowed, and the
        # socket leaks (CPython 3.11). In those iterations accepted connections reach
        # _ServerStreamProtocol.connection_made, which aborts them (``_stopping``).
        loop = asyncio.get_running_loop()
        for listener in server.sockets:
            with contextlib.suppress(Exception):  # uvloop does not accept through readers
                loop.remove_reader(listener.fileno())
        for _ in range(5):
            await asyncio.sleep(0)
        server.close()
        for transport in list(self._transports):
            transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._supervisors:
            await asyncio.wait(list(self._supervisors))
        await server.wait_closed()
        for _ in range(2):  # aborted transports close their sockets in call_soon callbacks
            await asyncio.sleep(0)
        logger.debug("mongo wire server on %s stopped", self.address)

    @property
    def _thread_name(self) -> str:
        return f"mongo-wire-{self.host}"

    async def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait (on the server's loop) until no client connection is open."""
        if self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wait_idle_sync(self, timeout: float = 5.0) -> bool:
        """Poll from any thread until no client connection is open."""
        deadline = time.monotonic() + timeout
        while self.connections_open:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------ connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The ``client_connected_cb`` of :class:`_ServerStreamProtocol`.

        The connection runs in an inner task that :meth:`stop` may cancel; this outer
        task (owned by asyncio's StreamReaderProtocol) always ends normally, because
        CPython 3.11.7's done-callback calls ``task.exception()`` on it, which logs a
        spurious "Exception in callback" traceback for a cancelled task.
        """
        transport = writer.transport
        if self._stopping:
            transport.abort()
            return
        handler = asyncio.current_task()
        if handler is not None:
            self._supervisors.add(handler)
        self._transports.add(transport)
        self.connections_open += 1
        self.connections_total += 1
        if self._idle is not None:
            self._idle.clear()
        inner = asyncio.create_task(self._connection(reader, writer))
        self._tasks.add(inner)
        try:
            await asyncio.wait({inner})
        except asyncio.CancelledError:  # event loop shutdown: finish the inner task first
            inner.cancel()
            await asyncio.wait({inner})
        finally:
            # also when ``inner`` was cancelled before it ever ran
            self._tasks.discard(inner)
            if handler is not None:
                self._supervisors.discard(handler)
            transport.abort()
            self._transports.discard(transport)
            self.connections_open -= 1
            if self.connections_open == 0 and self._idle is not None:
                self._idle.set()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(id=self._next_connection_id, peer=str(writer.get_extra_info("peername")))
        self._next_connection_id += 1
        stream: _PlainStream | None = None
        try:
            if self.fault == "silent":
                while await reader.read(65536):
                    pass
                return
            if self.ssl_context is not None:
                tls = _TlsStream(reader, writer, self.ssl_context)
                await asyncio.wait_for(tls.handshake(), self.tls_handshake_timeout)
                plain: _PlainStream = tls
            else:
                plain = _PlainStream(reader, writer)
            if await self._serve(conn, plain):
                stream = plain  # close gracefully
        except (OSError, EOFError, TimeoutError, _FrameError) as exc:
            # ssl.SSLError and ConnectionError are OSErrors; IncompleteReadError is an EOFError.
            logger.debug("connection %d from %s closed: %r", conn.id, conn.peer, exc)
        except Exception as exc:  # a bug in this module: keep it visible to tests
            self.errors.append(f"{type(exc).__name__}: {exc}")
            logger.exception("mongo wire server: unexpected error on connection %d", conn.id)
        finally:
            try:
                if stream is not None and not self._stopping:
                    await stream.close()
            except (OSError, TimeoutError):
                pass
            finally:
                writer.transport.abort()

    async def _serve(self, conn: _Connection, stream: _PlainStream) -> bool:
        """Answer requests one after another; True when the connection should close gracefully."""
        while True:
            try:
                header = await stream.readexactly(16)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise _FrameError("truncated message header") from None
                return True  # clean EOF between messages
            if header[0] == 0x16 and header[1] == 0x03 and self.ssl_context is None:
                # mongod: "SSL handshake received but server is started without
                # SSL support" -- and it hangs up.
                raise _FrameError("TLS handshake on a server without TLS")
            length, request_id, _response_to, op_code = _HEADER.unpack(header)
            if length <= 16 or length > MAX_MESSAGE_SIZE_BYTES:
                raise _FrameError(f"bad message length {length}")
            data = await stream.readexactly(length - 16)
            if op_code == OP_MSG:
                flags, body = _parse_op_msg(header, data)
                reply_doc, close = await self._command(conn, body)
                if flags & _FLAG_MORE_TO_COME:
                    if close:
                        return True
                    continue
                reply = _op_msg(self._request_id(), request_id, reply_doc)
            elif op_code == OP_QUERY:
                collection, query = _parse_op_query(data)
                reply_doc, close, reply_flags = await self._legacy_query(conn, collection, query)
                reply = _op_reply(self._request_id(), request_id, reply_doc, reply_flags)
            else:
                raise _FrameError(f"unsupported opcode {op_code}")
            await stream.send(reply)
            if close:
                return True

    def _request_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id = rid + 1 if rid < 0x7FFFFFFF else 1
        return rid

    async def _legacy_query(
        self, conn: _Connection, collection: str, query: dict[str, Any]
    ) -> tuple[dict[str, Any], bool, int]:
        if "$query" in query and isinstance(query["$query"], dict):
            query = query["$query"]
        elif "query" in query and isinstance(query["query"], dict):
            query = query["query"]
        name = next(iter(query), "")
        if collection.endswith(".$cmd") and name in _HELLO_COMMANDS:
            self.commands[name] += 1
            body = dict(query)
            body["$db"] = collection[: -len(".$cmd")]
            doc, close = await self._hello(conn, name, body)
            return doc, close, _REPLY_AWAIT_CAPABLE
        self.commands[f"OP_QUERY:{name}"] += 1
        doc = _error(
            352,
            "UnsupportedOpQueryCommand",
            f"Unsupported OP_QUERY command: {name}. The client driver may require an upgrade. "
            "For more details see https://dochub.mongodb.org/core/legacy-opcode-removal",
        )
        flags = _REPLY_AWAIT_CAPABLE
        if not collection.endswith(".$cmd"):
            flags |= _REPLY_QUERY_FAILURE
            doc["$err"] = doc["errmsg"]
        return doc, False, flags

    # ------------------------------------------------------------------ commands

    async def _command(
        self, conn: _Connection, body: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """(reply document, close the connection after replying)."""
        name = next(iter(body), "")
        self.commands[name] += 1
        db = body.get("$db")
        if not isinstance(db, str) or not db:
            return _error(40571, "Location40571", "OP_MSG requests require a $db argument"), False
        if name in _HELLO_COMMANDS:
            return await self._hello(conn, name, body)
        if self.fault == "shutting_down" and name not in _SHUTTING_DOWN_EXEMPT:
            return _error(91, "ShutdownInProgress", "The server is in quiesce mode and will "
                          "shut down"), False
        handler = self._handlers().get(name)
        if handler is None:
            return _error(59, "CommandNotFound", f"no such command: '{name}'"), False
        if self.auth_enabled and name not in _NO_AUTH_COMMANDS and not conn.authenticated:
            return _error(13, "Unauthorized", f"command {name} requires authentication"), False
        return handler(conn, db, body), False

    def _handlers(self) -> dict[str, Callable[[_Connection, str, dict[str, Any]], dict[str, Any]]]:
        return {
            "saslStart": self._sasl_start_command,
            "saslContinue": self._sasl_continue,
            "ping": lambda conn, db, body: {"ok": 1.0},
            "buildInfo": self._build_info,
            "buildinfo": self._build_info,
            "endSessions": lambda conn, db, body: {"ok": 1.0},
            "logout": self._logout,
            "connectionStatus": self._connection_status,
            "listDatabases": self._list_databases,
            "serverStatus": self._server_status,
        }

    async def _hello(
        self, conn: _Connection, name: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        conn.hellos += 1
        if self.fault == "slow_hello":
            await asyncio.sleep(self.slow_hello_seconds)
        wait_ms = body.get("maxAwaitTimeMS")
        if isinstance(wait_ms, int) and "topologyVersion" in body:
            # mongod answers an awaitable hello when the topology changes or after
            # maxAwaitTimeMS; this topology never changes
            self.awaitable_hellos += 1
            await asyncio.sleep(wait_ms / 1000)
        writable = self.is_primary or self.replica_set is None
        doc: dict[str, Any] = {}
        if body.get("helloOk"):
            doc["helloOk"] = True
        doc["isWritablePrimary" if name == "hello" else "ismaster"] = writable
        if self.replica_set is not None:
            hosts = self.advertised_hosts if self.advertised_hosts is not None else [self.address]
            me = self.me or self.address
            primary = self.primary or (me if self.is_primary else None)
            doc.update(
                {
                    "setName": self.replica_set,
                    "setVersion": self.set_version,
                    "hosts": list(hosts),
                    "secondary": not self.is_primary,
                    "me": me,
                }
            )
            if primary is not None:
                doc["primary"] = primary
            if self.is_primary:
                doc["electionId"] = self.election_id
        if self.mongos:
            doc["msg"] = "isdbgrid"
        doc.update(
            {
                "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
                "maxMessageSizeBytes": MAX_MESSAGE_SIZE_BYTES,
                "maxWriteBatchSize": MAX_WRITE_BATCH_SIZE,
                "localTime": datetime.datetime.now(datetime.UTC),
                "connectionId": conn.id,
                "minWireVersion": 0,
                "maxWireVersion": self.max_wire_version,
                "readOnly": False,
            }
        )
        if self.topology_version is not None:
            doc["topologyVersion"] = self.topology_version
        if self.logical_session_timeout_minutes is not None:
            doc["logicalSessionTimeoutMinutes"] = self.logical_session_timeout_minutes
        mechs_for = body.get("saslSupportedMechs")
        if isinstance(mechs_for, str) and "." in mechs_for:
            user_db, user_name = mechs_for.split(".", 1)
            user = self._users.get((user_db, user_name))
            if user is not None:
                doc["saslSupportedMechs"] = list(user.mechanisms)
        speculative = body.get("speculativeAuthenticate")
        if isinstance(speculative, dict) and "saslStart" in speculative:
            spec_db = speculative.get("db")
            if isinstance(spec_db, str) and spec_db:
                try:
                    first = self._sasl_start(conn, spec_db, speculative)
                except _AuthFailed as exc:
                    # mongod drops a failed speculative attempt silently; the driver then
                    # runs saslStart itself and gets the real error.
                    logger.debug("speculative authentication refused: %s", exc)
                else:
                    self.speculative_auth_started += 1
                    doc["speculativeAuthenticate"] = first
        doc["ok"] = 1.0
        close = self.fault == "close_after_hello" and conn.hellos == 1
        return doc, close

    def _build_info(self, conn: _Connection, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": self.version,
            "gitVersion": "0000000000000000000000000000000000000000",
            "modules": [],
            "allocator": "system",
            "javascriptEngine": "none",
            "sysInfo": "deprecated",
            "versionArray": _version_array(self.version),
            "bits": 64,
            "debug": False,
            "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
            "storageEngines": ["wiredTiger"],
            "ok": 1.0,
        }

    def _logout(self, conn: _Connection, db: str, body: dict[str, Any]) -> dict[str, Any]:
        conn.authenticated = {key for key in conn.authenticated if key[0] != db}
        return {"ok": 1.0}

    def _connection_status(
        self, conn: _Connection, db: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        users = [{"user": name, "db": user_db} for user_db, name in sorted(conn.authenticated)]
        return {
            "authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": []},
            "ok": 1.0,
        }

    def _list_databases(self, conn: _Connection, db: str, body: dict[str, Any]) -> dict[str, Any]:
        if db != "admin":
            return _error(
                13, "Unauthorized", "listDatabases may only be run against the admin database."
            )
        names = sorted({"admin", "config", "local"} | {user_db for user_db, _ in self._users})
        if body.get("nameOnly"):
            databases: list[dict[str, Any]] = [{"name": n} for n in names]
        else:
            databases = [{"name": n, "sizeOnDisk": 8192, "empty": False} for n in names]
        return {"databases": databases, "totalSize": 8192 * len(names), "ok": 1.0}

    def _server_status(self, conn: _Connection, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "host": self.address,
            "version": self.version,
            "process": "mongos" if self.mongos else "mongod",
            "uptime": float(int(time.monotonic() - self._started_at)),
            "localTime": datetime.datetime.now(datetime.UTC),
            "connections": {
                "current": self.connections_open,
                "totalCreated": self.connections_total,
            },
            "ok": 1.0,
        }

    # ------------------------------------------------------------------ SCRAM

    def _sasl_start_command(
        self, conn: _Connection, db: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        mechanism = body.get("mechanism")
        if mechanism not in _SCRAM_HASH:
            self.auth_failures += 1
            return _error(
                334,
                "MechanismUnavailable",
                f"Received authentication for mechanism {mechanism} "
                "which is unknown or not enabled",
            )
        try:
            reply = self._sasl_start(conn, db, body)
        except _AuthFailed as exc:
            logger.debug("saslStart on connection %d failed: %s", conn.id, exc)
            self.auth_failures += 1
            return _auth_failed()
        reply["ok"] = 1.0
        return reply

    def _sasl_start(self, conn: _Connection, db: str, body: Mapping[str, Any]) -> dict[str, Any]:
        conn.conversation = None
        mechanism = body.get("mechanism")
        if not isinstance(mechanism, str) or mechanism not in _SCRAM_HASH:
            raise _AuthFailed(f"mechanism {mechanism!r} not supported")
        gs2_header, bare, user_name, client_nonce = _parse_client_first(
            _payload_bytes(body.get("payload"))
        )
        user = self._users.get((db, user_name))
        if user is None:
            raise _AuthFailed(f"no user {user_name!r} in {db!r}")
        credential = self._credentials.get((db, user_name, mechanism))
        if credential is None:
            raise _AuthFailed(f"user {db}.{user_name} has no {mechanism} credentials")
        nonce = client_nonce + base64.b64encode(os.urandom(24))
        server_first = b"r=%s,s=%s,i=%d" % (
            nonce,
            base64.b64encode(credential.salt),
            credential.iterations,
        )
        options = body.get("options")
        skip_empty = isinstance(options, dict) and bool(options.get("skipEmptyExchange"))
        conversation = _ScramConversation(
            conversation_id=conn.next_conversation_id,
            user=user,
            credential=credential,
            gs2_header=gs2_header,
            client_first_bare=bare,
            server_first=server_first,
            nonce=nonce,
            skip_empty_exchange=skip_empty,
        )
        conn.next_conversation_id += 1
        conn.conversation = conversation
        return {
            "conversationId": conversation.conversation_id,
            "done": False,
            "payload": Binary(server_first),
        }

    def _sasl_continue(self, conn: _Connection, db: str, body: dict[str, Any]) -> dict[str, Any]:
        conversation = conn.conversation
        if conversation is None or body.get("conversationId") != conversation.conversation_id:
            return _error(17, "ProtocolError", "No SASL session state found")
        try:
            payload = _payload_bytes(body.get("payload"))
            if conversation.step == 1:
                server_final = self._verify_client_final(conversation, payload)
                if conversation.skip_empty_exchange:
                    self._authenticated(conn, conversation)
                    done = True
                else:
                    conversation.step = 2
                    done = False
                return {
                    "conversationId": conversation.conversation_id,
                    "done": done,
                    "payload": Binary(server_final),
                    "ok": 1.0,
                }
            if payload:
                raise _AuthFailed("non-empty final SCRAM message")
            self._authenticated(conn, conversation)
            return {
                "conversationId": conversation.conversation_id,
                "done": True,
                "payload": Binary(b""),
                "ok": 1.0,
            }
        except _AuthFailed as exc:
            logger.debug("saslContinue on connection %d failed: %s", conn.id, exc)
            conn.conversation = None
            self.auth_failures += 1
            return _auth_failed()

    def _verify_client_final(self, conversation: _ScramConversation, payload: bytes) -> bytes:
        without_proof, sep, proof_b64 = payload.rpartition(b",p=")
        if not sep:
            raise _AuthFailed("client-final-message without proof")
        attrs = without_proof.split(b",")
        if len(attrs) < 2 or not attrs[0].startswith(b"c=") or not attrs[1].startswith(b"r="):
            raise _AuthFailed("bad client-final-message")
        if attrs[0][2:] != base64.b64encode(conversation.gs2_header):
            raise _AuthFailed("channel binding mismatch")
        if attrs[1][2:] != conversation.nonce:
            raise _AuthFailed("nonce mismatch")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise _AuthFailed("proof is not base64") from None
        credential = conversation.credential
        hash_name = _SCRAM_HASH[credential.mechanism]
        auth_message = b",".join(
            (conversation.client_first_bare, conversation.server_first, without_proof)
        )
        client_signature = hmac.digest(credential.stored_key, auth_message, hash_name)
        if len(proof) != len(client_signature):
            raise _AuthFailed("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(
            hashlib.new(hash_name, client_key).digest(), credential.stored_key
        ):
            raise _AuthFailed("wrong password")
        server_signature = hmac.digest(credential.server_key, auth_message, hash_name)
        return b"v=" + base64.b64encode(server_signature)

    def _authenticated(self, conn: _Connection, conversation: _ScramConversation) -> None:
        user = conversation.user
        conn.authenticated.add((user.db, user.name))
        conn.conversation = None
        self.auth_successes += 1
        self.auth_mechanisms[conversation.credential.mechanism] += 1


# --------------------------------------------------------------------------- replica set


class MongoReplicaSet(_Startable):
    """``members`` servers on loopback ports forming one replica set ``name``.

    Every member advertises ``hosts`` = all members' ``127.0.0.1:port`` (or, with
    ``unresolvable_names=True``, names built from ``unresolvable_template`` that
    never resolve, e.g. ``-mongo-0.invalid:27017``), its own ``me``, and the
    primary's name. ``primary_index=None`` makes a set without a primary.
    Extra keyword arguments go to every :class:`MongoWireServer`.
    """

    def __init__(
        self,
        members: int = 3,
        *,
        name: str = "rs0",
        users: Sequence[MongoUser] = (),
        primary_index: int | None = 0,
        unresolvable_names: bool = False,
        unresolvable_template: str = UNRESOLVABLE_HOST_TEMPLATE,
        unresolvable_port: int = 27017,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        version: str = DEFAULT_VERSION,
        **member_options: Any,
    ) -> None:
        if members < 1:
            raise ValueError("a replica set needs at least one member")
        if primary_index is not None and not 0 <= primary_index < members:
            raise ValueError(f"primary_index {primary_index} out of range")
        self.name = name
        self.primary_index = primary_index
        self.unresolvable_names = unresolvable_names
        self.unresolvable_template = unresolvable_template
        self.unresolvable_port = unresolvable_port
        election_id = ObjectId()
        self.members: list[MongoWireServer] = [
            MongoWireServer(
                users=users,
                host=host,
                ssl_context=ssl_context,
                version=version,
                replica_set=name,
                is_primary=(i == primary_index),
                election_id=election_id,
                **member_options,
            )
            for i in range(members)
        ]
        self.advertised_hosts: list[str] = []
        self._started = False

    @property
    def seed_list(self) -> str:
        """``"127.0.0.1:p1,127.0.0.1:p2,..."``: the real addresses, for a client's host string."""
        return ",".join(member.address for member in self.members)

    @property
    def primary(self) -> MongoWireServer | None:
        return None if self.primary_index is None else self.members[self.primary_index]

    @property
    def connections_open(self) -> int:
        return sum(member.connections_open for member in self.members)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("replica set already started")
        self._started = True
        try:
            for member in self.members:
                await member.start()
        except BaseException:
            await self.stop()
            raise
        if self.unresolvable_names:
            names = [
                _format_address(self.unresolvable_host(i), self.unresolvable_port)
                for i in range(len(self.members))
            ]
        else:
            names = [member.address for member in self.members]
        self.advertised_hosts = names
        primary = None if self.primary_index is None else names[self.primary_index]
        for member, me in zip(self.members, names, strict=True):
            member.advertised_hosts = list(names)
            member.me = me
            member.primary = primary

    def unresolvable_host(self, index: int) -> str:
        """The unresolvable host name member ``index`` advertises."""
        return self.unresolvable_template.format(index=index, name=self.name)

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))
        self._started = False

    async def wait_idle(self, timeout: float = 5.0) -> bool:
        results = await asyncio.gather(*(m.wait_idle(timeout) for m in self.members))
        return all(results)

    def wait_idle_sync(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(m.wait_idle_sync(max(0.0, deadline - time.monotonic())) for m in self.members)

    @property
    def _thread_name(self) -> str:
        return f"mongo-wire-rs-{self.name}"


# --------------------------------------------------------------------------- driver leaks


def close_leaked_client_sockets(*targets: str | MongoWireServer | MongoReplicaSet) -> int:
    """Close client-side sockets to ``targets`` that their owner dropped without closing.

    PyMongo's async pool (4.20, ``pool_shared._async_create_connection``) closes the
    socket it is connecting only on ``OSError``/``TimeoutError``: when the connecting
    task is *cancelled* (``AsyncMongoClient.close()`` stopping a monitor that is
    reconnecting, or a caller's deadline), the socket stays open, referenced by the
    cancelled task's traceback, until the garbage collector finds it and emits
    ``ResourceWarning: unclosed <socket.socket ...>`` - an error under
    ``filterwarnings = error``, at an unpredictable later point. Tests call this after
    closing their clients: it closes every still-open ``socket.socket`` in this process
    whose peer is one of ``targets`` (servers, replica sets, or ``"host:port"``), and
    every TCP socket that is neither bound nor connected (a connect cancelled before it
    completed, or refused), and returns how many it closed. Only call it when no client
    of those servers is open and no other thread is opening connections.
    """
    wanted: set[tuple[str, int]] = set()
    for target in targets:
        if isinstance(target, MongoReplicaSet):
            wanted.update((m.host, m.port) for m in target.members)
        elif isinstance(target, MongoWireServer):
            wanted.add((target.host, target.port))
        else:
            for entry in target.split(","):
                host, _, port = entry.strip().rpartition(":")
                wanted.add((host.strip("[]"), int(port)))
    closed = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): the heap holds dead weakref proxies that raise on access
        if not issubclass(type(obj), socket.socket) or obj.fileno() < 0:
            continue
        if obj.family not in (socket.AF_INET, socket.AF_INET6) or obj.type != socket.SOCK_STREAM:
            continue
        try:
            peer = obj.getpeername()
        except OSError:
            # Cancelled before its connect completed (or after it was refused): never
            # bound, never connected, so no server or live connection can own it.
            try:
                orphan = obj.getsockname()[1] == 0
            except OSError:
                orphan = False
            if orphan:
                obj.close()
                closed += 1
            continue
        if isinstance(peer, tuple) and (peer[0], peer[1]) in wanted:
            obj.close()
            closed += 1
    return closed


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def _run_in_thread(target: _Runnable, name: str) -> Iterator[None]:
    started = threading.Event()
    failures: list[BaseException] = []
    control: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        try:
            await target.start()
        except BaseException as exc:
            failures.append(exc)
            started.set()
            return
        control["loop"] = asyncio.get_running_loop()
        control["stop"] = stop
        started.set()
        try:
            await stop.wait()
        finally:
            await target.stop()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failures.append(exc)
            started.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started.wait()
    if failures:
        thread.join()
        raise failures[0]
    try:
        yield
    finally:
        loop: asyncio.AbstractEventLoop = control["loop"]
        stop_event: asyncio.Event = control["stop"]
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError(f"{name}: server thread did not stop within 30 s")
        if failures:
            raise failures[0]
