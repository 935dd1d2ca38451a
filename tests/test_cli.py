"""The `probe` command as a user runs it: a real process, real servers."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from probe.testing import mariadb as m
from probe.testing import postgres as p
from probe.testing.mariadb import MariaDBServer
from probe.testing.postgres import PostgresServer
from tests.conftest import Faults, job

PROBE = [sys.executable, "-m", "probe.cli", "run"]


def run(
    args: list[str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROBE, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


def write(tmp_path: Path, body: Any) -> str:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    return str(path)


def test_200_mixed_endpoints_in_about_one_timeout(
    tmp_path: Path, pg: PostgresServer, maria: MariaDBServer, faults: Faults
) -> None:
    jobs = []
    for i in range(200):
        kind = i % 4
        if kind == 0:
            body = (job("postgresql", pg.port, p.SCRAM_USER.name, p.SCRAM_USER.password)
                    if i % 8 == 0 else job("mysql", maria.port, m.NATIVE_USER.name,
                                           m.NATIVE_USER.password))
        elif kind == 1:
            body = job("mysql", maria.port, m.NATIVE_USER.name, f"wrong-{i}")
        elif kind == 2:
            body = job("postgresql", faults.refused.port, f"user{i}", "p")
        else:
            body = job("mysql", faults.blackhole.port, f"user{i}", "p")
        jobs.append({**body, "id": f"job-{i:03d}"})
    started = time.monotonic()
    done = run([write(tmp_path, {"jobs": jobs}), "--timeout", "2", "--connect-timeout", "1",
                "--per-host", "256", "--detail"])
    wall = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["count"] == 200
    assert [r["id"] for r in out["results"]] == [f"job-{i:03d}" for i in range(200)]
    by_kind: dict[int, set[str | None]] = {0: set(), 1: set(), 2: set(), 3: set()}
    for i, result in enumerate(out["results"]):
        by_kind[i % 4].add(result.get("error_code"))
        if i % 4 == 3:
            # the 1 s connect timeout: never before it, and about it (a loaded CI box is slow)
            assert 900 <= result["elapsed_ms"] < 3000, result
    assert by_kind == {0: {None}, 1: {"DRS.C10030"}, 2: {"DRS.C10012"}, 3: {"DRS.C10013"}}
    assert wall < 10  # about one timeout (plus interpreter start), not the sum of them
    assert "Traceback" not in done.stderr


def test_exit_codes_and_formats(tmp_path: Path, faults: Faults, pg: PostgresServer) -> None:
    good = job("postgresql", pg.port, p.SCRAM_USER.name, p.SCRAM_USER.password)
    ok = run([write(tmp_path, {"jobs": [good]})])
    assert ok.returncode == 0 and json.loads(ok.stdout)["results"][0]["success"] is True

    refused = job("mysql", faults.refused.port, "u", "p")
    table = run(["-", "--format", "table", "--lang", "zh-cn"],
                stdin=json.dumps({"jobs": [refused]}))
    assert table.returncode == 1
    assert "DRS.C10012" in table.stdout and "拒绝" in table.stdout

    partial = run(["-"], stdin=json.dumps({"jobs": [refused, {"id": "x", "db_type": "db2"}]}))
    assert partial.returncode == 1
    assert [r["error_code"] for r in json.loads(partial.stdout)["results"]] == [
        "DRS.C10012", "DRS.M00201"]

    strict = run(["-", "--strict"], stdin=json.dumps({"jobs": [refused, {"id": "x"}]}))
    assert strict.returncode == 2 and strict.stdout == ""
    assert strict.stderr.startswith("probe: DRS.M00201") and "jobs[1]" in strict.stderr


def test_bad_input_is_one_line_never_a_traceback(tmp_path: Path) -> None:
    one = json.dumps({"jobs": [job("mysql", 1, "u", "p")]})
    cases = [
        (["/no/such/file.json"], None, "cannot read"),
        (["-"], "{not json", "DRS.M00200"),
        (["-"], " \n", "is empty"),
        (["-"], "[]", "DRS.M00200"),
        (["-"], "[1, 2]", "expected a JSON object"),
        (["-"], '{"jobs": []}', "DRS.M00201"),
        (["-"], '{"jobs": [{"id": "x", "db_port": ' + "9" * 5000 + "}]}", "DRS.M00200"),
        (["-"], '{"jobs": [{"id": "x", "db_port": NaN}]}', "DRS.M00200"),
        (["-"], b"\xff\xfe not UTF-8", "DRS.M00200"),
        (["-", "--timeout", "-1"], one, "positive"),
        (["-", "--timeout", "nan"], one, "positive"),
        (["-", "--batch-timeout", "inf"], one, "positive"),
        (["-", "--timeout", "1e308"], one, "a day"),
        (["-", "--concurrency", "many"], one, "not a number"),
    ]
    for args, stdin, says in cases:
        done = subprocess.run([*PROBE, *args], input=stdin if isinstance(stdin, bytes) else
                              (stdin or "").encode(), capture_output=True, timeout=60)
        stderr = done.stderr.decode()
        assert done.returncode == 2, (args, stderr)
        assert "Traceback" not in stderr and says in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) <= 2, stderr


def test_a_byte_order_mark_is_fine(tmp_path: Path, faults: Faults) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"jobs": [job("mysql", faults.refused.port,
                                                                 "u", "p")]}).encode())
    done = run([str(path)])
    assert done.returncode == 1 and json.loads(done.stdout)["count"] == 1, done.stderr


def test_strict_speaks_the_requested_language() -> None:
    body = json.dumps({"jobs": [{**job("mysql", 1, "u", "p"), "db_type": "db2"}]})
    done = run(["-", "--strict", "--lang", "zh-cn"], stdin=body)
    assert done.returncode == 2 and "参数" in done.stderr, done.stderr


def test_a_reader_that_leaves_early_is_no_error(tmp_path: Path, faults: Faults) -> None:
    # ~400 KB of answers, far more than a pipe holds: the write must hit the closed pipe
    jobs = [job("mysql", faults.refused.port, f"u{i}", "p", id=f"j{i}") for i in range(2000)]
    pipeline = subprocess.run(
        ["bash", "-c", "set -o pipefail; \"$@\" | head -c 10", "-", *PROBE,
         write(tmp_path, {"jobs": jobs})],
        capture_output=True, text=True, timeout=120)
    assert len(pipeline.stdout) == 10
    assert pipeline.returncode == 141, pipeline.stderr  # probe's, as a shell reports SIGPIPE
    assert "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr


def test_table_shows_each_endpoint_with_its_port(tmp_path: Path, faults: Faults) -> None:
    jobs = [{**job("mysql", faults.refused.port, "u", "p", id="given")},
            {**job("postgresql", 5432, "u", "p", id="default"), "ip": "::1"},
            {"id": "invalid", "db_type": "db2", "ip": "Canary-Pw-7731"}]
    jobs[1].pop("db_port")
    done = run([write(tmp_path, {"jobs": jobs}), "--format", "table", "--timeout", "2"])
    out = done.stdout
    assert f"127.0.0.1:{faults.refused.port}" in out and "[::1]:5432" in out, out
    assert "Canary-Pw-7731" not in out  # an invalid job's fields are never shown
    header = next(line for line in out.splitlines() if "db_type" in line)
    assert " ms " not in header and " code " in header  # no timings without --detail


def test_tasks_file_applies_the_task_rules_before_any_traffic(
    tmp_path: Path, faults: Faults
) -> None:
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({
        "task-ok": "CONFIGURATION",
        "task-running": "FULL_TRANSFER_STARTED",
        "task-parent": {"status": "CONFIGURATION", "role": "parent"},
        "task-fwd": {"status": "INCRE_TRANSFER_STARTED", "role": "forward"},
        "task-fwd-early": {"status": "FULL_TRANSFER_STARTED", "role": "forward"},
        "task-back-ok": {"status": "CONFIGURATION", "role": "backward",
                         "forward_task_id": "task-fwd"},
        "task-back-early": {"status": "CONFIGURATION", "role": "backward",
                            "forward_task_id": "task-fwd-early"},
    }), encoding="utf-8")
    ids = ["task-ok", "task-unknown", "task-running", "task-parent", "task-back-ok",
           "task-back-early"]
    # A refused port: a job the rules let through is probed (C10012), one they stop is not.
    jobs = [job("mysql", faults.refused.port, "u", "p", id=i) for i in ids]
    done = run([write(tmp_path, {"jobs": jobs}), "--tasks-file", str(tasks)])
    assert done.returncode == 1, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [r["id"] for r in results] == ids
    assert [r["error_code"] for r in results] == [
        "DRS.C10012", "DRS.10000010", "DRS.C10050", "DRS.C10052", "DRS.C10012", "DRS.C10051"]
    assert "FULL_TRANSFER_STARTED" in results[5]["error_msg"]

    tasks.write_text('{"task-x": {"status": "CONFIGURATION", "role": "backward"}}')
    broken = run([write(tmp_path, {"jobs": jobs}), "--tasks-file", str(tasks)])
    assert broken.returncode == 2 and "forward_task_id" in broken.stderr
    assert "Traceback" not in broken.stderr and len(broken.stderr.strip().splitlines()) == 1


def test_progress_bar_on_a_terminal_and_json_still_on_stdout(
    tmp_path: Path, faults: Faults
) -> None:
    jobs = [job("mysql", faults.refused.port, f"u{i}", "p", id=f"j{i}") for i in range(20)]
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([*PROBE, write(tmp_path, {"jobs": jobs})], stdout=subprocess.PIPE,
                                stderr=terminal, text=True)
        os.close(terminal)
        out, _ = proc.communicate(timeout=60)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 1
    assert [r["id"] for r in json.loads(out)["results"]] == [f"j{i}" for i in range(20)]
    assert b"probing" in seen and b"20/20" in seen, seen[-400:]


def test_run_takes_the_network_policy_from_flags_and_environment(
    tmp_path: Path, faults: Faults
) -> None:
    batch = write(tmp_path, {"jobs": [job("mysql", faults.refused.port, "u", "p")]})
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROBE_")}

    def code(argv: list[str], **env: str) -> tuple[int, str]:
        done = subprocess.run([*PROBE, batch, *argv], capture_output=True, text=True,
                              timeout=60, env={**base, **env})
        if done.returncode == 2:
            return 2, done.stderr
        return done.returncode, json.loads(done.stdout)["results"][0]["error_code"]

    denied, refused = "DRS.C10017", "DRS.C10012"
    assert code([]) == (1, refused)
    assert code(["--deny-cidr", "127.0.0.0/8"]) == (1, denied)
    assert code([], PROBE_ALLOW_PORTS="5432,3306") == (1, denied)
    assert code(["--allow-ports", str(faults.refused.port)], PROBE_ALLOW_PORTS="5432") == (
        1, refused)  # the flag replaces its variable
    assert code([], PROBE_ALLOW_CIDR="10.0.0.0/8") == (1, denied)
    status, stderr = code(["--allow-cidr", "10.0.0.0/33"])
    assert status == 2 and "10.0.0.0/33" in stderr and len(stderr.strip().splitlines()) == 1
    status, stderr = code([], PROBE_ALLOW_PORTS="mysql")
    assert status == 2 and "PROBE_ALLOW_PORTS" in stderr and "Traceback" not in stderr
