"""`probe demo`: the main job on embedded defaults.

Starts throwaway servers on loopback (PostgreSQL and MariaDB from this
machine's binaries, the MongoDB wire-protocol server as a single host and as a
3-member replica set, TLS-enabled variants of each, and fault servers), writes
a mixed batch for them, probes it and prints one row per job. Nothing leaves
127.0.0.1; everything is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from probe.runner import Prober


def _tls_fields(ca_pem: bytes, name: str = "ca.pem") -> dict[str, Any]:
    return {
        "ssl_link": True,
        "ssl_cert_key": b64encode(ca_pem).decode("ascii"),
        "ssl_cert_name": name,
        "ssl_cert_check_sum": hashlib.sha256(ca_pem).hexdigest(),
    }


@contextlib.contextmanager
def demo_servers() -> Iterator[dict[str, Any]]:
    """Every server the demo batch points at, started together and stopped on every path."""
    from probe.testing import mariadb, postgres
    from probe.testing.certs import TestPKI
    from probe.testing.faults import Blackhole, FaultServer, RefusedPort
    from probe.testing.mongo_wire import MongoReplicaSet, MongoUser, MongoWireServer

    pki = TestPKI()
    mongo_user = MongoUser("demo", "dém0 p@ss:w/rd%41")
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        servers: dict[str, Any] = {
            "pki": pki,
            "mongo_user": mongo_user,
            "pg": enter(postgres.PostgresServer()),
            "pg_tls": enter(postgres.PostgresServer(tls=pki.server_tls(), ssl_only=True)),
            "maria": enter(mariadb.MariaDBServer()),
            "maria_tls": enter(mariadb.MariaDBServer(tls=pki.server_tls(),
                                                     require_secure_transport=True)),
            "mongo": enter(MongoWireServer(users=[mongo_user]).run_in_thread()),
            "mongo_tls": enter(MongoWireServer(
                users=[mongo_user], ssl_context=pki.server_tls().server_context()
            ).run_in_thread()),
            "mongo_rs": enter(MongoReplicaSet(3, users=[mongo_user]).run_in_thread()),
            "refused": enter(RefusedPort()),
            "blackhole": enter(Blackhole()),
            "silent": enter(FaultServer("silent")),
        }
        yield servers


def demo_batch(s: dict[str, Any]) -> dict[str, Any]:
    """The mixed batch: good credentials, wrong password, missing database, refused,
    blackhole, silent server, TLS good and TLS with the wrong CA, for every engine."""
    from probe.testing import mariadb, postgres

    pg_user, my_user, mongo_user = postgres.SCRAM_USER, mariadb.NATIVE_USER, s["mongo_user"]
    ca = s["pki"].ca_pem()
    wrong_ca = s["pki"].ca_pem("other")
    jobs: list[dict[str, Any]] = []

    def add(name: str, db_type: str, ip: str, port: int, user: str, password: str,
            **extra: Any) -> None:
        jobs.append({
            "id": name, "net_type": "eip", "db_type": db_type, "ip": ip,
            "db_port": port, "db_user": user, "db_password": password,
            "end_point_type": "so" if len(jobs) % 2 == 0 else "ta", **extra,
        })

    for db_type, key, user, database in (
        ("postgresql", "pg", pg_user, "appdb"),
        ("mysql", "maria", my_user, "appdb"),
    ):
        port = s[key].port
        tls_port = s[key + "_tls"].port
        add(f"{db_type}-ok", db_type, "127.0.0.1", port, user.name, user.password,
            db_name=database)
        add(f"{db_type}-wrong-password", db_type, "127.0.0.1", port, user.name, "not-it")
        add(f"{db_type}-missing-db", db_type, "127.0.0.1", port, user.name, user.password,
            db_name="no_such_db")
        add(f"{db_type}-tls-ok", db_type, "127.0.0.1", tls_port, user.name, user.password,
            db_name=database, **_tls_fields(ca))
        add(f"{db_type}-tls-wrong-ca", db_type, "127.0.0.1", tls_port, user.name,
            user.password, db_name=database, **_tls_fields(wrong_ca))
        add(f"{db_type}-refused", db_type, "127.0.0.1", s["refused"].port, "u", "p")
        add(f"{db_type}-blackhole", db_type, "127.0.0.1", s["blackhole"].port, "u", "p")
        add(f"{db_type}-silent", db_type, "127.0.0.1", s["silent"].port, "u", "p")
    for name, ip, password, extra in (
        ("mongodb-ok", s["mongo"].address, mongo_user.password, {}),
        ("mongodb-replica-set", s["mongo_rs"].seed_list, mongo_user.password, {}),
        ("mongodb-wrong-password", s["mongo"].address, "not-it", {}),
        ("mongodb-tls-ok", s["mongo_tls"].address, mongo_user.password, _tls_fields(ca)),
        ("mongodb-tls-wrong-ca", s["mongo_tls"].address, mongo_user.password,
         _tls_fields(wrong_ca)),
        ("mongodb-refused", f"127.0.0.1:{s['refused'].port}", "p", {}),
    ):
        add(name, "mongodb", ip, 0, mongo_user.name, password, **extra)
    return {"jobs": jobs}


def command_demo(args: argparse.Namespace) -> int:
    from probe.cli import InputError, print_response, run_with_progress, settings_from

    # Short timeouts so the dead endpoints do not make the demo slow; flags win.
    args.timeout = args.timeout or 3.0
    args.connect_timeout = args.connect_timeout or 2.0
    try:
        settings = settings_from(args)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    print("starting local servers (PostgreSQL, MariaDB, MongoDB wire, faults) ...",
          file=sys.stderr)
    started = time.monotonic()
    with demo_servers() as servers:
        body = demo_batch(servers)
        if args.keep:
            path = Path(args.keep) / "batch.json"
            path.write_text(json.dumps(body, indent=2, ensure_ascii=False), encoding="utf-8")
            print(f"batch written to {path} (it holds the demo's throwaway passwords)",
                  file=sys.stderr)
        print(f"servers up in {time.monotonic() - started:.1f} s; probing "
              f"{len(body['jobs'])} endpoints ...", file=sys.stderr)
        prober = Prober(settings)
        response = run_with_progress(prober, body, detail=True)
    print_response(response, args.format, body)
    return 0
