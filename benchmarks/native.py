"""Native references: the servers' own connection rate seen by C clients.

- PostgreSQL: ``pgbench -n -C -f select1.sql -c C -j C -t N/C`` (one thread per
  client: pgbench connects synchronously, so fewer threads than clients would
  lower the concurrency of connecting);
- MariaDB: `mariadb_connect.c` on libmariadb (built here with gcc and
  ``mariadb_config``), C threads each looping connect + SELECT 1 + close;
  when it cannot be built, ``mariadb-slap --detach=1`` stands in.

CPU time and peak RSS of the client come from ``wait4()``'s rusage.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serve import user_name

SOURCE = Path(__file__).with_name("mariadb_connect.c")


def _run(cmd: list[str], env: dict[str, str] | None = None,
         timeout: float = 600) -> tuple[str, float, float, float]:
    """Run `cmd`; its stdout, wall seconds, CPU seconds and peak RSS (MB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {errors[-800:]}")
    return text, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def pgbench(endpoints: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    binary = shutil.which("pgbench")
    if binary is None:
        raise RuntimeError("pgbench not found")
    per_client = max(1, math.ceil(n / concurrency))
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        script = Path(tmp) / "select1.sql"
        script.write_text("SELECT 1;\n")
        env = {**os.environ, "PGPASSWORD": endpoints["password"], "PGSSLMODE": "disable",
               "PGCONNECT_TIMEOUT": "10"}
        cmd = [binary, "-n", "-C", "-f", str(script), "-c", str(concurrency),
               "-j", str(concurrency), "-t", str(per_client), "-h", endpoints["host"],
               "-p", str(endpoints["postgresql"]), "-U", user_name(0), "postgres"]
        text, wall, cpu, rss = _run(cmd, env)
    match = re.search(r"tps = ([0-9.]+) \(including reconnection times\)", text) or re.search(
        r"tps = ([0-9.]+)", text)
    total = per_client * concurrency
    failed = re.search(r"number of failed transactions: (\d+)", text)
    conn_ms = re.search(r"average connection time = ([0-9.]+) ms", text)
    lat_ms = re.search(r"latency average = ([0-9.]+) ms", text)
    rate = float(match.group(1)) if match else total / wall
    return {
        "probes": total,
        "wall_s": total / rate,
        "process_wall_s": wall,
        "rate": rate,
        "p50_ms": math.nan,
        "p99_ms": math.nan,
        "mean_connect_ms": float(conn_ms.group(1)) if conn_ms else math.nan,
        "mean_latency_ms": float(lat_ms.group(1)) if lat_ms else math.nan,
        "cpu_s": cpu,
        "cpu_s_per_probe": cpu / total,
        "peak_rss_mb": rss,
        "ok": total - (int(failed.group(1)) if failed else 0),
        "tool": "pgbench -C",
        "command": " ".join([*cmd[:-7], "-h", "HOST", "-p", "PORT", "-U", "USER", "postgres"]),
    }


_built: dict[str, str] = {}


def build_c_client() -> str | None:
    """Compile `mariadb_connect.c` once per run; None when gcc or libmariadb is missing."""
    if "path" in _built:
        return _built["path"] or None
    gcc, config = shutil.which("gcc") or shutil.which("cc"), shutil.which("mariadb_config")
    path = ""
    if gcc and config:
        flags = subprocess.run([config, "--cflags", "--libs"], capture_output=True, text=True)
        if flags.returncode == 0:
            out = Path(tempfile.mkdtemp(prefix="probe-bench-cc-")) / "mariadb_connect"
            build = subprocess.run(
                [gcc, "-O2", "-o", str(out), str(SOURCE), *flags.stdout.split(), "-lpthread"],
                capture_output=True, text=True)
            if build.returncode == 0:
                path = str(out)
    _built["path"] = path
    return path or None


def mariadb_c(endpoints: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    binary = build_c_client()
    if binary is None:
        return mariadb_slap(endpoints, n, concurrency)
    cmd = [binary, endpoints["host"], str(endpoints["mysql"]), "bench_", str(endpoints["users"]),
           endpoints["password"], str(n), str(concurrency)]
    text, wall, cpu, rss = _run(cmd)
    ok, _failed, inner_wall, p50, p99 = text.split()
    rate = n / float(inner_wall)
    return {
        "probes": n,
        "wall_s": float(inner_wall),
        "process_wall_s": wall,
        "rate": rate,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "cpu_s": cpu,
        "cpu_s_per_probe": cpu / n,
        "peak_rss_mb": rss,
        "ok": int(ok),
        "tool": "C client (libmariadb)",
        "command": "mariadb_connect HOST PORT bench_ USERS PASSWORD N C",
    }


def mariadb_slap(endpoints: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    binary = shutil.which("mariadb-slap") or shutil.which("mysqlslap")
    if binary is None:
        raise RuntimeError("neither gcc+libmariadb-dev nor mariadb-slap is available")
    cmd = [binary, "--no-defaults", f"--host={endpoints['host']}",
           f"--port={endpoints['mysql']}", "--protocol=tcp", f"--user={user_name(0)}",
           f"--password={endpoints['password']}", f"--concurrency={concurrency}",
           f"--number-of-queries={n}", "--detach=1", "--query=SELECT 1", "--iterations=1"]
    text, wall, cpu, rss = _run(cmd)
    match = re.search(r"Average number of seconds to run all queries: ([0-9.]+)", text)
    seconds = float(match.group(1)) if match else wall
    return {
        "probes": n,
        "wall_s": seconds,
        "process_wall_s": wall,
        "rate": n / seconds,
        "p50_ms": math.nan,
        "p99_ms": math.nan,
        "cpu_s": cpu,
        "cpu_s_per_probe": cpu / n,
        "peak_rss_mb": rss,
        "ok": n,
        "tool": "mariadb-slap --detach=1",
        "command": "mariadb-slap --concurrency=C --number-of-queries=N --detach=1 "
                   "--query='SELECT 1'",
    }
