"""``python -m benchmarks``: the plan, the runs, the table, the targets.

    python -m benchmarks                 # full run, about ten minutes
    python -m benchmarks --quick         # about a minute
    python -m benchmarks --smoke         # the smallest run that still covers every scenario
    python -m benchmarks --json out.json --only 'live/mysql' --profile prof/

Every measurement runs in its own Python process (`benchmarks.worker`);
native clients run as child processes; the servers run once for the whole run
(`benchmarks.servers`). Ratios printed are probes/s of the engine over probes/s
of the reference at the same concurrency, on the same servers, in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import native
from benchmarks.serve import raise_nofile
from benchmarks.servers import Fleet

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("mysql", "postgresql", "mongodb")
LABELS = {"mysql": "MariaDB", "postgresql": "PostgreSQL", "mongodb": "Mongo wire"}
BARE = {"mysql": "bare aiomysql", "postgresql": "bare asyncpg", "mongodb": "bare AsyncMongoClient"}
POOL = {"mysql": "PyMySQL", "postgresql": "psycopg", "mongodb": "PyMongo"}


@dataclass(frozen=True)
class Scale:
    """How big each scenario is in one mode."""

    live_n: dict[str, int]  # probes per live measurement, per engine
    concurrencies: tuple[int, ...]
    dead: tuple[tuple[int, int], ...]  # (endpoints, concurrency) for every engine
    dead_pg_only: tuple[tuple[int, int], ...]  # the big one, PostgreSQL only (quick/smoke)
    mixed_n: int
    overhead_n: tuple[int, ...]
    dedupe: tuple[int, int]  # (jobs, distinct endpoints)
    users: int
    mongo_users: int
    rounds: dict[str, int] = field(default_factory=dict)  # repetitions at the top concurrency
    dead_engines_big: tuple[str, ...] = ENGINES  # engines of the biggest dead-endpoint runs


SCALES = {
    "full": Scale(
        live_n={"mysql": 5000, "postgresql": 2000, "mongodb": 2000},
        concurrencies=(1, 8, 32),
        dead=((1000, 1000), (10_000, 1000)),
        dead_pg_only=(),
        mixed_n=5000,
        overhead_n=(10_000, 100_000),
        dedupe=(1000, 100),
        users=5000,
        mongo_users=2000,
        rounds={"mysql": 3, "postgresql": 3, "mongodb": 3},
        # MongoDB's dead endpoints cost ~4 ms of CPU each (PyMongo builds a client per
        # probe): 10,000 of them take ~40 s; its 1,000-endpoint runs show the same.
        dead_engines_big=("postgresql", "mysql"),
    ),
    "quick": Scale(
        live_n={"mysql": 600, "postgresql": 200, "mongodb": 200},
        concurrencies=(1, 8, 32),
        dead=((1000, 1000),),
        dead_pg_only=((2000, 1000),),
        mixed_n=1000,
        overhead_n=(10_000,),
        dedupe=(1000, 100),
        users=1000,
        mongo_users=400,
    ),
    "smoke": Scale(
        live_n={"mysql": 64, "postgresql": 40, "mongodb": 40},
        concurrencies=(1, 8, 32),
        dead=((200, 200),),
        dead_pg_only=((400, 200),),
        mixed_n=200,
        overhead_n=(2000,),
        dedupe=(100, 10),
        users=200,
        mongo_users=64,
    ),
}

DEAD_DEADLINE = 1.0
MIXED = {"concurrency": 256, "deadline": 3.0}


@dataclass
class Measurement:
    name: str  # unique, e.g. "live/mysql/c32/engine"
    scenario: str
    engine: str
    client: str
    endpoints: int
    concurrency: int
    spec: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------- plan


def plan(scale: Scale, fleet_endpoints: dict[str, Any], use_uvloop: bool) -> list[Measurement]:
    base = {"endpoints": fleet_endpoints, "uvloop": use_uvloop}
    out: list[Measurement] = []

    def add(name: str, scenario: str, engine: str, client: str, n: int, c: int,
            **spec: Any) -> None:
        out.append(Measurement(name, scenario, engine, client, n, c,
                               {**base, "n": n, "concurrency": c, "engine": engine, **spec}))

    for engine in ENGINES:
        n = scale.live_n[engine]
        top = max(scale.concurrencies)
        for c in scale.concurrencies:
            rounds = scale.rounds.get(engine, 1) if c == top else 1
            for r in range(rounds):
                suffix = f"/r{r + 1}" if rounds > 1 else ""
                # each round starts at another user, so no server cache favours one client
                offset = (r * 997) % 1000
                if engine != "mongodb":
                    add(f"live/{engine}/c{c}/native{suffix}", "live", engine,
                        "pgbench -C" if engine == "postgresql" else "C client", n, c,
                        kind="native")
                add(f"live/{engine}/c{c}/engine{suffix}", "live", engine, "probe engine", n, c,
                    kind="engine", user_offset=offset)
                add(f"live/{engine}/c{c}/bare{suffix}", "live", engine, BARE[engine], n, c,
                    kind="bare", user_offset=offset)
                add(f"live/{engine}/c{c}/pool{suffix}", "live", engine,
                    f"{POOL[engine]} ×{c} threads", n, c, kind="pool", user_offset=offset)

    silent_ports = list(fleet_endpoints["silent"])
    hole_ports = list(fleet_endpoints["blackholes"])
    for target in ("blackhole", "silent"):
        biggest = max(n for n, _ in scale.dead)
        runs = [(e, n, c) for n, c in scale.dead for e in ("postgresql", "mysql", "mongodb")
                if n < biggest or e in scale.dead_engines_big]
        runs += [("postgresql", n, c) for n, c in scale.dead_pg_only]
        for engine, n, c in runs:
            port = (hole_ports if target == "blackhole" else silent_ports).pop(0)
            add(f"dead/{target}/{engine}/n{n}", f"dead {target}", engine, "probe engine", n, c,
                kind="dead", target=target, port=port, deadline=DEAD_DEADLINE)

    add("mixed", "mixed", "all", "probe engine", scale.mixed_n, MIXED["concurrency"],
        kind="mixed", deadline=MIXED["deadline"])
    for n in scale.overhead_n:
        add(f"overhead/n{n}", "overhead", "instant", "probe engine", n, 256, kind="overhead")
    jobs, distinct = scale.dedupe
    add("dedupe", "dedupe", "mysql", "probe engine", jobs, 32, kind="dedupe", distinct=distinct)
    return out


def ports_needed(scale: Scale) -> tuple[int, int]:
    """(silent servers, blackholes) the plan uses."""
    biggest = max(n for n, _ in scale.dead)
    per_target = len(scale.dead_pg_only) + sum(
        len(ENGINES) if n < biggest else len(scale.dead_engines_big) for n, _ in scale.dead)
    return per_target, per_target + 3


# ---------------------------------------------------------------- running


def run_one(m: Measurement, profile_dir: Path | None, timeout: float = 900) -> None:
    """Run one measurement; the 1-minute load average before and after goes with it
    (other work on the machine shows there, and the figures are then less telling)."""
    load_before = os.getloadavg()[0]
    _run_one(m, profile_dir, timeout)
    if m.result:
        m.result["load_before"] = load_before
        m.result["load_after"] = os.getloadavg()[0]


def _run_one(m: Measurement, profile_dir: Path | None, timeout: float) -> None:
    spec = dict(m.spec)
    if spec["kind"] == "native":
        try:
            ep = spec["endpoints"]
            if m.engine == "postgresql":
                m.result = native.pgbench(ep, m.endpoints, m.concurrency)
            else:
                m.result = native.mariadb_c(ep, m.endpoints, m.concurrency)
            m.client = m.result["tool"]
        except Exception as exc:
            m.error = f"{type(exc).__name__}: {exc}"
        return
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        spec["profile"] = str(profile_dir / (m.name.replace("/", "_") + ".txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
        )
    except subprocess.TimeoutExpired:
        m.error = f"timed out after {timeout:.0f} s"
        return
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            m.result = json.loads(line.removeprefix("RESULT "))
            return
    m.error = f"worker exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"


# ---------------------------------------------------------------- figures


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def combine_rounds(measurements: list[Measurement]) -> list[Measurement]:
    """Rounds of one live measurement (…/r1, /r2, …) become one row: the median round by rate."""
    rows: dict[str, list[Measurement]] = {}
    for m in measurements:
        rows.setdefault(re.sub(r"/r\d+$", "", m.name), []).append(m)
    out = []
    for name, group in rows.items():
        done = [m for m in group if m.result]
        if len(group) == 1 or not done:
            single = group[0]
            out.append(Measurement(name, single.scenario, single.engine, single.client,
                                   single.endpoints, single.concurrency, single.spec,
                                   dict(single.result), single.error))
            continue
        done.sort(key=lambda m: _num(m.result.get("rate")))
        median = done[(len(done) - 1) // 2] if len(done) % 2 else done[len(done) // 2 - 1]
        chosen = Measurement(name, median.scenario, median.engine, median.client,
                             median.endpoints, median.concurrency, median.spec,
                             dict(median.result))
        chosen.result["rounds"] = [m.result.get("rate") for m in group]
        out.append(chosen)
    return out


def ratios(rows: list[Measurement], raw: list[Measurement]) -> None:
    """Engine rows get rate / reference rate for each reference of the same engine and C.

    With rounds, each round's engine rate is divided by the same round's reference
    rate (they ran back to back, under the same load) and the median ratio is kept.
    """
    rates = {m.name: _num(m.result.get("rate")) for m in raw if m.result}
    for m in rows:
        if m.scenario != "live" or not m.name.endswith("/engine") or not m.result:
            continue
        prefix = m.name.removesuffix("/engine")
        n_rounds = len(m.result.get("rounds") or []) or 1
        for ref in ("native", "bare", "pool"):
            if n_rounds == 1:
                pairs = [(rates.get(f"{prefix}/engine"), rates.get(f"{prefix}/{ref}"))]
            else:
                pairs = [(rates.get(f"{prefix}/engine/r{k}"), rates.get(f"{prefix}/{ref}/r{k}"))
                         for k in range(1, n_rounds + 1)]
            per_round = sorted(e / r for e, r in pairs
                               if e is not None and r is not None and r > 0 and not math.isnan(e))
            if per_round:
                m.result[f"vs_{ref}"] = per_round[len(per_round) // 2]
                m.result[f"vs_{ref}_rounds"] = per_round


def _fmt(value: Any, digits: int = 1) -> str:
    number = _num(value)
    if math.isnan(number):
        return "—"
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    return f"{number:.{digits}f}"


def notes(m: Measurement) -> str:
    r = m.result
    if m.error:
        return "ERROR: " + m.error.splitlines()[-1][:120]
    parts = []
    if m.scenario.startswith("dead"):
        parts.append(f"ideal {r['ideal_wall_s']:.0f} s; ×{r['wall_over_ideal']:.3f}")
        early = f"early timeouts {r['early_timeouts']}"
        if r["early_timeouts"]:
            early += f" (by ≤{r['max_early_ms']:.0f} ms)"
        early += f"; p99 {r['lateness_p99_ms']:+.0f} ms past the deadline"
        parts.append(early)
        if r["unexpected_codes"]:
            parts.append(f"{r['unexpected_codes']} not {r['expected_code'].removeprefix('DRS.')}")
        codes = ", ".join(f"{k.removeprefix('DRS.')} {v}" for k, v in sorted(r["codes"].items()))
        parts.append(codes)
    elif m.scenario == "mixed":
        parts.append(f"deadline {r['deadline_s']:g} s; misclassified {r['misclassified']}")
    elif m.scenario == "overhead":
        traced = _num(r["bytes_per_endpoint"])
        parts.append(f"{r['us_per_endpoint']:.1f} µs/endpoint; "
                     + (f"{traced / 1024:.2f} KiB/endpoint (tracemalloc peak); "
                        if not math.isnan(traced) else "")
                     + f"RSS +{r['rss_delta_bytes_per_endpoint'] / 1024:.2f} KiB/endpoint")
    elif m.scenario == "dedupe":
        parts.append(f"{r['distinct']} distinct → {r['probes_started']} probes started; "
                     f"in order: {r['in_order']}")
    if "ok" in r and r.get("ok") != r.get("probes") and m.scenario == "live":
        parts.append(f"{r['probes'] - r['ok']} failed")
    if r.get("rounds"):
        parts.append("rounds " + "/".join(_fmt(x, 0) for x in r["rounds"]))
    return "; ".join(parts)


HEADER = ("| scenario | engine | client | endpoints | conc. | probes/s | p50 ms | p99 ms "
          "| CPU ms/probe | peak RSS MB | wall s | ×native | ×bare | ×pool | notes |")


def table(rows: list[Measurement]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for m in rows:
        r = m.result
        lines.append("| " + " | ".join([
            m.scenario, LABELS.get(m.engine, m.engine), m.client, f"{m.endpoints:,}",
            f"{m.concurrency:,}", _fmt(r.get("rate"), 0) if r else "—",
            _fmt(r.get("p50_ms"), 2), _fmt(r.get("p99_ms"), 2),
            _fmt(_num(r.get("cpu_s_per_probe")) * 1000, 3), _fmt(r.get("peak_rss_mb"), 0),
            _fmt(r.get("wall_s"), 2), _fmt(r.get("vs_native"), 2), _fmt(r.get("vs_bare"), 2),
            _fmt(r.get("vs_pool"), 2), notes(m),
        ]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- targets


def targets(rows: list[Measurement], mode: str) -> list[dict[str, Any]]:
    by_name = {m.name: m.result for m in rows if m.result}
    top = max((m.concurrency for m in rows if m.scenario == "live"), default=32)
    out: list[dict[str, Any]] = []

    def check(what: str, value: float, op: str, limit: float, unit: str = "") -> None:
        met = (value >= limit if op == ">=" else value <= limit) if not math.isnan(value) else None
        out.append({"target": what, "value": value, "op": op, "limit": limit, "unit": unit,
                    "met": met})

    def get(name: str, key: str) -> float:
        return _num(by_name.get(name, {}).get(key))

    for engine in ENGINES:
        check(f"{LABELS[engine]}: engine / bare driver at c={top}",
              get(f"live/{engine}/c{top}/engine", "vs_bare"), ">=", 0.90)
    check(f"MariaDB: engine / C client at c={top}",
          get(f"live/mysql/c{top}/engine", "vs_native"), ">=", 0.38)
    check(f"MariaDB: engine / PyMySQL thread pool at c={top}",
          get(f"live/mysql/c{top}/engine", "vs_pool"), ">=", 2.5)
    check(f"PostgreSQL: engine / pgbench -C at c={top}",
          get(f"live/postgresql/c{top}/engine", "vs_native"), ">=", 1.3)
    dead = [m for m in rows if m.scenario.startswith("dead") and m.result]
    for m in dead:
        r = m.result
        if m.endpoints == 1000 and m.concurrency == 1000:
            check(f"dead {m.scenario.split()[1]} {LABELS[m.engine]}: 1,000 at 1 s, c=1,000: wall",
                  r["wall_s"], "<=", 1.15, "s")
        elif m.endpoints == 10_000:
            check(f"dead {m.scenario.split()[1]} {LABELS[m.engine]}: 10,000 at 1 s, c=1,000: wall",
                  r["wall_s"], "<=", 11.0, "s")
    for m in dead:
        check(f"dead {m.scenario.split()[1]} {LABELS[m.engine]} n={m.endpoints:,}: "
              "timeouts reported before the deadline", float(m.result["early_timeouts"]), "<=", 0)
    for m in rows:
        if m.scenario == "overhead" and m.result and m.endpoints == 10_000:
            check("overhead at 10,000 endpoints: µs per endpoint",
                  m.result["us_per_endpoint"], "<=", 30, "µs")
            check("overhead at 10,000 endpoints: bytes per endpoint",
                  m.result["bytes_per_endpoint"], "<=", 6000, "B")
    if "dedupe" in by_name:
        r = by_name["dedupe"]
        check(f"dedupe: {r['probes']:,} jobs of {r['distinct']} endpoints: probes started",
              float(r["probes_started"]), "<=", r["distinct"] * 1.05)
    if mode != "full":
        for t in out:
            t["note"] = f"{mode} run: indicative only"
    return out


def targets_text(items: list[dict[str, Any]]) -> str:
    lines = []
    for t in items:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"- {mark}: {t['target']}: {_fmt(t['value'], 3)}{t['unit']} "
                     f"(target {t['op']} {t['limit']:g}{t['unit']})")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "note": "the servers and the client share these cores"}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("probe", "anyio", "pydantic", "asyncpg", "aiomysql", "PyMySQL", "pymongo",
                 "psycopg", "uvloop"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def source_state() -> dict[str, Any]:
    """The commit measured, and whether probe/ differed from it (read-only git calls)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "probe_modified": bool(git("status", "--porcelain", "--", "probe"))}


def loop_name(use_uvloop: bool) -> str:
    if not use_uvloop:
        return "asyncio (default loop)"
    from importlib.metadata import version

    return f"uvloop {version('uvloop')}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="a run of about a minute")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="the smallest run covering every scenario (tests)")
    parser.set_defaults(mode="full")
    parser.add_argument("--json", default=None,
                        help="where to write every figure (default: bench-results-MODE.json)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop of the engine and the async references")
    parser.add_argument("--only", default=None,
                        help="regular expression: run only measurements whose name matches")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a pyinstrument profile of each measured section to DIR")
    parser.add_argument("--patch", action="append", default=[], metavar="MODULE",
                        help="import MODULE in every worker before it measures (A/B experiments "
                             "on the engine without editing it); repeatable")
    parser.add_argument("--rounds", type=int, default=None,
                        help="repetitions of the live comparisons at the top concurrency")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    scale = SCALES[args.mode]
    if args.rounds is not None:
        scale = Scale(**{**scale.__dict__,
                         "rounds": dict.fromkeys(ENGINES, max(1, args.rounds))})
    nofile = raise_nofile()
    if nofile < 2500:
        print(f"warning: RLIMIT_NOFILE is {nofile}; the dead-endpoint scenarios need > 2,000",
              file=sys.stderr)
    try:
        import uvloop  # noqa: F401

        have_uvloop = True
    except ImportError:
        have_uvloop = False
    use_uvloop = have_uvloop if args.loop == "auto" else args.loop == "uvloop"
    if use_uvloop and not have_uvloop:
        raise SystemExit("--loop uvloop: uvloop is not installed")
    started = time.perf_counter()
    silent, holes = ports_needed(scale)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    log(f"[bench] {args.mode} run, loop: {loop_name(use_uvloop)}; starting servers ...")
    with Fleet(users=scale.users, mongo_users=scale.mongo_users, silent=silent,
               blackholes=holes, refused=3) as fleet:
        log(f"[bench] servers up in {fleet.startup_s:.1f} s")
        measurements = plan(scale, fleet.endpoints.as_dict(), use_uvloop)
        for m in measurements:
            if args.patch:
                m.spec["patches"] = list(args.patch)
        if args.only:
            pattern = re.compile(args.only)
            measurements = [m for m in measurements if pattern.search(m.name)]
        profile = Path(args.profile) if args.profile else None
        for i, m in enumerate(measurements, 1):
            t0 = time.perf_counter()
            run_one(m, profile)
            rate = _fmt(m.result.get("rate"), 0) if m.result else "—"
            log(f"[bench] {i}/{len(measurements)} {m.name}: {rate} probes/s "
                f"({time.perf_counter() - t0:.1f} s){' ERROR ' + m.error if m.error else ''}")
        server_versions = fleet.endpoints.versions
    load = [m.result["load_before"] for m in measurements if m.result]
    rows = combine_rounds(measurements)
    ratios(rows, measurements)
    goals = targets(rows, args.mode)
    wall = time.perf_counter() - started
    meta = {
        "mode": args.mode,
        "command": "python -m benchmarks" + ("" if args.mode == "full" else f" --{args.mode}"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loop": loop_name(use_uvloop),
        "machine": machine(),
        "servers": server_versions,
        "packages": versions(),
        "source": source_state(),
        "rlimit_nofile": nofile,
        "load_average_1min": {"min": min(load, default=math.nan),
                              "max": max(load, default=math.nan),
                              "mean": sum(load) / len(load) if load else math.nan},
        "patches": list(args.patch),
        "wall_s": wall,
        "settings": {
            "live": "ProbeSettings(concurrency=C, per_host=C, deadline=10 s): every server is "
                    "on 127.0.0.1, so per_host is raised to C",
            "dead": f"deadline {DEAD_DEADLINE:g} s, concurrency=per_host=C",
            "mixed": f"concurrency=per_host={MIXED['concurrency']}, "
                     f"deadline {MIXED['deadline']:g} s",
            "overhead": "ProbeSettings() defaults, one loopback address per endpoint",
        },
    }
    text = (f"Loop: {meta['loop']}. Machine: {meta['machine']['cpus']} cores "
            f"({meta['machine']['cpu_model']}), {meta['machine']['memory']}, shared by the "
            f"servers and the client. Mode: {args.mode}. Wall: {wall:.0f} s. 1-minute load "
            f"average during the run: {meta['load_average_1min']['min']:.1f} to "
            f"{meta['load_average_1min']['max']:.1f} (above 2, other work shared the cores)."
            "\n\n"
            + table(rows) + "\n\nTargets (issue 6):\n" + targets_text(goals))
    print(text)
    document = {
        "meta": meta,
        "results": [
            {"name": m.name, "scenario": m.scenario, "engine": m.engine, "client": m.client,
             "endpoints": m.endpoints, "concurrency": m.concurrency, "error": m.error,
             **{k: v for k, v in m.result.items()}}
            for m in rows
        ],
        "raw": [{"name": m.name, "error": m.error, **m.result} for m in measurements],
        "targets": goals,
        "table": text,
    }
    json_path = Path(args.json) if args.json else ROOT / f"bench-results-{args.mode}.json"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    log(f"[bench] figures written to {json_path}")
    return document
