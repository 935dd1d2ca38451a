"""Process plumbing shared by the throwaway test database servers.

Everything here is about running a real server binary safely in a test run:

* free loopback ports (and a refusal to ever touch a non-loopback address),
* the unprivileged system account a server runs as when we are root,
* private temporary directories, removed on every path,
* spawning the server in its own process group, with a parent-death signal
  and an ``atexit`` safety net so that no server outlives the Python process,
* waiting for readiness, stopping, killing, freezing (SIGSTOP) a server.

The server classes (:mod:`probe.testing.postgres`, :mod:`probe.testing.mariadb`)
derive from :class:`ManagedServer` and only implement the engine specifics.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

__all__ = [
    "LOOPBACK_V4",
    "LOOPBACK_V6",
    "DbUser",
    "ManagedServer",
    "PortInUseError",
    "RunAs",
    "ServerCommandError",
    "ServerStartError",
    "assert_loopback",
    "free_port",
]

LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"

_DIR_PREFIX = "probe-testsrv-"
_OWNER_FILE = ".probe-owner-pid"


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries the tail of its log."""


class PortInUseError(ServerStartError):
    """The server could not bind its port (lost a race for a free port)."""


class ServerCommandError(RuntimeError):
    """A helper command (initdb, psql, mariadb client, ...) failed."""

    def __init__(self, cmd: Sequence[str], returncode: int, output: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output = output
        super().__init__(f"{Path(cmd[0]).name} exited with {returncode}: {output.strip()[-2000:]}")


@dataclass(frozen=True)
class DbUser:
    """A database account created by a test server.

    ``method``: PostgreSQL authentication method for this user's ``pg_hba.conf``
    line and password hash: ``scram-sha-256`` (default), ``md5``, ``password``
    (clear text over the wire, SCRAM-hashed at rest) or ``trust``. MariaDB
    ignores it (accounts always use ``mysql_native_password``).

    ``login=False``: PostgreSQL ``NOLOGIN`` role / MariaDB ``ACCOUNT LOCK``.

    ``databases``: the server databases this user may use (PostgreSQL
    ``CONNECT`` privilege, MariaDB ``GRANT ALL ON db.*``); ``None`` means all
    of them, ``()`` none.
    """

    name: str
    password: str
    method: str = "scram-sha-256"
    login: bool = True
    databases: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DbUser.name must not be empty")
        if "\x00" in self.name or "\x00" in self.password:
            raise ValueError("DbUser name/password must not contain NUL")
        if self.method not in ("scram-sha-256", "md5", "password", "trust"):
            raise ValueError(f"unsupported DbUser.method {self.method!r}")

    def __repr__(self) -> str:  # never print a password, even a test one
        return (
            f"DbUser(name={self.name!r}, method={self.method!r}, login={self.login!r}, "
            f"databases={self.databases!r})"
        )

    def may_use(self, database: str) -> bool:
        return self.databases is None or database in self.databases


def assert_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback IP literal, else raise ``ValueError``."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"test servers only use loopback IP literals, not {host!r}") from None
    if not addr.is_loopback:
        raise ValueError(f"refusing non-loopback address {host!r}")
    return host


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK_V6, 0))
    except OSError:
        return False
    return True


def free_port(hosts: Sequence[str] = (LOOPBACK_V4,)) -> int:
    """A TCP port currently free on every one of ``hosts`` (loopback only).

    There is an unavoidable race between this call and the server's bind: the
    servers retry with a new port when they lose it (:class:`PortInUseError`).
    """
    for host in hosts:
        assert_loopback(host)
    for _ in range(50):
        family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((hosts[0], 0))
            port: int = s.getsockname()[1]
        if all(_port_free(h, port) for h in hosts[1:]):
            return port
    raise RuntimeError("could not find a free loopback port")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to (loopback) host:port succeeds."""
    assert_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class RunAs:
    """The OS account a server process runs as.

    When we are root, database servers must not run as root (``initdb``
    refuses to): they run as a system account (``postgres``, ``mysql``). When
    we are not root, they run as ourselves (``uid is None``).
    """

    uid: int | None
    gid: int | None
    name: str
    home: str

    @classmethod
    def for_service(cls, *candidates: str) -> RunAs:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return cls(None, None, me.pw_name, me.pw_dir)
        for name in candidates:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            if pw.pw_uid != 0:
                return cls(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir)
        for name in ("nobody",):
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(name)
                return cls(pw.pw_uid, pw.pw_gid, pw.pw_name, "/")
        raise ServerStartError(
            f"running as root and none of the accounts {candidates} exists to run the server"
        )

    @property
    def is_switching(self) -> bool:
        return self.uid is not None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def write_file(self, path: Path, data: bytes | str, mode: int = 0o600) -> Path:
        """Write a private file owned by this account."""
        raw = data.encode() if isinstance(data, str) else data
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            if self.uid is not None and self.gid is not None:
                os.fchown(fd, self.uid, self.gid)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(raw)
        finally:
            os.close(fd)
        return path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": self.home if self.uid is not None else os.environ.get("HOME", self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "TZ": "UTC",
        }
        if extra:
            env.update(extra)
        return env


# --------------------------------------------------------------------------- dirs


def server_tmp_root() -> Path:
    """Where server directories go: ``$PROBE_TESTSRV_TMPDIR``, else ``/dev/shm`` when it is
    a roomy tmpfs (data directories are copied and written a lot: on some VM disks that
    costs seconds), else the standard temporary directory."""
    env = os.environ.get("PROBE_TESTSRV_TMPDIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def make_server_dir(kind: str, run_as: RunAs) -> Path:
    """A private (0700) temporary directory owned by the server account.

    A marker file records our pid so that a later run can remove directories
    left behind by a Python process that was SIGKILLed (no ``atexit``).
    """
    reap_stale_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{kind}-", dir=server_tmp_root()))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    os.chmod(path, 0o700)
    run_as.chown(path)
    return path


def reap_stale_dirs() -> None:
    """Remove test-server directories whose owning Python process is gone."""
    entries: list[Path] = []
    for base in {server_tmp_root(), Path(tempfile.gettempdir())}:
        with contextlib.suppress(OSError):
            entries += base.glob(f"{_DIR_PREFIX}*")
    for entry in entries:
        try:
            pid = int((entry / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _kill_pidfile_processes(entry)
        remove_dir(entry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pidfile_processes(directory: Path) -> None:
    """Kill a server orphaned in ``directory`` (pid files written by the servers)."""
    for pidfile in (*directory.glob("*/postmaster.pid"), *directory.glob("*.pid")):
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if str(directory).encode() in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def remove_dir(path: Path) -> None:
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)
    shutil.rmtree(path)  # raise the real error


# ---------------------------------------------------------------- data templates

_TEMPLATES: dict[tuple[str, ...], Path] = {}
_TEMPLATE_LOCK = threading.Lock()


def data_dir_from_template(
    key: tuple[str, ...],
    kind: str,
    run_as: RunAs,
    target: Path,
    build: Callable[[Path], None],
) -> None:
    """Create the data directory ``target`` as a copy of a per-process template.

    ``initdb``/``mariadb-install-db`` run once per process and key (``build``
    creates a pristine data directory); every server then gets a ``cp -a``
    copy, which is several times faster. ``PROBE_TESTSRV_NO_TEMPLATE=1`` builds
    every data directory from scratch instead.
    """
    if os.environ.get("PROBE_TESTSRV_NO_TEMPLATE"):
        build(target)
        return
    full_key = (kind, str(run_as.uid), *key)
    with _TEMPLATE_LOCK:
        template = _TEMPLATES.get(full_key)
        if template is None or not template.exists():
            holder = make_server_dir(f"{kind}-template", run_as)
            template = holder / "data"
            try:
                build(template)
            except BaseException:
                remove_dir(holder)
                raise
            _TEMPLATES[full_key] = template
    run_checked(
        ["cp", "-a", "--", str(template), str(target)],
        run_as=run_as,
        env=run_as.env(),
        timeout=120,
    )


def drop_templates() -> None:
    """Remove the cached data-directory templates (also done at exit)."""
    with _TEMPLATE_LOCK:
        for template in _TEMPLATES.values():
            with contextlib.suppress(OSError):
                remove_dir(template.parent)
        _TEMPLATES.clear()


atexit.register(drop_templates)


# ----------------------------------------------------------------------- commands


def run_checked(
    cmd: Sequence[str],
    *,
    run_as: RunAs | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
    input_text: str | None = None,
) -> str:
    """Run a helper command; return its stdout, raise :class:`ServerCommandError`."""
    kwargs = run_as.popen_kwargs() if run_as is not None else {}
    proc = subprocess.run(
        list(cmd),
        input=input_text,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=dict(env) if env is not None else None,
        cwd=cwd,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if proc.returncode != 0:
        raise ServerCommandError(cmd, proc.returncode, str(proc.stderr or proc.stdout))
    return str(proc.stdout)


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None
_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to signal the child when we die.

    The parent-death signal fires when the *thread* that forked the child
    exits, so it is only armed when spawning from the main thread (a server
    started from a worker thread would otherwise die with that thread).
    It runs after the uid switch in the child, so it survives it.
    """
    if _libc is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def spawn(
    cmd: Sequence[str],
    *,
    run_as: RunAs,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str],
    death_signal: int,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session / process group, output to ``log_path``."""
    with open(log_path, "ab") as log:
        run_as.chown(log_path)
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
            preexec_fn=_pdeathsig_preexec(death_signal),
            **run_as.popen_kwargs(),
        )


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the server's whole process group (leader may be gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float = 15.0) -> None:
    """Stop with ``sig``; SIGKILL the group if it does not exit within ``timeout``."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGCONT)  # a frozen server cannot handle signals
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Leftover children (e.g. PostgreSQL backends after a kill) and the leader.
    signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _wait_group_gone(proc.pid, 5.0)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # pragma: no cover
            return
        time.sleep(0.01)


def log_tail(path: Path, lines: int = 30, offset: int = 0) -> str:
    """The last ``lines`` lines of a log, reading from byte ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------- base class

_LIVE: dict[int, ManagedServer] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class ManagedServer:
    """Lifecycle shared by the real-server fixtures.

    Subclasses implement :meth:`_initialize` (create the data directory),
    :meth:`_command` (the server command line), :meth:`_ready` (readiness
    probe) and :meth:`_bootstrap` (databases, users); and set ``kind``,
    ``service_accounts``, ``stop_signal`` and ``death_signal``.
    """

    kind: ClassVar[str] = "server"
    service_accounts: ClassVar[tuple[str, ...]] = ()
    stop_signal: ClassVar[int] = signal.SIGTERM
    death_signal: ClassVar[int] = signal.SIGKILL
    start_timeout: ClassVar[float] = 60.0

    host: str
    port: int

    def __init__(self, *, listen_ipv6: bool = False) -> None:
        self.host = LOOPBACK_V4
        self.port = 0
        self.listen_ipv6 = listen_ipv6
        self.run_as = RunAs.for_service(*self.service_accounts)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # size of the log when the current process was launched
        self._lock = threading.RLock()
        #: seconds spent in each startup phase (``init``, ``launch``, ``bootstrap``, ``total``)
        self.timings: dict[str, float] = {}

    # -- public lifecycle -------------------------------------------------------

    @property
    def listen_hosts(self) -> tuple[str, ...]:
        return (LOOPBACK_V4, LOOPBACK_V6) if self.listen_ipv6 else (LOOPBACK_V4,)

    @property
    def base_dir(self) -> Path:
        """The private temporary directory (data, sockets, logs, TLS files)."""
        if self._dir is None:
            raise RuntimeError(f"{self.kind} server is not started")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (even if the process was killed)."""
        return self._dir is not None

    def start(self) -> None:
        with self._lock:
            if self._dir is not None:
                raise RuntimeError(f"{self.kind} server already started")
            t0 = time.perf_counter()
            self._dir = make_server_dir(self.kind, self.run_as)
            with _LIVE_LOCK:
                _LIVE[id(self)] = self
            try:
                self._initialize()
                t1 = time.perf_counter()
                self._launch_with_port_retry()
                t2 = time.perf_counter()
                self._bootstrap()
                t3 = time.perf_counter()
            except BaseException:
                self.stop()
                raise
            self.timings = {
                "init": t1 - t0,
                "launch": t2 - t1,
                "bootstrap": t3 - t2,
                "total": t3 - t0,
            }

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent, never raises on a dead server."""
        with self._lock:
            try:
                self._stop_process()
            finally:
                if self._dir is not None:
                    remove_dir(self._dir)
                    self._dir = None
                with _LIVE_LOCK:
                    _LIVE.pop(id(self), None)

    def stop_server_only(self) -> None:
        """Shut the server process down cleanly but keep its data: :meth:`restart` brings it back
        on the same port. Meanwhile connections are refused."""
        with self._lock:
            self._stop_process()

    def kill(self) -> None:
        """SIGKILL the server (a crash): connections are refused until :meth:`restart`."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            signal_group(proc, signal.SIGCONT)
            signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            _wait_group_gone(proc.pid, 5.0)
            self._proc = None

    def restart(self) -> None:
        """(Re)start the server process on the same port with the same data."""
        with self._lock:
            if self._dir is None:
                raise RuntimeError(f"{self.kind} server is not started")
            self._stop_process()
            self._launch()

    def freeze(self) -> None:
        """SIGSTOP the server: TCP connects still complete (kernel backlog) but it never
        answers, which simulates a hung server (handshake timeouts)."""
        if self._proc is not None:
            signal_group(self._proc, signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            signal_group(self._proc, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else ("stopped" if self.started else "new")
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- internals --------------------------------------------------------------

    def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            terminate(proc, self.stop_signal)
        finally:
            self._proc = None

    def _launch_with_port_retry(self) -> None:
        for attempt in range(5):
            self.port = free_port(self.listen_hosts)
            try:
                self._launch()
                return
            except PortInUseError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        self._before_launch()
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        cmd = self._command()
        self._proc = proc = spawn(
            cmd,
            run_as=self.run_as,
            log_path=self.log_path,
            cwd=self.base_dir,
            env=self.run_as.env(),
            death_signal=self.death_signal,
        )
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            if proc.poll() is not None:
                self._proc = None
                tail = log_tail(self.log_path, offset=self._log_offset)
                if "already in use" in tail:
                    raise PortInUseError(f"port {self.port} in use:\n{tail}")
                raise ServerStartError(
                    f"{self.kind} exited with {proc.returncode} during startup:\n{tail}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self._stop_process()
                raise ServerStartError(
                    f"{self.kind} not ready after {self.start_timeout}s:\n"
                    f"{log_tail(self.log_path, offset=self._log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def _before_launch(self) -> None:
        """Hook: (re)write configuration that depends on the port."""

    def _initialize(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _bootstrap(self) -> None:
        raise NotImplementedError
