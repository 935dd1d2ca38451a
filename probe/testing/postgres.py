"""A throwaway real PostgreSQL server for tests, the demo and the benchmarks.

    with PostgresServer(tls=TestPKI().server_tls()) as pg:
        user = pg.user("probe_scram")
        conn = await asyncpg.connect(host=pg.host, port=pg.port, user=user.name,
                                     password=user.password, database="appdb")

The server runs from the machine's PostgreSQL binaries (``initdb`` +
``postgres``; the highest ``/usr/lib/postgresql/*/bin``, or ``$PROBE_PG_BINDIR``)
in a private temporary directory, listens on a free port of 127.0.0.1 only
(plus ``::1`` with ``listen_ipv6=True``), its unix socket lives in the temporary
directory. When the process is root the server runs as the ``postgres``
account. Durability is switched off (``fsync=off`` ...) for speed.

Authentication (``pg_hba.conf``): the superuser and SCRAM users use
``scram-sha-256``; every user whose :attr:`DbUser.method` is not SCRAM gets its
own line with that method (``md5`` users also get an md5-hashed password). With
``ssl_only=True`` every TCP line is ``hostssl`` and plaintext is rejected by a
``hostnossl ... reject`` line. Local (unix socket) connections are ``trust``:
the socket sits in a 0700 directory, and :meth:`PostgresServer.sql` uses it.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from probe.testing._proc import (
    DbUser,
    ManagedServer,
    ServerStartError,
    data_dir_from_template,
    run_checked,
)
from probe.testing.certs import ServerTLS, TLSFiles

__all__ = [
    "DEFAULT_USERS",
    "MD5_USER",
    "NODB_USER",
    "NOLOGIN_USER",
    "PASSWORD_USER",
    "SCRAM_USER",
    "UNICODE_USER",
    "DbUser",
    "PostgresServer",
    "find_pg_bindir",
    "quote_ident",
    "quote_literal",
]

#: SCRAM user whose password has URL/DSN-hostile characters, quotes and a backslash.
SCRAM_USER = DbUser("probe_scram", "p@ss:w/rd%41? 'single' \"double\" back\\slash")
#: SCRAM user with a non-ASCII password (SASLprep applies).
UNICODE_USER = DbUser("probe_unicode", "pässwörd пароль")
#: md5 authentication (md5-hashed password, ``md5`` hba line).
MD5_USER = DbUser("probe_md5", "md5 p@ss:w/rd%41? pässwörd 'q'", method="md5")
#: clear-text ``password`` authentication (only sensible over TLS; tests only).
PASSWORD_USER = DbUser("probe_cleartext", "clear p@ss:w/rd", method="password")
#: a NOLOGIN role: correct password, then "role is not permitted to log in" (28000).
NOLOGIN_USER = DbUser("probe_nologin", "nologin p@ss", login=False)
#: may connect to no database: "permission denied for database" (42501).
NODB_USER = DbUser("probe_nodb", "nodb p@ss", databases=())

DEFAULT_USERS: tuple[DbUser, ...] = (
    SCRAM_USER,
    UNICODE_USER,
    MD5_USER,
    PASSWORD_USER,
    NOLOGIN_USER,
    NODB_USER,
)

_HBA_METHODS = {"scram-sha-256", "md5", "password", "trust"}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A standard SQL string literal (``standard_conforming_strings`` is on)."""
    if "\x00" in value:
        raise ValueError("NUL is not allowed in PostgreSQL strings")
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _hba_token(name: str) -> str:
    if '"' in name or "\n" in name:
        raise ValueError(f"user name {name!r} cannot be written to pg_hba.conf")
    return '"' + name + '"'


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name) or ["0"])


def find_pg_bindir() -> Path:
    """The directory of ``initdb``/``postgres``/``psql``: ``$PROBE_PG_BINDIR``, else the
    highest ``/usr/lib/postgresql/*/bin``, else ``pg_config --bindir``, else ``$PATH``."""

    def usable(cand: Path) -> bool:
        return (cand / "initdb").is_file() and (cand / "postgres").is_file()

    env = os.environ.get("PROBE_PG_BINDIR")
    candidates: list[Path] = [Path(env)] if env else []
    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)[::-1]
    ]
    for cand in candidates:
        if usable(cand):
            return cand
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            cand = Path(run_checked([pg_config, "--bindir"], timeout=10).strip())
        except Exception:  # pragma: no cover - broken pg_config
            cand = Path("/nonexistent")
        if usable(cand):
            return cand
    initdb = shutil.which("initdb")
    if initdb and usable(Path(initdb).parent):
        return Path(initdb).parent
    raise ServerStartError("no PostgreSQL binaries (initdb, postgres) found")


class PostgresServer(ManagedServer):
    """A real PostgreSQL server in a temporary directory (context manager)."""

    kind: ClassVar[str] = "postgres"
    service_accounts: ClassVar[tuple[str, ...]] = ("postgres",)
    stop_signal: ClassVar[int] = signal.SIGINT  # "fast" shutdown
    death_signal: ClassVar[int] = signal.SIGQUIT  # "immediate" shutdown

    def __init__(
        self,
        *,
        users: Iterable[DbUser] = DEFAULT_USERS,
        databases: Sequence[str] = ("appdb",),
        tls: ServerTLS | None = None,
        ssl_only: bool = False,
        max_connections: int = 100,
        extra_conf: Mapping[str, str] | None = None,
        listen_ipv6: bool = False,
        superuser: str = "postgres",
    ) -> None:
        super().__init__(listen_ipv6=listen_ipv6)
        self.users: tuple[DbUser, ...] = tuple(users)
        self.databases: tuple[str, ...] = tuple(databases)
        self.tls = tls
        self.ssl_only = ssl_only
        self.max_connections = max_connections
        self.extra_conf = dict(extra_conf or {})
        self.superuser = superuser
        self.superuser_password = secrets.token_urlsafe(18)
        self.bindir = find_pg_bindir()
        self.tls_files: TLSFiles | None = None
        if ssl_only and tls is None:
            raise ValueError("ssl_only=True needs tls=")
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2")
        names = [u.name for u in self.users]
        if len(set(names)) != len(names) or superuser in names:
            raise ValueError("duplicate user names")
        for user in self.users:
            if user.method not in _HBA_METHODS:
                raise ValueError(f"unsupported method {user.method!r} for {user.name!r}")
            for db in user.databases or ():
                if db not in self.databases and db != "postgres":
                    raise ValueError(f"user {user.name!r} refers to unknown database {db!r}")

    # -- paths ------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def hba_path(self) -> Path:
        return self.data_dir / "pg_hba.conf"

    @property
    def conf_path(self) -> Path:
        """Our settings (included from ``postgresql.conf``); rewritten on every (re)start."""
        return self.data_dir / "probe.conf"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    # -- helpers for tests -------------------------------------------------------

    def user(self, name: str) -> DbUser:
        for user in self.users:
            if user.name == name:
                return user
        if name == self.superuser:
            return DbUser(name, self.superuser_password)
        raise KeyError(name)

    def dsn(self, user: DbUser | str, database: str = "appdb", **params: str) -> str:
        """A ``postgresql://`` URL with the password percent-encoded."""
        u = self.user(user) if isinstance(user, str) else user
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        return (
            f"postgresql://{quote(u.name, safe='')}:{quote(u.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}" + (f"?{query}" if query else "")
        )

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one SQL statement as the superuser via ``psql`` over the unix socket.

        Returns the rows unaligned (``|`` between columns, one row a line),
        without a trailing newline.
        """
        return self._psql([statement], database=database).rstrip("\n")

    def reload(self) -> None:
        """Re-read ``pg_hba.conf`` and the configuration (SIGHUP)."""
        self.sql("SELECT pg_reload_conf()")

    def backend_count(self, user: str | None = None) -> int:
        """Client backends in ``pg_stat_activity`` (optionally of one user)."""
        where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if user is not None:
            where += f" AND usename = {quote_literal(user)}"
        return int(self.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}"))

    # -- lifecycle implementation ----------------------------------------------------

    def _psql(self, statements: Sequence[str], database: str = "postgres") -> str:
        cmd = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-d",
            database,
        ]
        for statement in statements:
            cmd += ["-c", statement]
        return run_checked(
            cmd,
            run_as=self.run_as,
            env=self.run_as.env({"PGCLIENTENCODING": "UTF8", "PGCONNECT_TIMEOUT": "10"}),
            cwd=self.base_dir,
            timeout=60,
        )

    def _initdb(self, target: Path) -> None:
        run_checked(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(target),
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
                "--auth-local=trust",
                "--auth-host=reject",
            ],
            run_as=self.run_as,
            env=self.run_as.env(),
            cwd=target.parent,
            timeout=120,
        )

    def _initialize(self) -> None:
        base = self.base_dir
        data_dir_from_template(
            (str(self.bindir), self.superuser), self.kind, self.run_as, self.data_dir, self._initdb
        )
        self.socket_dir.mkdir(mode=0o700)
        self.run_as.chown(self.socket_dir)
        if self.tls is not None:
            self.tls_files = self.tls.write(base / "tls", self.run_as)
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# probe.testing\ninclude 'probe.conf'\n")
        self.run_as.write_file(self.hba_path, self._hba())

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": ",".join(self.listen_hosts),
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": str(min(3, self.max_connections - 1)),
            "password_encryption": "scram-sha-256",
            "shared_buffers": "16MB",
            "fsync": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "autovacuum": "off",
            "jit": "off",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
            "ssl": "off",
        }
        if self.tls_files is not None:
            settings.update(
                ssl="on",
                ssl_cert_file=str(self.tls_files.cert_path),
                ssl_key_file=str(self.tls_files.key_path),
                ssl_ca_file=str(self.tls_files.ca_path),
            )
        settings.update(self.extra_conf)
        return settings

    def _hba(self) -> str:
        conn = "hostssl" if self.ssl_only else "host"
        nets = ("127.0.0.1/32", "::1/128")
        lines = [
            "# TYPE  DATABASE  USER  ADDRESS  METHOD  (written by probe.testing.postgres)",
            "local all all trust",
        ]
        if self.ssl_only:
            lines += [f"hostnossl all all {net} reject" for net in nets]
        for user in self.users:
            if user.method != "scram-sha-256":
                lines += [f"{conn} all {_hba_token(user.name)} {net} {user.method}" for net in nets]
        lines += [f"{conn} all all {net} scram-sha-256" for net in nets]
        return "\n".join(lines) + "\n"

    def _before_launch(self) -> None:
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in self._settings().items())
        self.run_as.write_file(self.conf_path, text)

    def _command(self) -> list[str]:
        return [str(self.bindir / "postgres"), "-D", str(self.data_dir)]

    def _ready(self) -> bool:
        # postmaster.pid line 8 is "ready" once connections are accepted (what pg_ctl -w uses);
        # line 1 must be our process (a stale file survives a kill).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and self._proc is not None
            and lines[0].strip() == str(self._proc.pid)
            and lines[7].strip() == "ready"
        )

    def _bootstrap(self) -> None:
        all_dbs = ("postgres", *self.databases)
        stmts = [
            "SET password_encryption = 'scram-sha-256'",
            f"ALTER ROLE {quote_ident(self.superuser)} "
            f"PASSWORD {quote_literal(self.superuser_password)}",
        ]
        stmts += [f"CREATE DATABASE {quote_ident(db)}" for db in self.databases]
        stmts += [f"REVOKE CONNECT ON DATABASE {quote_ident(db)} FROM PUBLIC" for db in all_dbs]
        for user in self.users:
            encryption = "md5" if user.method == "md5" else "scram-sha-256"
            stmts.append(f"SET password_encryption = '{encryption}'")
            stmts.append(
                f"CREATE ROLE {quote_ident(user.name)} {'LOGIN' if user.login else 'NOLOGIN'} "
                f"PASSWORD {quote_literal(user.password)}"
            )
            role = quote_ident(user.name)
            stmts += [
                f"GRANT CONNECT, TEMPORARY ON DATABASE {quote_ident(db)} TO {role}"
                for db in all_dbs
                if user.may_use(db)
            ]
        stmts.append("CHECKPOINT")  # the setup must survive kill()
        self._psql(stmts)
