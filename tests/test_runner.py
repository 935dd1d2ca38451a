"""The runner: order, dedupe, limits, deadlines, streaming, and no leaks."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from probe import Prober, ProbeSettings, run_batch
from probe.checkers import CHECKERS, Facts, Target, Trace
from probe.checkers.base import Checker
from probe.errors import ErrorCode
from probe.runner import _FdBudget, fd_capacity
from probe.testing import mariadb as m
from probe.testing import postgres as p
from probe.testing.mariadb import MariaDBServer
from probe.testing.postgres import PostgresServer
from tests.conftest import Faults, job, settle

pytestmark = pytest.mark.anyio


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class SlowChecker(Checker):
    """An in-process checker for the runner's own mechanics (no driver involved):
    it sleeps, records how many probes run at once per host, and can fail."""

    name = "mysql"
    default_port = 3306

    def __init__(self, delay: float = 0.05, fail_with: BaseException | None = None) -> None:
        self.delay = delay
        self.fail_with = fail_with
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.peak_total = 0
        self.calls = 0

    async def check(self, target: Target, trace: Trace) -> Facts:
        host = target.hosts[0].host
        self.calls += 1
        self.running[host] += 1
        self.peak[host] = max(self.peak[host], self.running[host])
        self.peak_total = max(self.peak_total, sum(self.running.values()))
        try:
            await anyio.sleep(self.delay)
            if self.fail_with is not None:
                raise self.fail_with
            return Facts(server_version="fake", address=str(target.hosts[0]))
        finally:
            self.running[host] -= 1


def fake_jobs(hosts: list[str], **extra: Any) -> dict[str, Any]:
    return {"jobs": [
        {**job("mysql", 3306, "u", f"pw{i}", id=f"j{i}"), "ip": host, **extra}
        for i, host in enumerate(hosts)
    ]}


async def test_results_keep_request_order_and_ids(pg: PostgresServer, faults: Faults) -> None:
    good = job("postgresql", pg.port, p.SCRAM_USER.name, p.SCRAM_USER.password, db_name="appdb")
    jobs = []
    for i in range(40):
        kind = i % 4
        body = (
            good if kind == 0
            else job("postgresql", faults.refused.port, "u", "p") if kind == 1
            else job("postgresql", faults.silent.port, "u", "p") if kind == 2
            else {"id": f"bad{i}", "db_type": "postgresql"}
        )
        jobs.append({**body, "id": f"id-{i}"})
    response = await Prober(ProbeSettings(deadline=1)).run({"jobs": jobs})
    assert response.count == len(response.results) == 40
    assert [r.id for r in response.results] == [f"id-{i}" for i in range(40)]
    codes = [r.error_code for r in response.results[:4]]
    assert codes == [None, "DRS.C10012", "DRS.C10015", "DRS.M00201"]


async def test_identical_probes_run_once(pg: PostgresServer) -> None:
    user = p.SCRAM_USER
    jobs = []
    for i in range(50):
        variant = i % 5  # five distinct endpoints: different passwords / databases
        password = user.password if variant < 3 else "wrong"
        db = ["appdb", "postgres", "appdb", "appdb", "postgres"][variant]
        jobs.append(job("postgresql", pg.port, user.name, password, db_name=db, id=f"t{i}",
                        end_point_type="so" if i % 2 else "ta"))
    prober = Prober(ProbeSettings(deadline=5), checkers=CHECKERS)
    response = await prober.run({"jobs": jobs}, detail=True)
    assert prober.probes_started == 4  # variants 0 and 2 are the same probe
    assert [r.id for r in response.results] == [f"t{i}" for i in range(50)]
    assert [r.end_point_type for r in response.results] == ["ta", "so"] * 25
    assert sum(r.success for r in response.results) == 30


async def test_per_host_and_global_limits() -> None:
    checker = SlowChecker(delay=0.02)
    hosts = ["10.0.0.1"] * 60 + [f"10.0.1.{i}" for i in range(60)]
    prober = Prober(ProbeSettings(concurrency=20, per_host=3), checkers={"mysql": checker})
    response = await prober.run(fake_jobs(hosts))
    assert all(r.success for r in response.results) and response.count == 120
    assert checker.peak["10.0.0.1"] == 3
    assert checker.peak_total <= 20
    # Round-robin across hosts: the busy host did not hold the others back.
    assert checker.peak_total > 3


async def test_limits_hold_across_concurrent_batches() -> None:
    checker = SlowChecker(delay=0.02)
    prober = Prober(ProbeSettings(concurrency=50, per_host=4), checkers={"mysql": checker})
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(prober.run, fake_jobs(["10.9.9.9"] * 20))
    assert checker.peak["10.9.9.9"] == 4


async def test_an_unexpected_error_is_answered_not_raised() -> None:
    checker = SlowChecker(delay=0, fail_with=RuntimeError("driver bug"))
    response = await Prober(checkers={"mysql": checker}).run(fake_jobs(["10.0.0.1", "10.0.0.2"]))
    assert [r.error_code for r in response.results] == ["DRS.C10099"] * 2
    assert "driver bug" not in (response.results[0].error_msg or "")


async def test_streaming_yields_every_index_once(faults: Faults, pg: PostgresServer) -> None:
    body = {"jobs": [
        job("postgresql", pg.port, p.SCRAM_USER.name, p.SCRAM_USER.password, id="a"),
        job("postgresql", faults.silent.port, "u", "p", id="b"),
        job("postgresql", faults.refused.port, "u", "p", id="c"),
        {"id": "d"},
    ]}
    prober = Prober(ProbeSettings(deadline=1))
    seen: list[tuple[int, str]] = []
    async with prober.stream(body) as results:
        async for index, result in results:
            seen.append((index, result.id))
    assert sorted(seen) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert seen[-1] == (1, "b")  # the silent server is the slowest


async def test_leaving_a_stream_early_cancels_the_rest(faults: Faults) -> None:
    body = {"jobs": [job("mysql", faults.silent.port, "u", "p", id=f"s{i}") for i in range(5)]
            + [{"id": "bad"}]}
    for attempt in ("warm-up", "counted"):
        # The first probes of a loop make libuv open a spare fd (/dev/null) for good:
        # the warm-up round lets that happen before the fds are counted.
        before = open_fds()
        started = time.monotonic()
        async with Prober(ProbeSettings(deadline=30)).stream(body) as results:
            async for index, _ in results:
                assert index == 5
                break
        if attempt == "warm-up":
            await anyio.sleep(0.1)
    assert time.monotonic() - started < 5
    await anyio.sleep(0.1)
    assert open_fds() <= before


async def test_batch_deadline_answers_every_job(faults: Faults) -> None:
    body = {"jobs": [job("postgresql", faults.silent.port, "u", f"p{i}", id=f"s{i}")
                     for i in range(4)]}
    settings = ProbeSettings(deadline=30, concurrency=2, batch_deadline=1)
    started = time.monotonic()
    response = await Prober(settings).run(body)
    assert time.monotonic() - started < 3
    codes = [r.error_code for r in response.results]
    # Two ran into the batch deadline mid-handshake; two never started: nothing
    # was sent to them, so the prober's limit is named, not the target.
    assert codes == ["DRS.C10015"] * 2 + ["DRS.C10099"] * 2
    # the time since the probe started, not the sum of nested phases (login holds connect)
    cut = re.search(r"cut by the batch deadline \(--batch-timeout\) after (\S+) s",
                    response.results[0].error_msg or "")
    assert cut is not None and 0.5 <= float(cut.group(1)) <= 2.5, response.results[0].error_msg
    message = response.results[3].error_msg or ""
    assert "batch deadline passed before the probe started" in message
    assert "not a fault of the target" in message


async def test_no_socket_is_left_open_after_500_failing_probes(faults: Faults) -> None:
    ports = [faults.refused.port, faults.blackhole.port, faults.silent.port, faults.reset.port,
             faults.garbage.port, faults.greeting.port]
    jobs = [
        job(db, ports[i % len(ports)], "u", f"pw{i}", id=f"f{i}")
        for i, db in enumerate(["mysql", "postgresql"] * 250)
    ]
    prober = Prober(ProbeSettings(deadline=0.5, connect_timeout=0.3, concurrency=256))
    await prober.run({"jobs": jobs[:12]})  # warm up: the loop's own lazy fds (uvloop)
    before = open_fds()
    response = await prober.run({"jobs": jobs})
    assert response.count == 500 and not any(r.success for r in response.results)
    assert {r.error_code for r in response.results} >= {
        ErrorCode.CONNECTION_REFUSED.value, ErrorCode.CONNECT_TIMEOUT.value,
        ErrorCode.HANDSHAKE_TIMEOUT.value, ErrorCode.CONNECTION_RESET.value,
        ErrorCode.PROTOCOL_MISMATCH.value,
    }
    assert await settle(lambda: open_fds() <= before), (open_fds(), before)


async def test_no_session_is_left_on_the_servers(pg: PostgresServer, maria: MariaDBServer) -> None:
    pg_user, maria_user = p.SCRAM_USER, m.NATIVE_USER
    jobs = [job("postgresql", pg.port, pg_user.name, pg_user.password, id=f"p{i}",
                db_name="appdb" if i % 2 else "postgres") for i in range(2)]
    jobs += [job("mysql", maria.port, maria_user.name, maria_user.password, id="m")]
    response = await Prober().run({"jobs": jobs * 20})
    assert all(r.success for r in response.results)
    await anyio.sleep(0.3)
    assert pg.backend_count(pg_user.name) == 0
    assert maria.connection_count(maria_user.name) == 0


def test_concurrency_never_exceeds_the_fd_limit() -> None:
    assert ProbeSettings(concurrency=10**7).effective_concurrency == fd_capacity()
    assert ProbeSettings(concurrency=3).effective_concurrency == 3


async def test_the_descriptor_budget_is_first_come_first_served() -> None:
    budget = _FdBudget(10)
    assert await budget.acquire(8) == 8
    granted: list[str] = []

    async def take(wanted: int, name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            await budget.acquire(wanted)
            granted.append(name)

    async with anyio.create_task_group() as tg:
        big = anyio.CancelScope()
        tg.start_soon(take, 5, "big", big)  # 2 free: waits
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, 1, "small")  # fits, but waits behind "big"
        await anyio.wait_all_tasks_blocked()
        assert granted == [] and budget.free == 2
        big.cancel()  # the head leaves: the one behind it goes
        await anyio.wait_all_tasks_blocked()
        assert granted == ["small"] and budget.free == 1
        tg.start_soon(take, 50, "all")  # more than there is: waits for all of it
        await anyio.wait_all_tasks_blocked()
        budget.release(8)
        budget.release(1)
    assert granted == ["small", "all"] and budget.free == 0


def test_settings_from_environment() -> None:
    env = {"PROBE_TIMEOUT": "2.5", "PROBE_CONCURRENCY": "7", "PROBE_LANG": "zh-cn"}
    settings = ProbeSettings.from_env(env, per_host=2)
    assert (settings.deadline, settings.concurrency, settings.per_host, settings.language) == (
        2.5, 7, 2, "zh-cn")
    assert ProbeSettings.from_env({"PROBE_VERIFY_HOSTNAME": "No"}).verify_hostname is False
    for env, says in (({"PROBE_TIMEOUT": "soon"}, "PROBE_TIMEOUT"),
                      ({"PROBE_LANG": "fr"}, "PROBE_LANG"),
                      ({"PROBE_VERIFY_HOSTNAME": "maybe"}, "PROBE_VERIFY_HOSTNAME"),
                      ({"PROBE_CONCURRENCY": "-5"}, "PROBE_CONCURRENCY"),
                      ({"PROBE_PER_HOST": "0"}, "PROBE_PER_HOST")):
        with pytest.raises(ValueError, match=says):
            ProbeSettings.from_env(env)


def test_run_batch_is_a_sync_helper(faults: Faults) -> None:
    response = run_batch({"jobs": [job("mysql", faults.refused.port, "u", "p")]}, lang="zh-cn")
    assert response.results[0].error_code == "DRS.C10012"
    assert "拒绝" in (response.results[0].error_msg or "")
