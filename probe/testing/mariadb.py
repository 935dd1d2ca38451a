"""A throwaway real MariaDB server for tests, the demo and the benchmarks.

    with MariaDBServer(tls=TestPKI().server_tls()) as db:
        user = db.user("probe_native")
        conn = await aiomysql.connect(host=db.host, port=db.port, user=user.name,
                                      password=mysql_password(user.password), db="appdb")

``mariadb-install-db`` + ``mariadbd`` run in a private temporary directory
(as the ``mysql`` account when the process is root), listening on a free port
of 127.0.0.1 only (plus ``::1`` with ``listen_ipv6=True``), with the unix socket
in the temporary directory. InnoDB is kept small and durability off for a fast
start.

Accounts: every :class:`DbUser` is created as ``'name'@'127.0.0.1'`` and
``'name'@'localhost'`` (``::1`` too with ``listen_ipv6``) with
``mysql_native_password`` and ``GRANT ALL`` on the databases it may use
(:attr:`DbUser.databases`); ``login=False`` accounts are ``ACCOUNT LOCK``\\ed.
The native-password hash is computed here over the UTF-8 bytes of the password.

Non-ASCII passwords and aiomysql: aiomysql/PyMySQL encode the password with
``latin-1`` (``'пароль'`` raises ``UnicodeEncodeError``, ``'pässwörd'`` sends the
wrong bytes). Pass :func:`mysql_password` (UTF-8 bytes smuggled through a
latin-1 ``str``) to send the UTF-8 bytes that ``mariadb``/``mysql`` clients send.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from probe.testing._proc import (
    LOOPBACK_V4,
    LOOPBACK_V6,
    DbUser,
    ManagedServer,
    ServerStartError,
    data_dir_from_template,
    run_checked,
)
from probe.testing.certs import ServerTLS, TLSFiles

__all__ = [
    "DEFAULT_USERS",
    "LOCKED_USER",
    "NATIVE_USER",
    "NOGRANT_USER",
    "UNICODE_USER",
    "DbUser",
    "MariaDBServer",
    "mysql_password",
    "native_password_hash",
    "quote_ident",
    "quote_string",
]

#: password with URL/DSN-hostile characters, quotes and a backslash.
NATIVE_USER = DbUser("probe_native", "p@ss:w/rd%41? 'single' \"double\" back\\slash")
#: non-ASCII password (see :func:`mysql_password` for aiomysql).
UNICODE_USER = DbUser("probe_unicode", "pässwörd пароль")
#: no grant on any database: connecting with ``db="appdb"`` gives errno 1044.
NOGRANT_USER = DbUser("probe_nogrant", "nogrant p@ss", databases=())
#: ``ACCOUNT LOCK``: correct password, errno 4151 "Access denied, this account is locked".
LOCKED_USER = DbUser("probe_locked", "locked p@ss", login=False)

DEFAULT_USERS: tuple[DbUser, ...] = (NATIVE_USER, UNICODE_USER, NOGRANT_USER, LOCKED_USER)


def mysql_password(password: str) -> str:
    """The ``str`` to give aiomysql/PyMySQL so that the UTF-8 bytes of ``password`` go on
    the wire (they encode passwords with latin-1)."""
    return password.encode("utf-8").decode("latin-1")


def native_password_hash(password: str) -> str:
    """``mysql_native_password`` hash (``*`` + SHA1(SHA1(utf-8 bytes)))."""
    raw = password.encode("utf-8")
    if not raw:
        return ""
    return "*" + hashlib.sha1(hashlib.sha1(raw).digest()).hexdigest().upper()


def quote_string(value: str) -> str:
    """A MariaDB string literal (default ``sql_mode``: backslash escapes are active)."""
    if "\x00" in value:
        raise ValueError("NUL is not allowed")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _find(binary: str, *extra_dirs: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    for directory in extra_dirs:
        path = Path(directory) / binary
        if path.is_file():
            return str(path)
    raise ServerStartError(f"{binary} not found")


class MariaDBServer(ManagedServer):
    """A real MariaDB server in a temporary directory (context manager)."""

    kind: ClassVar[str] = "mariadb"
    service_accounts: ClassVar[tuple[str, ...]] = ("mysql",)
    stop_signal: ClassVar[int] = signal.SIGTERM
    death_signal: ClassVar[int] = signal.SIGKILL

    def __init__(
        self,
        *,
        users: Iterable[DbUser] = DEFAULT_USERS,
        databases: Sequence[str] = ("appdb",),
        tls: ServerTLS | None = None,
        require_secure_transport: bool = False,
        max_connections: int = 151,
        max_connect_errors: int = 100,
        extra_args: Sequence[str] = (),
        listen_ipv6: bool = False,
    ) -> None:
        super().__init__(listen_ipv6=listen_ipv6)
        self.users: tuple[DbUser, ...] = tuple(users)
        self.databases: tuple[str, ...] = tuple(databases)
        self.tls = tls
        self.require_secure_transport = require_secure_transport
        self.max_connections = max_connections
        self.max_connect_errors = max_connect_errors
        self.extra_args = tuple(extra_args)
        self.superuser = "root"
        self.superuser_password = secrets.token_urlsafe(18)
        self.mariadbd = _find("mariadbd", "/usr/sbin", "/usr/libexec")
        self.install_db = _find("mariadb-install-db", "/usr/bin", "/usr/scripts")
        self.client = _find("mariadb", "/usr/bin")
        self.tls_files: TLSFiles | None = None
        if require_secure_transport and tls is None:
            raise ValueError("require_secure_transport=True needs tls=")
        if max_connections < 10:
            # mariadbd silently clamps smaller values to 10.
            raise ValueError("MariaDB's max_connections cannot be below 10")
        names = [u.name for u in self.users]
        if len(set(names)) != len(names) or "root" in names:
            raise ValueError("duplicate user names")
        for user in self.users:
            for db in user.databases or ():
                if db not in self.databases:
                    raise ValueError(f"user {user.name!r} refers to unknown database {db!r}")

    # -- paths ------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "mysqld.sock"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "mariadb.log"

    @property
    def client_cnf(self) -> Path:
        return self.base_dir / "client.cnf"

    @property
    def account_hosts(self) -> tuple[str, ...]:
        hosts = (LOOPBACK_V4, "localhost")
        return (*hosts, LOOPBACK_V6) if self.listen_ipv6 else hosts

    # -- helpers for tests -------------------------------------------------------

    def user(self, name: str) -> DbUser:
        for user in self.users:
            if user.name == name:
                return user
        if name == self.superuser:
            return DbUser(name, self.superuser_password)
        raise KeyError(name)

    def sql(self, statement: str, database: str | None = None) -> str:
        """Run SQL as root via the ``mariadb`` client over the unix socket.

        Returns rows in batch format (tab-separated, one row a line, no column
        names), without a trailing newline.
        """
        args = [f"--defaults-file={self.client_cnf}", "--batch", "--skip-column-names"]
        if database is not None:
            args.append(f"--database={database}")
        return self._client([*args, "-e", statement]).rstrip("\n")

    def flush_hosts(self) -> None:
        """Unblock hosts blocked by ``max_connect_errors`` (errno 1129)."""
        self.sql("FLUSH HOSTS")

    def connection_count(self, user: str | None = None) -> int:
        where = "ID <> CONNECTION_ID() AND COMMAND <> 'Daemon'"
        if user is not None:
            where += f" AND USER = {quote_string(user)}"
        return int(self.sql(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE {where}"))

    # -- lifecycle implementation ----------------------------------------------------

    def _client(self, args: Sequence[str]) -> str:
        return run_checked(
            [self.client, *args],
            run_as=self.run_as,
            env=self.run_as.env(),
            cwd=self.base_dir,
            timeout=60,
        )

    def _tuning_args(self) -> list[str]:
        return [
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-flush-log-at-trx-commit=2",  # survives kill(), not an OS crash
            "--innodb-doublewrite=0",
            "--innodb-use-native-aio=0",
            "--innodb-flush-method=fsync",  # tmpfs has no O_DIRECT
            "--skip-log-bin",
            "--performance-schema=OFF",
        ]

    def _install_db(self, target: Path) -> None:
        run_checked(
            [
                self.install_db,
                "--no-defaults",
                f"--datadir={target}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                f"--tmpdir={target.parent}",
                *self._tuning_args(),
            ],
            run_as=self.run_as,
            env=self.run_as.env(),
            cwd=target.parent,
            timeout=120,
        )

    def _initialize(self) -> None:
        base = self.base_dir
        (base / "tmp").mkdir(mode=0o700)
        self.run_as.chown(base / "tmp")
        data_dir_from_template(
            (self.mariadbd, self.install_db),
            self.kind,
            self.run_as,
            self.data_dir,
            self._install_db,
        )
        if self.tls is not None:
            self.tls_files = self.tls.write(base / "tls", self.run_as)
        self.run_as.write_file(
            self.client_cnf,
            "[client]\n"
            "user=root\n"
            f"password={self.superuser_password}\n"
            f"socket={self.socket_path}\n"
            "default-character-set=utf8mb4\n",
        )

    def _command(self) -> list[str]:
        base = self.base_dir
        args = [
            self.mariadbd,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--socket={self.socket_path}",
            f"--port={self.port}",
            f"--bind-address={','.join(self.listen_hosts)}",
            f"--pid-file={base / 'mariadbd.pid'}",
            f"--tmpdir={base / 'tmp'}",
            f"--secure-file-priv={base / 'tmp'}",
            "--skip-name-resolve",
            "--skip-symbolic-links",
            "--character-set-server=utf8mb4",
            f"--max-connections={self.max_connections}",
            f"--max-connect-errors={self.max_connect_errors}",
            *self._tuning_args(),
        ]
        if self.tls_files is not None:
            args += [
                f"--ssl-cert={self.tls_files.cert_path}",
                f"--ssl-key={self.tls_files.key_path}",
                f"--ssl-ca={self.tls_files.ca_path}",
            ]
        if self.require_secure_transport:
            args.append("--require-secure-transport=ON")
        args += self.extra_args
        return args

    def _ready(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return b"ready for connections" in f.read()
        except OSError:
            return False

    def _bootstrap(self) -> None:
        pw = native_password_hash(self.superuser_password)
        # install-db creates root@<other hosts> without a password and anonymous accounts
        # (''@localhost, which would let any user name in): drop them all.
        extra_accounts = self._client(
            [
                "--no-defaults",
                "--user=root",
                f"--socket={self.socket_path}",
                "--batch",
                "--skip-column-names",
                "-e",
                "SELECT User, Host FROM mysql.user "
                "WHERE (User = 'root' AND Host <> 'localhost') OR User = ''",
            ]
        ).splitlines()
        stmts = []
        for line in extra_accounts:
            name, _, host = line.partition("\t")
            stmts.append(f"DROP USER {quote_string(name)}@{quote_string(host)}")
        stmts.append(
            f"ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING '{pw}'"
        )
        stmts.append(f"CREATE USER 'root'@'127.0.0.1' IDENTIFIED BY PASSWORD '{pw}'")
        stmts.append("GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION")
        stmts += [f"CREATE DATABASE {quote_ident(db)}" for db in self.databases]
        for user in self.users:
            lock = "" if user.login else " ACCOUNT LOCK"
            for host in self.account_hosts:
                account = f"{quote_string(user.name)}@{quote_string(host)}"
                stmts.append(
                    f"CREATE USER {account} IDENTIFIED VIA mysql_native_password "
                    f"USING '{native_password_hash(user.password)}'{lock}"
                )
                stmts += [
                    f"GRANT ALL PRIVILEGES ON {quote_ident(db)}.* TO {account}"
                    for db in self.databases
                    if user.may_use(db)
                ]
        self._client(
            [
                "--no-defaults",
                "--user=root",
                f"--socket={self.socket_path}",
                "--default-character-set=utf8mb4",
                "-e",
                ";\n".join(stmts),
            ]
        )
