"""Smoke test of the benchmark harness (issue 6): `python -m benchmarks --smoke`, in-process.

It asserts only that every scenario and every reference ran and produced sane
numbers (present, positive, finite). No timing assertion: figures on a shared
2-core machine are the harness's business, not the tests'.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

# `benchmarks/` sits beside `probe/` but is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness

pytestmark = pytest.mark.skipif(
    shutil.which("pgbench") is None
    or (shutil.which("mariadbd") is None and not Path("/usr/sbin/mariadbd").exists()),
    reason="the benchmark needs pgbench and mariadbd",
)


def _positive(result: dict[str, Any], key: str) -> bool:
    value = result.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    document = harness.main(["--smoke", "--json", str(path)])
    assert json.loads(path.read_text())["meta"]["mode"] == "smoke"
    return document


@pytest.mark.timeout(300)
def test_every_scenario_and_reference_ran(smoke: dict[str, Any]) -> None:
    rows = {r["name"]: r for r in smoke["results"]}
    scale = harness.SCALES["smoke"]
    expected = []
    for engine in harness.ENGINES:
        for c in scale.concurrencies:
            refs = ["engine", "bare", "pool"] + ([] if engine == "mongodb" else ["native"])
            expected += [f"live/{engine}/c{c}/{ref}" for ref in refs]
    biggest = max(n for n, _ in scale.dead)
    for target in ("blackhole", "silent"):
        expected += [f"dead/{target}/{e}/n{n}" for n, _ in scale.dead for e in harness.ENGINES
                     if n < biggest or e in scale.dead_engines_big]
        expected += [f"dead/{target}/postgresql/n{n}" for n, _ in scale.dead_pg_only]
    expected += ["mixed", "dedupe"] + [f"overhead/n{n}" for n in scale.overhead_n]
    assert sorted(expected) == sorted(rows)
    errors = {name: r["error"] for name, r in rows.items() if r["error"]}
    assert not errors


@pytest.mark.timeout(300)
def test_figures_are_sane(smoke: dict[str, Any]) -> None:
    for r in smoke["results"]:
        for key in ("rate", "wall_s", "cpu_s_per_probe", "peak_rss_mb"):
            assert _positive(r, key), (r["name"], key, r.get(key))
        assert r["probes"] == r["endpoints"] or r["scenario"] == "live"
        # pgbench and the mariadb-slap fallback (no libmariadb-dev to build the C
        # client) time whole runs, not connections
        if r["scenario"] == "live" and r["client"] not in ("pgbench -C",
                                                          "mariadb-slap --detach=1"):
            assert _positive(r, "p50_ms") and _positive(r, "p99_ms"), r["name"]
            assert r["p99_ms"] >= r["p50_ms"]
        if r["scenario"].startswith("dead"):
            assert r["ok"] == 0  # nothing answers there
            assert _positive(r, "p50_ms") and _positive(r, "ideal_wall_s")
        if r["scenario"] == "overhead":
            assert _positive(r, "us_per_endpoint") and _positive(r, "bytes_per_endpoint")
            assert r["ok"] == r["endpoints"]
        if r["scenario"] == "dedupe":
            assert 0 < r["probes_started"] < r["endpoints"]
            assert r["in_order"]


@pytest.mark.timeout(300)
def test_engine_rows_carry_ratios_and_live_probes_succeed(smoke: dict[str, Any]) -> None:
    for r in smoke["results"]:
        if r["scenario"] == "live" and r["client"] == "probe engine":
            assert r["ok"] == r["probes"], (r["name"], r.get("codes"))
            refs = ("bare", "pool") + (() if r["engine"] == "mongodb" else ("native",))
            for ref in refs:
                assert _positive(r, f"vs_{ref}"), (r["name"], ref)
    assert smoke["targets"] and all("met" in t for t in smoke["targets"])
    assert "| scenario |" in smoke["table"]
    assert smoke["meta"]["loop"]
