"""Misbehaving TCP endpoints on loopback, for tests, the demo and the benchmarks.

- `refused_port()`: a port bound but not listening: connects get RST (refused).
- `Blackhole`: a listener whose accept queue is full, so the kernel drops SYNs
  and a connect times out, as against a firewalled host.
- `FaultServer`: accepts TCP, then per `mode`: ``silent`` never speaks;
  ``greeting`` sends `greeting`, answers the client's first message with
  `reply` (if given) and each further one with the next of `replies`, then
  does what `then` says with the next message (``stall``: ignore it,
  ``reset``: RST, ``close``: FIN); ``trickle`` sends `greeting` one byte
  every `interval` seconds (a slow-loris server), then stalls; ``garbage``
  sends an SSH-like banner then stalls; ``reset`` closes at once with RST;
  ``close`` closes cleanly after reading the first bytes. With
  `mysql_greeting()`, `mysql_ok()` and `mysql_error()` the ``greeting`` mode
  plays a MySQL server refusing a login with any errno (for errors the local
  MariaDB cannot produce, such as MySQL 8's 3159), or accepting it and then
  resetting the connection.

Everything binds to 127.0.0.1 only and runs on its own thread, so sync code
(the demo, benchmarks) and async tests can use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

HOST = "127.0.0.1"
Mode = Literal["silent", "greeting", "trickle", "garbage", "reset", "close"]
Then = Literal["stall", "reset", "close"]

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def mysql_greeting(version: bytes = b"10.11.6-MariaDB", *, ssl: bool = False) -> bytes:
    """A well-formed MySQL protocol-10 greeting packet (sequence 0); with `ssl`,
    it offers TLS (CLIENT_SSL)."""
    payload = (
        b"\x0a" + version + b"\x00"
        + struct.pack("<I", 7)  # thread id
        + b"abcdefgh\x00"  # auth-plugin-data part 1 + filler
        + struct.pack("<H", 0xFFFF if ssl else 0xF7FF)  # capabilities (lower): CLIENT_SSL?
        + b"\x21"  # utf8 charset
        + struct.pack("<H", 2)  # status
        + struct.pack("<H", 0x81BF)  # capabilities (upper)
        + b"\x15" + b"\x00" * 10
        + b"ijklmnopqrst\x00"
        + b"mysql_native_password\x00"
    )
    return struct.pack("<I", len(payload))[:3] + b"\x00" + payload


def mysql_error(errno: int, message: str, sqlstate: str = "HY000", sequence: int = 2) -> bytes:
    """A MySQL ERR packet (the answer to a handshake response has sequence 2)."""
    payload = b"\xff" + struct.pack("<H", errno) + b"#" + sqlstate.encode() + message.encode()
    return struct.pack("<I", len(payload))[:3] + bytes([sequence]) + payload


def mysql_ok(sequence: int = 2) -> bytes:
    """A MySQL OK packet (the answer to an accepted handshake response has sequence 2)."""
    payload = b"\x00\x00\x00" + struct.pack("<HH", 2, 0)  # 0 rows, id 0, autocommit, 0 warnings
    return struct.pack("<I", len(payload))[:3] + bytes([sequence]) + payload


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class _Bound:
    """A bound socket held open for the life of the object."""

    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Bound:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")
    return host


class RefusedPort(_Bound):
    """A port that is bound (so nobody else takes it) but never listens: connects are refused."""

    def __init__(self, host: str = HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((_loopback(host), 0))


def refused_port() -> RefusedPort:
    return RefusedPort()


class Blackhole(_Bound):
    """A listener with a full accept queue: the kernel drops further SYNs, so connects hang.

    `host` and `port` place it (any loopback address; port 0 picks a free one),
    e.g. at 127.0.0.2 on the port a real server uses at 127.0.0.1.
    """

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        self.host = _loopback(host)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((self.host, port))
        self.sock.listen(0)
        self._fillers: list[socket.socket] = []
        # Fill the accept queue (its length is backlog + 1), then check that a
        # further connect really hangs.
        for _ in range(8):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((self.host, self.port))
            self._fillers.append(filler)
            if self._hangs():
                return
        raise RuntimeError("could not fill the accept queue of the blackhole listener")

    def _hangs(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            try:
                probe.connect((self.host, self.port))
            except (TimeoutError, OSError):
                return True
        return False

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        super().close()


class FaultServer:
    """A TCP server on its own thread that misbehaves as `mode` says."""

    def __init__(
        self,
        mode: Mode,
        greeting: bytes = b"",
        reply: bytes = b"",
        *,
        replies: Sequence[bytes] = (),
        then: Then = "stall",
        interval: float = 1.0,
    ) -> None:
        self.mode = mode
        self.greeting = greeting if mode in ("greeting", "trickle") else SSH_BANNER
        self.replies = [reply, *replies] if reply else list(replies)
        self.then = then
        self.interval = interval
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections this server holds open right now."""
        return len(self._writers)

    def start(self) -> FaultServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, HOST, 0, backlog=1024), self._loop
        ).result(timeout=10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            if self.mode == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if self.mode == "close":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1), 5)
                writer.close()
                return
            if self.mode == "trickle":
                await self._trickle(reader, writer)
                return
            if self.mode in ("greeting", "garbage"):
                writer.write(self.greeting)
                for answer in self.replies if self.mode == "greeting" else ():
                    if not await reader.read(65536):
                        return
                    writer.write(answer)
                if self.mode == "greeting" and self.then != "stall":
                    if await reader.read(65536) and self.then == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        writer.transport.abort()
                    return
            # Stall: read and drop whatever comes until the client leaves.
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The greeting, one byte every `interval` seconds, until it is out or the client left."""

        async def drain() -> None:
            while await reader.read(65536):
                pass

        client = asyncio.ensure_future(drain())
        try:
            for i in range(len(self.greeting)):
                if client.done():
                    return
                writer.write(self.greeting[i : i + 1])
                await asyncio.wait([client], timeout=self.interval)
            await client
        finally:
            client.cancel()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
