"""One measurement in a fresh Python process: ``python -m benchmarks.worker SPEC_JSON``.

A fresh process per measurement gives each its own CPU time, peak RSS and
garbage-collector state, and no threads or clients left over by the previous
one. The spec is a JSON object (see `harness.Spec`); the result is printed as
one JSON line ``RESULT {...}`` on stdout.

Kinds:

- ``engine``: `Prober.run` on N live endpoints (distinct users) of one engine;
- ``bare``: the async driver alone, N times connect + one command + close, C at a time;
- ``pool``: the sync driver in a `ThreadPoolExecutor` of C threads, the same cycle;
- ``dead``: `Prober.run` on N blackhole or silent endpoints with a 1 s deadline;
- ``mixed``: 70% live, 10% wrong password, 10% refused, 10% blackhole;
- ``overhead``: `Prober.run` on N endpoints of an instant in-process checker;
- ``dedupe``: 1,000 jobs that are 100 distinct live endpoints, 10 times each.

Latency per probe is what one probe took once it started (the engine's own
`Outcome.elapsed_ms`, seen through `Prober(observer=...)`; the same span around
one cycle for the references), so queueing behind the concurrency limit is not in it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import math
import os
import random
import resource
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.serve import raise_nofile, user_name

Spec = dict[str, Any]

EXPECTED = {  # what each kind of mixed endpoint must answer
    "live": None,
    "wrong_password": "DRS.C10030",
    "refused": "DRS.C10012",
    "blackhole": "DRS.C10013",
}
TIMEOUT_CODES = {"DRS.C10013", "DRS.C10015", "DRS.C10036"}
EARLY_TOLERANCE_MS = 1.0  # timer granularity (libuv timers are in milliseconds)


# ---------------------------------------------------------------- measuring helpers


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Start the peak-RSS count (VmHWM) afresh, where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class GCTimer:
    """Seconds spent in the cyclic garbage collector (all generations) since `reset()`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self.max_pause = 0.0
        self._t = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            pause = time.perf_counter() - self._t
            self.seconds += pause
            self.collections += 1
            self.max_pause = max(self.max_pause, pause)

    def reset(self) -> None:
        self.seconds, self.collections, self.max_pause = 0.0, 0, 0.0


GC = GCTimer()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def summary(
    latencies_ms: list[float], wall: float, cpu: float, probes: int, **extra: Any
) -> dict[str, Any]:
    lat = sorted(latencies_ms)
    return {
        "probes": probes,
        "wall_s": wall,
        "rate": probes / wall if wall > 0 else math.nan,
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "cpu_s": cpu,
        "cpu_s_per_probe": cpu / probes if probes else math.nan,
        "peak_rss_mb": peak_rss_mb(),
        "gc_s": GC.seconds,
        "gc_collections": GC.collections,
        "gc_max_pause_ms": GC.max_pause * 1000,
        **extra,
    }


def use_uvloop(spec: Spec) -> bool:
    return bool(spec.get("uvloop"))


def run_async(spec: Spec, main: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    import anyio

    return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": use_uvloop(spec)})


# ---------------------------------------------------------------- jobs


def user_count(spec: Spec, engine: str) -> int:
    ep = spec["endpoints"]
    return int(ep["mongo_users"] if engine == "mongodb" else ep["users"])


def job(
    spec: Spec, engine: str, index: int, *, user: int, port: int | None = None,
    password: str | None = None, job_id: str | None = None, host: str | None = None,
) -> dict[str, Any]:
    ep = spec["endpoints"]
    host = host or ep["host"]
    port = port if port is not None else ep[engine]
    body: dict[str, Any] = {
        "id": job_id or f"b{index}",
        "net_type": "vpc",
        "db_type": engine,
        "db_user": user_name(user),
        "db_password": ep["password"] if password is None else password,
    }
    if engine == "mongodb":
        body["ip"] = f"{host}:{port}"
    else:
        body["ip"] = host
        body["db_port"] = port
    return body


def settings(spec: Spec, **overrides: Any) -> Any:
    from probe.runner import ProbeSettings

    concurrency = overrides.pop("concurrency", spec["concurrency"])
    values: dict[str, Any] = {
        "concurrency": concurrency,
        # Every test server is on 127.0.0.1: the per-host cap would otherwise be the limit.
        "per_host": concurrency,
        "deadline": spec.get("deadline", 10.0),
    }
    values.update(overrides)
    return ProbeSettings(**values)


class Observed:
    """Collects (db_type, Outcome) of every probe through `Prober(observer=...)`."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []

    def __call__(self, db_type: str, outcome: Any) -> None:
        self.outcomes.append(outcome)


class DeadlineWatch:
    """How late (ms, negative when early) each probe answered relative to its own deadline.

    Wraps the runner's `_probe_endpoint(endpoint, deadline, ...)` to read the deadline it
    was given and the loop clock when it answered: exact, and immune to the collector
    pauses that can shorten the engine's own `elapsed_ms` (its stopwatch starts after
    the deadline is computed). Falls back to `elapsed_ms - deadline` when the runner's
    private signature changes.
    """

    def __init__(self, prober: Any, deadline_s: float) -> None:
        self.lateness: list[tuple[float, Any]] = []
        self.deadline_ms = deadline_s * 1000
        self.exact = True
        inner = prober._probe_endpoint

        async def probe_endpoint(endpoint: Any, deadline: float, *args: Any, **kwargs: Any) -> Any:
            outcome = await inner(endpoint, deadline, *args, **kwargs)
            late = (asyncio.get_running_loop().time() - deadline) * 1000
            self.lateness.append((late, outcome))
            return outcome

        try:
            import inspect

            params = list(inspect.signature(inner).parameters)
            if params[:2] != ["endpoint", "deadline"]:
                raise TypeError(params)
            prober._probe_endpoint = probe_endpoint
        except (TypeError, ValueError):
            self.exact = False

    def timeouts(self, observed: Observed) -> list[float]:
        if self.exact:
            pairs = [(late, o) for late, o in self.lateness]
        else:
            pairs = [(o.elapsed_ms - self.deadline_ms, o) for o in observed.outcomes]
        return [late for late, o in pairs
                if o.failure is not None and o.failure.code.value in TIMEOUT_CODES]


def codes_of(response: Any) -> Counter[str]:
    return Counter(r.error_code or "success" for r in response.results)


# ---------------------------------------------------------------- engine scenarios


def run_engine(spec: Spec) -> dict[str, Any]:
    from probe.runner import Prober

    engine, n, c = spec["engine"], spec["n"], spec["concurrency"]
    users = user_count(spec, engine)
    offset = spec.get("user_offset", 0)
    warm = {"jobs": [job(spec, engine, i, user=(users - 1 - i) % users)
                     for i in range(min(c, 16))]}
    body = {"jobs": [job(spec, engine, i, user=(offset + i) % users) for i in range(n)]}

    async def main() -> dict[str, Any]:
        observed = Observed()
        prober = Prober(settings(spec), observer=observed)
        await prober.run(warm)
        observed.outcomes.clear()
        gc.collect()
        reset_peak_rss()
        GC.reset()
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            response = await prober.run(body)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        codes = codes_of(response)
        return summary([o.elapsed_ms for o in observed.outcomes], wall, cpu, n,
                       probes_started=prober.probes_started - len(warm["jobs"]),
                       ok=codes.get("success", 0), codes=dict(codes))

    return run_async(spec, main)


def run_dead(spec: Spec) -> dict[str, Any]:
    from probe.runner import Prober

    engine, n = spec["engine"], spec["n"]
    deadline = spec["deadline"]
    port = spec["port"]
    body = {"jobs": [job(spec, engine, i, user=i, port=port) for i in range(n)]}
    # distinct user names beyond the bench users are fine: nobody checks them
    expected = "DRS.C10013" if spec["target"] == "blackhole" else "DRS.C10015"

    async def main() -> dict[str, Any]:
        observed = Observed()
        prober = Prober(settings(spec, deadline=deadline), observer=observed)
        watch = DeadlineWatch(prober, deadline)
        gc.collect()
        reset_peak_rss()
        GC.reset()
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            response = await prober.run(body)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        codes = codes_of(response)
        elapsed = sorted(o.elapsed_ms for o in observed.outcomes)
        lateness = watch.timeouts(observed)  # ms after (negative: before) each deadline
        early_timeouts = sum(1 for late in lateness if late < -EARLY_TOLERANCE_MS)
        waves = math.ceil(n / min(spec["concurrency"], n))
        return summary(
            elapsed, wall, cpu, n,
            ideal_wall_s=waves * deadline,
            wall_over_ideal=wall / (waves * deadline),
            early_timeouts=early_timeouts,
            max_early_ms=max(0.0, -min(lateness)) if lateness else 0.0,
            lateness_p99_ms=percentile(sorted(lateness), 0.99),
            deadline_measured_exactly=watch.exact,
            expected_code=expected,
            unexpected_codes=sum(v for k, v in codes.items() if k != expected),
            min_ms=elapsed[0] if elapsed else math.nan,
            max_ms=elapsed[-1] if elapsed else math.nan,
            codes=dict(codes),
            ok=codes.get("success", 0),
        )

    return run_async(spec, main)


def run_mixed(spec: Spec) -> dict[str, Any]:
    from probe.runner import Prober

    n = spec["n"]
    ep = spec["endpoints"]
    rng = random.Random(6)
    engines = ("mysql", "postgresql", "mongodb")
    kinds = (["live"] * 70 + ["wrong_password"] * 10 + ["refused"] * 10 + ["blackhole"] * 10)
    jobs, expected = [], []
    per_engine: Counter[str] = Counter()
    for i in range(n):
        kind = kinds[i % 100]
        engine = engines[(i // 100 + i) % 3]
        user = per_engine[engine] % user_count(spec, engine)  # distinct: no dedupe
        per_engine[engine] += 1
        if kind == "live":
            jobs.append(job(spec, engine, i, user=user))
        elif kind == "wrong_password":
            jobs.append(job(spec, engine, i, user=user, password="wrong-" + ep["password"]))
        elif kind == "refused":
            jobs.append(job(spec, engine, i, user=user, port=rng.choice(ep["refused"])))
        else:
            jobs.append(job(spec, engine, i, user=user, port=rng.choice(ep["blackholes"])))
        expected.append(kind)
    order = list(range(n))
    rng.shuffle(order)
    jobs = [jobs[i] for i in order]
    expected = [expected[i] for i in order]

    async def main() -> dict[str, Any]:
        observed = Observed()
        prober = Prober(settings(spec), observer=observed)
        gc.collect()
        reset_peak_rss()
        GC.reset()
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            response = await prober.run({"jobs": jobs})
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        wrong: Counter[str] = Counter()
        for kind, result in zip(expected, response.results, strict=True):
            if result.error_code != EXPECTED[kind]:
                wrong[f"{kind}->{result.error_code or 'success'}"] += 1
        return summary([o.elapsed_ms for o in observed.outcomes], wall, cpu, n,
                       codes=dict(codes_of(response)), misclassified=sum(wrong.values()),
                       misclassified_detail=dict(wrong), ok=codes_of(response)["success"],
                       deadline_s=spec["deadline"])

    return run_async(spec, main)


def run_dedupe(spec: Spec) -> dict[str, Any]:
    from probe.runner import Prober

    engine, n, distinct = spec["engine"], spec["n"], spec["distinct"]
    body = {"jobs": [
        {**job(spec, engine, i, user=i % distinct), "end_point_type": "so" if i % 2 else "ta"}
        for i in range(n)
    ]}

    async def main() -> dict[str, Any]:
        observed = Observed()
        prober = Prober(settings(spec), observer=observed)
        gc.collect()
        reset_peak_rss()
        GC.reset()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        response = await prober.run(body)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        codes = codes_of(response)
        ids_in_order = all(r.id == f"b{i}" for i, r in enumerate(response.results))
        return summary([o.elapsed_ms for o in observed.outcomes], wall, cpu, n,
                       distinct=distinct, probes_started=prober.probes_started,
                       ok=codes.get("success", 0), codes=dict(codes), in_order=ids_in_order)

    return run_async(spec, main)


def run_overhead(spec: Spec) -> dict[str, Any]:
    """Validation + scheduling + result assembly, against a checker that answers at once.

    Endpoint i is on its own loopback address (127.x.y.z): distinct endpoints
    (no dedupe) spread over many hosts, as in a real batch; the instant checker
    sends nothing anywhere. Default settings (concurrency 256, per_host 16).
    Timed without tracemalloc; then run again under tracemalloc for the bytes.
    """
    from probe.checkers.base import Checker, Facts, Target, Trace
    from probe.runner import Prober, ProbeSettings

    class InstantChecker(Checker):
        name = "postgresql"
        default_port = 5432
        default_database = "postgres"

        async def check(self, target: Target, trace: Trace) -> Facts:
            return Facts()

    n = spec["n"]

    def make_body(count: int = n) -> dict[str, Any]:
        return {"jobs": [
            job(spec, "postgresql", i, user=i, port=5432,
                host=f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{(i & 255) or 1}")
            for i in range(count)
        ]}

    def prober() -> Any:
        return Prober(ProbeSettings(), checkers={"postgresql": InstantChecker()})

    async def timed() -> dict[str, Any]:
        await prober().run(make_body(min(n, 2000)))  # warm-up: imports, caches
        body = make_body()
        p = prober()
        gc.collect()
        rss0 = current_rss_mb()
        reset_peak_rss()
        GC.reset()
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            response = await p.run(body)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        peak = peak_rss_mb()
        assert response.count == n and p.probes_started == n
        return {"wall_s": wall, "cpu_s": cpu, "rss_before_mb": rss0, "peak_after_mb": peak,
                "ok": sum(r.success for r in response.results)}

    async def traced() -> dict[str, Any]:
        body = make_body()
        p = prober()
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        response = await p.run(body)
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del response
        return {"peak_bytes": peak - base, "retained_bytes": current - base}

    t = run_async(spec, timed)
    # tracemalloc triples the time: above 20,000 endpoints the RSS delta stands in.
    m = run_async(spec, traced) if n <= 20_000 else {"peak_bytes": math.nan,
                                                      "retained_bytes": math.nan}
    wall = t["wall_s"]
    return {
        "probes": n,
        "wall_s": wall,
        "rate": n / wall,
        "p50_ms": math.nan,
        "p99_ms": math.nan,
        "cpu_s": t["cpu_s"],
        "cpu_s_per_probe": t["cpu_s"] / n,
        "peak_rss_mb": t["peak_after_mb"],
        "us_per_endpoint": wall / n * 1e6,
        "bytes_per_endpoint": m["peak_bytes"] / n,
        "retained_bytes_per_endpoint": m["retained_bytes"] / n,
        "rss_delta_bytes_per_endpoint": max(0.0, t["peak_after_mb"] - t["rss_before_mb"])
        * 2**20 / n,
        "ok": t["ok"],
    }


# ---------------------------------------------------------------- references


def _bare_cycle(spec: Spec) -> Callable[[int], Awaitable[None]]:
    engine = spec["engine"]
    ep = spec["endpoints"]
    host, port, password = ep["host"], ep[engine], ep["password"]
    if engine == "postgresql":
        import asyncpg

        async def pg(user: int) -> None:
            conn = await asyncpg.connect(host=host, port=port, user=user_name(user),
                                         password=password, database="postgres", ssl=False)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        return pg
    if engine == "mysql":
        import aiomysql

        async def my(user: int) -> None:
            conn = await aiomysql.connect(host=host, port=port, user=user_name(user),
                                          password=password, charset="utf8mb4", autocommit=True)
            try:
                async with conn.cursor() as cursor:
                    await cursor.execute("SELECT 1")
                    await cursor.fetchone()
            finally:
                await conn.ensure_closed()  # COM_QUIT, as the engine does

        return my
    from pymongo import AsyncMongoClient

    async def mongo(user: int) -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            host, port, username=user_name(user), password=password, authSource="admin",
            directConnection=True, maxPoolSize=1)
        try:
            await client.admin.command("ping")
        finally:
            await client.close()

    return mongo


def run_bare(spec: Spec) -> dict[str, Any]:
    n, c = spec["n"], spec["concurrency"]
    users = user_count(spec, spec["engine"])
    offset = spec.get("user_offset", 0)
    cycle = _bare_cycle(spec)

    async def drive(count: int, first: int, latencies: list[float]) -> int:
        next_index = 0
        failures = 0

        async def worker() -> None:
            nonlocal next_index, failures
            while next_index < count:
                i = next_index
                next_index += 1
                t = time.perf_counter()
                try:
                    await cycle((first + i) % users)
                except Exception:
                    failures += 1
                latencies.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(worker() for _ in range(min(c, count))))
        return failures

    async def main() -> dict[str, Any]:
        await drive(min(c, 16), users - 16, [])
        gc.collect()
        reset_peak_rss()
        latencies: list[float] = []
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            failures = await drive(n, offset, latencies)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        return summary(latencies, wall, cpu, n, ok=n - failures)

    return run_async(spec, main)


def _sync_cycle(spec: Spec) -> Callable[[int], None]:
    engine = spec["engine"]
    ep = spec["endpoints"]
    host, port, password = ep["host"], ep[engine], ep["password"]
    if engine == "postgresql":
        import psycopg

        def pg(user: int) -> None:
            with psycopg.connect(host=host, port=port, user=user_name(user), password=password,
                                 dbname="postgres", sslmode="disable", connect_timeout=10,
                                 autocommit=True) as conn:
                conn.execute("SELECT 1").fetchone()

        return pg
    if engine == "mysql":
        import pymysql

        def my(user: int) -> None:
            conn = pymysql.connect(host=host, port=port, user=user_name(user), password=password,
                                   charset="utf8mb4", autocommit=True, ssl_disabled=True,
                                   connect_timeout=10)
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
            finally:
                conn.close()  # COM_QUIT

        return my
    from pymongo import MongoClient

    def mongo(user: int) -> None:
        client: MongoClient[dict[str, Any]] = MongoClient(
            host, port, username=user_name(user), password=password, authSource="admin",
            directConnection=True, maxPoolSize=1)
        try:
            client.admin.command("ping")
        finally:
            client.close()

    return mongo


def run_pool(spec: Spec) -> dict[str, Any]:
    n, c = spec["n"], spec["concurrency"]
    users = user_count(spec, spec["engine"])
    offset = spec.get("user_offset", 0)
    cycle = _sync_cycle(spec)

    def one(user: int) -> tuple[float, bool]:
        t = time.perf_counter()
        try:
            cycle(user)
            ok = True
        except Exception:
            ok = False
        return (time.perf_counter() - t) * 1000, ok

    with ThreadPoolExecutor(max_workers=c) as pool:
        list(pool.map(one, [(users - 1 - i) % users for i in range(min(c, 16))]))
        gc.collect()
        reset_peak_rss()
        GC.reset()
        with Profiler(spec):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            results = list(pool.map(one, [(offset + i) % users for i in range(n)]))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return summary([r[0] for r in results], wall, cpu, n, ok=sum(r[1] for r in results))


# ---------------------------------------------------------------- profiling


class Profiler:
    """pyinstrument around the measured section when the spec asks for it."""

    def __init__(self, spec: Spec) -> None:
        self.path = spec.get("profile")
        self.profiler: Any = None

    def __enter__(self) -> Profiler:
        if self.path:
            from pyinstrument import Profiler as Pyinstrument

            self.profiler = Pyinstrument(interval=0.0005, async_mode="disabled")
            self.profiler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            with open(self.path, "w") as f:
                f.write(self.profiler.output_text(unicode=True, color=False, show_all=False))
            with open(self.path + ".html", "w") as f:
                f.write(self.profiler.output_html())
            self.profiler.last_session.save(self.path + ".pyisession")


KINDS: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "engine": run_engine,
    "bare": run_bare,
    "pool": run_pool,
    "dead": run_dead,
    "mixed": run_mixed,
    "dedupe": run_dedupe,
    "overhead": run_overhead,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec: Spec = json.loads(argv[0])
    raise_nofile()
    for module in spec.get("patches", ()):  # A/B experiments: `--patch MODULE`
        importlib.import_module(module)
    result = KINDS[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
