"""`probe demo`, the quick start's first command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from probe.testing import mariadb, postgres

# What each job of the demo batch must answer (the demo's whole point).
EXPECTED = {
    **{f"{engine}-{case}": code for engine in ("postgresql", "mysql") for case, code in (
        ("ok", None), ("wrong-password", "DRS.C10030"), ("tls-ok", None),
        ("tls-wrong-ca", "DRS.C10023"), ("refused", "DRS.C10012"),
        ("blackhole", "DRS.C10013"), ("silent", "DRS.C10015"),
    )},
    "postgresql-missing-db": "DRS.C10032",
    # MySQL answers an account without rights on a database that does not exist
    # with "access denied to database": it does not tell (the message says both).
    "mysql-missing-db": "DRS.C10033",
    "mongodb-ok": None,
    "mongodb-replica-set": None,
    "mongodb-wrong-password": "DRS.C10030",
    "mongodb-tls-ok": None,
    "mongodb-tls-wrong-ca": "DRS.C10023",
    "mongodb-refused": "DRS.C10012",
}


def test_demo_probes_its_mixed_batch_with_the_expected_codes(tmp_path: Path) -> None:
    probe = Path(sys.executable).with_name("probe")  # the console script the install made
    command = [str(probe)] if probe.exists() else [sys.executable, "-m", "probe.cli"]
    done = subprocess.run([*command, "demo", "--format", "json", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert {r["id"]: r.get("error_code") for r in results} == EXPECTED
    # Detail is on in the demo: the successes show what was reached.
    tls_ok = next(r for r in results if r["id"] == "postgresql-tls-ok")
    assert tls_ok["tls"]["version"].startswith("TLSv1.") and tls_ok["server_version"]
    missing = next(r for r in results if r["id"] == "mysql-missing-db")
    assert "no_such_db" in missing["error_msg"] and "no such database" in missing["error_msg"]
    replica_set = next(r for r in results if r["id"] == "mongodb-replica-set")
    assert len(replica_set["replica_set"]["members"]) == 3
    # The batch it wrote holds the passwords; what it printed holds none of them.
    batch = json.loads((tmp_path / "batch.json").read_text(encoding="utf-8"))
    passwords = {job["db_password"] for job in batch["jobs"]} - {"p"}
    assert passwords >= {postgres.SCRAM_USER.password, mariadb.NATIVE_USER.password, "not-it"}
    for password in passwords:
        assert password not in done.stdout and password not in done.stderr, password
