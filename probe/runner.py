"""`Prober`: runs a batch of endpoints concurrently and answers in request order.

How a batch runs:

1. `parse_jobs` validates every job (partial mode: an invalid job becomes a
   failed result; strict mode: the batch is rejected).
2. Task-state rules, when a provider is configured, fail jobs before any traffic.
3. Identical probes (same engine, hosts, user, password, database, TLS material)
   are grouped and run once; every job of the group gets the answer.
4. Groups are dispatched round-robin across hosts by at most `concurrency`
   workers, each taking a slot of the global limiter before it takes a group,
   so a 100,000-job batch never holds more than `concurrency` tasks; then a
   per-host slot is taken, then the file descriptors its checker may hold (a
   MongoDB host list holds one per member), and only then does the endpoint's
   deadline start.
5. Each probe runs under its own deadline (and the batch deadline, if any);
   when it fires, the code says which phase it cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import resource
import time
import traceback
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from probe.addresses import NetworkPolicy, hosts_label
from probe.checkers import CHECKERS, Checker, Facts, Target, Trace
from probe.checkers.base import tracing
from probe.errors import ErrorCode, Language, ProbeFailure, RequestInvalid, language, scrub
from probe.models import (
    BatchConnectionResponse,
    CheckJobResp,
    Endpoint,
    TLSFacts,
    parse_jobs,
)
from probe.tasks import TaskStateProvider, task_problem
from probe.tls import MaterialCache, TLSMaterial

log = logging.getLogger("probe")

# File descriptors kept free for the process itself (logs, the HTTP server, ...),
# and the most one probe holds at once (aiomysql's TLS upgrade dups its socket).
_FD_RESERVE = 64
_FDS_PER_PROBE = 2
# No probe needs longer; past it, drivers' millisecond timeouts overflow.
_LONGEST_TIMEOUT = 86_400.0


def fd_budget() -> int:
    """File descriptors the probes in flight may hold between them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 21
    return max(_FDS_PER_PROBE, soft - _FD_RESERVE)


def fd_capacity() -> int:
    """How many probes the file-descriptor limit leaves room for."""
    return fd_budget() // _FDS_PER_PROBE


class _FdBudget:
    """A weighted semaphore of file descriptors, first come first served: a probe
    takes its checker's estimate before it starts and gives it back when done,
    so a batch of MongoDB host lists cannot run the process out of them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    async def acquire(self, wanted: int) -> int:
        """Take `wanted` (at most the total); returns what to give back."""
        wanted = min(wanted, self.total)
        if not self._waiters and self.free >= wanted:
            self.free -= wanted  # no checkpoint when there is room
            return wanted
        entry = (wanted, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():  # granted as it was cancelled
                self.release(wanted)
            else:
                self._waiters.remove(entry)
                self._wake()  # it may have been the head that others waited behind
            raise
        return wanted

    def release(self, taken: int) -> None:
        self.free += taken
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            wanted, event = self._waiters.popleft()
            self.free -= wanted
            event.set()


@dataclass(frozen=True)
class ProbeSettings:
    """One settings object for the library, the CLI flags and the PROBE_* variables."""

    deadline: float = 10.0
    connect_timeout: float = 5.0
    concurrency: int = 256
    per_host: int = 16
    batch_deadline: float | None = None
    language: Language = "en-us"
    detail: bool = False
    strict: bool = False
    verify_hostname: bool = False
    policy: NetworkPolicy = field(default_factory=NetworkPolicy)

    def __post_init__(self) -> None:
        for name, where in (("deadline", "--timeout, PROBE_TIMEOUT"),
                            ("connect_timeout", "--connect-timeout, PROBE_CONNECT_TIMEOUT"),
                            ("batch_deadline", "--batch-timeout, PROBE_BATCH_TIMEOUT")):
            value = getattr(self, name)
            if value is not None and not 0 < value <= _LONGEST_TIMEOUT:  # NaN fails too
                raise ValueError(f"{name} ({where}) must be more than 0 and at most "
                                 f"{_LONGEST_TIMEOUT:g} seconds (a day)")
        for name, where in (("concurrency", "--concurrency, PROBE_CONCURRENCY"),
                            ("per_host", "--per-host, PROBE_PER_HOST")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({where}) must be at least 1")

    @property
    def effective_concurrency(self) -> int:
        return min(self.concurrency, fd_capacity())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ProbeSettings:
        """Settings from PROBE_TIMEOUT, PROBE_CONNECT_TIMEOUT, PROBE_CONCURRENCY, PROBE_PER_HOST,
        PROBE_BATCH_TIMEOUT, PROBE_LANG, PROBE_VERIFY_HOSTNAME and the network policy's
        PROBE_DENY_CIDR, PROBE_ALLOW_CIDR, PROBE_ALLOW_PORTS; `overrides` (not None) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, key, kind in (
            ("deadline", "PROBE_TIMEOUT", float),
            ("connect_timeout", "PROBE_CONNECT_TIMEOUT", float),
            ("concurrency", "PROBE_CONCURRENCY", int),
            ("per_host", "PROBE_PER_HOST", int),
            ("batch_deadline", "PROBE_BATCH_TIMEOUT", float),
        ):
            if env.get(key):
                try:
                    values[name] = kind(env[key])
                except ValueError:
                    raise ValueError(f"{key} must be a number") from None
        if env.get("PROBE_LANG"):
            if env["PROBE_LANG"].strip().lower() not in ("en-us", "zh-cn"):
                raise ValueError("PROBE_LANG must be en-us or zh-cn")
            values["language"] = language(env["PROBE_LANG"])
        if env.get("PROBE_VERIFY_HOSTNAME"):
            flag = env["PROBE_VERIFY_HOSTNAME"].strip().lower()
            if flag not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError("PROBE_VERIFY_HOSTNAME must be true or false (1/0, yes/no)")
            values["verify_hostname"] = flag in ("1", "true", "yes")
        if overrides.get("policy") is None and any(
                env.get(f"PROBE_{k}") for k in ("DENY_CIDR", "ALLOW_CIDR", "ALLOW_PORTS")):
            values["policy"] = NetworkPolicy.from_text(env.get("PROBE_DENY_CIDR", ""),
                                                       env.get("PROBE_ALLOW_CIDR", ""),
                                                       env.get("PROBE_ALLOW_PORTS", ""))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(slots=True)
class Outcome:
    """What probing one distinct endpoint gave: facts or a failure, and timings."""

    facts: Facts | None
    failure: ProbeFailure | None
    elapsed_ms: float
    phases: dict[str, float]

    def result(
        self, endpoint: Endpoint, lang: Language, detail: bool
    ) -> CheckJobResp:
        if self.failure is None:
            resp = CheckJobResp(id=endpoint.id, status="success", success=True)
        else:
            resp = failed_result(endpoint.id, self.failure, lang, None)
        if detail:
            facts = self.facts or Facts()
            resp.end_point_type = endpoint.end_point_type
            resp.elapsed_ms = round(self.elapsed_ms, 3)
            resp.phases = self.phases
            resp.server_version = facts.server_version
            resp.address = facts.address
            resp.tls = TLSFacts(**facts.tls) if facts.tls else None
            resp.replica_set = facts.replica_set
        return resp


def failed_result(
    job_id: str, problem: RequestInvalid | ProbeFailure, lang: Language, end_point_type: str | None
) -> CheckJobResp:
    return CheckJobResp(
        id=job_id,
        status="failed",
        success=False,
        error_code=problem.code.value,
        error_msg=problem.message(lang),
        end_point_type=end_point_type,  # type: ignore[arg-type]
    )


@dataclass(slots=True)
class _Load:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: TLSMaterial | ProbeFailure | None = None


class _BatchMaterials:
    """The TLS material of one batch: jobs carrying the same certificate fields share one
    load (one decode and checksum, at most one SSLContext built), however many they are
    and however many of them start at once."""

    def __init__(self, cache: MaterialCache, verify_hostname: bool) -> None:
        self._cache = cache
        self._verify_hostname = verify_hostname
        self._loads: dict[tuple[str, str, str, str | None], _Load] = {}

    async def load(self, endpoint: Endpoint) -> TLSMaterial:
        assert endpoint.ssl_cert_key is not None
        password = endpoint.ssl_cert_password
        key = (
            endpoint.ssl_cert_key.get_secret_value(),
            endpoint.ssl_cert_name or "",
            endpoint.ssl_cert_check_sum or "",
            password.get_secret_value() if password else None,
        )
        while (pending := self._loads.get(key)) is not None:
            await pending.done.wait()
            if isinstance(pending.result, ProbeFailure):
                raise ProbeFailure(pending.result.code, cause=pending.result.cause)
            if pending.result is not None:
                return pending.result
            # Its loader was cancelled before it finished: load it here.
        pending = self._loads[key] = _Load()
        try:
            pending.result = await anyio.to_thread.run_sync(
                lambda: self._cache.load(*key, self._verify_hostname)
            )
            return pending.result
        except ProbeFailure as exc:
            pending.result = exc
            raise
        finally:
            if pending.result is None:
                del self._loads[key]
            pending.done.set()


Emit = Callable[[int, CheckJobResp], None]
ProbeObserver = Callable[[str, Outcome], None]


class Prober:
    """Probes batches of endpoints. One Prober may serve many concurrent batches:
    its global and per-host limits hold across all of them."""

    def __init__(
        self,
        settings: ProbeSettings | None = None,
        *,
        task_states: TaskStateProvider | None = None,
        checkers: Mapping[str, Checker] | None = None,
        observer: ProbeObserver | None = None,
    ) -> None:
        self.settings = settings or ProbeSettings()
        self.task_states = task_states
        self.checkers: Mapping[str, Checker] = checkers or CHECKERS
        self.observer = observer
        self.materials = MaterialCache()
        self.probes_started = 0
        self._limiter = anyio.CapacityLimiter(self.settings.effective_concurrency)
        self._fds = _FdBudget(fd_budget())
        self._hosts: dict[str, tuple[anyio.CapacityLimiter, int]] = {}

    # ------------------------------------------------------------ public API

    async def run(
        self,
        body: Any,
        *,
        detail: bool | None = None,
        strict: bool | None = None,
        lang: str | None = None,
    ) -> BatchConnectionResponse:
        """Probe every job of `body` (a request dict or model); results in request order.

        Raises RequestInvalid when the request is unusable (and, in strict mode,
        when any job is invalid).
        """
        jobs = parse_jobs(body, strict=self.settings.strict if strict is None else strict)
        results: list[CheckJobResp | None] = [None] * len(jobs)

        def emit(index: int, result: CheckJobResp) -> None:
            results[index] = result

        await self._execute(jobs, emit, self._lang(lang), self._detail(detail))
        done = [r for r in results if r is not None]
        assert len(done) == len(jobs), "every job gets a result"
        return BatchConnectionResponse(results=done, count=len(done))

    @asynccontextmanager
    async def stream(
        self,
        body: Any,
        *,
        detail: bool | None = None,
        strict: bool | None = None,
        lang: str | None = None,
    ) -> AsyncIterator[MemoryObjectReceiveStream[tuple[int, CheckJobResp]]]:
        """Results as they complete, each with its job's index::

            async with prober.stream(body) as results:
                async for index, result in results:
                    ...

        Leaving the block early cancels the probes still running.
        """
        jobs = parse_jobs(body, strict=self.settings.strict if strict is None else strict)
        send, receive = anyio.create_memory_object_stream[tuple[int, CheckJobResp]](math.inf)

        def emit(index: int, result: CheckJobResp) -> None:
            # A probe that finished inside a shielded cleanup as the reader left
            # still answers: nobody is listening any more, which is fine.
            with contextlib.suppress(anyio.BrokenResourceError):
                send.send_nowait((index, result))

        async def produce() -> None:
            with send:
                await self._execute(jobs, emit, self._lang(lang), self._detail(detail))

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            with receive:
                try:
                    yield receive
                finally:
                    tg.cancel_scope.cancel()

    async def probe(self, endpoint: Endpoint) -> Outcome:
        """Probe one validated endpoint under the configured deadline (no limiter)."""
        return await self._probe_endpoint(
            endpoint, self._now() + self.settings.deadline, self._batch_materials()
        )

    # ------------------------------------------------------------ internals

    def _lang(self, lang: str | None) -> Language:
        return self.settings.language if lang is None else language(lang)

    def _detail(self, detail: bool | None) -> bool:
        return self.settings.detail if detail is None else detail

    @staticmethod
    def _now() -> float:
        # anyio.current_time() on asyncio, without looking the backend up on every call
        return asyncio.get_running_loop().time()

    def _batch_materials(self) -> _BatchMaterials:
        return _BatchMaterials(self.materials, self.settings.verify_hostname)

    async def _execute(
        self,
        jobs: Sequence[Endpoint | RequestInvalid],
        emit: Emit,
        lang: Language,
        detail: bool,
    ) -> None:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            if isinstance(job, RequestInvalid):
                emit(index, failed_result(job.job_id, job, lang, None))
                continue
            if self.task_states is not None:
                problem = await self._task_problem(job)
                if problem is not None:
                    emit(index, failed_result(job.id, problem, lang,
                                              job.end_point_type if detail else None))
                    continue
            groups.setdefault(_dedupe_key(job), []).append(index)

        batch_deadline = (
            self._now() + self.settings.batch_deadline if self.settings.batch_deadline else math.inf
        )
        pending = deque(_round_robin(groups, jobs))
        materials = self._batch_materials()
        limiter = self._limiter

        async def worker() -> None:
            # One of at most `concurrency` workers: no task, TaskHandle, cancel scope
            # and event per probe, and a free slot is taken without a checkpoint.
            while pending:
                token = object()
                try:
                    limiter.acquire_on_behalf_of_nowait(token)
                except anyio.WouldBlock:
                    await limiter.acquire_on_behalf_of(token)
                if not pending or self._now() >= batch_deadline:
                    # another worker took the last group, or the batch deadline
                    # passed: what is left is answered below
                    limiter.release_on_behalf_of(token)
                    return
                await self._run_group(jobs, pending.popleft(), token, batch_deadline,
                                      materials, emit, lang, detail)

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope(deadline=batch_deadline):
                for _ in range(min(self.settings.effective_concurrency, len(pending))):
                    tg.start_soon(worker)
        # The batch deadline passed before these could start.
        for indices in pending:
            outcome = _never_started(_endpoint(jobs, indices[0]))
            for index in indices:
                emit(index, outcome.result(_endpoint(jobs, index), lang, detail))

    async def _task_problem(self, job: Endpoint) -> RequestInvalid | ProbeFailure | None:
        """The task rules' verdict on `job`; a lookup that fails fails this job only."""
        assert self.task_states is not None
        try:
            return await task_problem(self.task_states, job.id)
        except Exception as exc:
            log.error("task-state lookup failed for job %s: %s", job.id, _where(exc))
            return ProbeFailure(ErrorCode.INTERNAL, target=_label(job))

    async def _run_group(
        self,
        jobs: Sequence[Endpoint | RequestInvalid],
        indices: list[int],
        token: object,
        batch_deadline: float,
        materials: _BatchMaterials,
        emit: Emit,
        lang: Language,
        detail: bool,
    ) -> None:
        endpoint = _endpoint(jobs, indices[0])
        host = endpoint.hosts()[0].host
        if host.startswith("::ffff:"):  # an IPv4 address written as IPv6 is that address
            host = _ipv4_mapped(host)
        try:
            limiter = await self._host_acquire(host, token)
            try:
                fds = await self._fds.acquire(
                    self.checkers[endpoint.db_type].fds(len(endpoint.hosts())))
                try:
                    if self._now() >= batch_deadline:  # it passed while this waited
                        outcome = _never_started(endpoint)
                    else:
                        own = self._now() + self.settings.deadline
                        outcome = await self._probe_endpoint(
                            endpoint, min(own, batch_deadline), materials,
                            by_batch=batch_deadline < own)
                finally:
                    self._fds.release(fds)
            finally:
                self._host_release(host, limiter, token)
        finally:
            self._limiter.release_on_behalf_of(token)
        for index in indices:
            emit(index, outcome.result(_endpoint(jobs, index), lang, detail))

    async def _host_acquire(self, host: str, token: object) -> anyio.CapacityLimiter:
        """A slot of `host`'s limiter (made on first use, dropped when unused), taken
        without a checkpoint when one is free."""
        limiter, users = self._hosts.get(host) or (anyio.CapacityLimiter(self.settings.per_host), 0)
        self._hosts[host] = (limiter, users + 1)
        try:
            try:
                limiter.acquire_on_behalf_of_nowait(token)
            except anyio.WouldBlock:
                await limiter.acquire_on_behalf_of(token)
        except BaseException:
            self._host_left(host)
            raise
        return limiter

    def _host_release(self, host: str, limiter: anyio.CapacityLimiter, token: object) -> None:
        limiter.release_on_behalf_of(token)
        self._host_left(host)

    def _host_left(self, host: str) -> None:
        limiter, users = self._hosts[host]
        if users == 1:
            del self._hosts[host]
        else:
            self._hosts[host] = (limiter, users - 1)

    async def _probe_endpoint(
        self, endpoint: Endpoint, deadline: float, materials: _BatchMaterials,
        *, by_batch: bool = False,
    ) -> Outcome:
        self.probes_started += 1
        trace = Trace(deadline, self.settings.connect_timeout, self.settings.policy,
                      batch_deadline=by_batch)
        label = hosts_label(endpoint.hosts())  # masked below, with the rest of a failure
        started = time.perf_counter()
        facts: Facts | None = None
        failure: ProbeFailure | None = None
        try:
            with anyio.CancelScope(deadline=deadline) as scope, tracing(trace):
                target = await self._target(endpoint, materials)
                facts = await self.checkers[endpoint.db_type].check(target, trace)
            if scope.cancelled_caught:
                failure = trace.timeout_failure(trace.address or label)
        except ProbeFailure as exc:
            failure = exc if exc.target else _with_target(exc, trace.address or label)
            if failure.code is ErrorCode.SSL_VERIFY_FAILED and trace.handshake.certificates:
                # what the server presented is what the user needs to fix this
                failure = _with_cause(failure, trace.handshake.describe())
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this probe really is being cancelled (batch, stream, client gone)
            # A driver raised CancelledError while nobody cancelled the probe: an
            # error like any other, not a reason to leave the job without an answer.
            log.error("internal error probing %s: a spurious CancelledError", _label(endpoint))
            failure = ProbeFailure(ErrorCode.INTERNAL, target=label)
        except Exception as exc:  # a bug of ours or a driver's: answer, never escape
            log.error("internal error probing %s: %s", _label(endpoint), _where(exc))
            failure = ProbeFailure(ErrorCode.INTERNAL, target=label)
        if failure is not None:
            facts = trace.failure_facts()
            failure = _without_secrets(failure, endpoint)
            if failure.code is ErrorCode.INTERNAL and failure.cause:
                # The cause is a class name or a number, never driver text: safe to log.
                what = ("the prober ran out of a resource" if failure.local
                        else "unclassified failure")
                log.warning("%s probing %s: %s", what, failure.target, failure.cause)
        outcome = Outcome(facts, failure, (time.perf_counter() - started) * 1000, trace.phases)
        if self.observer is not None:
            self.observer(endpoint.db_type, outcome)
        return outcome

    async def _target(self, endpoint: Endpoint, materials: _BatchMaterials) -> Target:
        tls = await materials.load(endpoint) if endpoint.ssl_link else None
        return Target(
            db_type=endpoint.db_type,
            hosts=endpoint.hosts(),
            user=endpoint.db_user,
            password=endpoint.db_password.get_secret_value(),
            database=endpoint.database(),
            tls=tls,
            policy=self.settings.policy,
        )


def _endpoint(jobs: Sequence[Endpoint | RequestInvalid], index: int) -> Endpoint:
    job = jobs[index]
    assert isinstance(job, Endpoint)
    return job


def _ipv4_mapped(host: str) -> str:
    address = ipaddress.ip_address(host.split("%")[0])
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else host


def _never_started(endpoint: Endpoint) -> Outcome:
    """The answer for an endpoint the batch deadline left no time to probe: a limit
    of the prober's, not a fault of the target (nothing was sent to it)."""
    failure = ProbeFailure(ErrorCode.INTERNAL, target=_label(endpoint), local=True,
                           cause="the batch deadline passed before the probe started")
    return Outcome(None, failure, 0.0, {})


def _where(exc: BaseException) -> str:
    """What went wrong and where, never the exception's text (it may quote a DSN)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {frame.filename}:{frame.lineno}"


def _label(endpoint: Endpoint) -> str:
    """The endpoint's hosts for messages and logs, a password typed into them masked."""
    return scrub(hosts_label(endpoint.hosts()), *_secrets(endpoint))


def _secrets(endpoint: Endpoint) -> tuple[str, str | None]:
    return (endpoint.db_password.get_secret_value(),
            endpoint.ssl_cert_password.get_secret_value() if endpoint.ssl_cert_password
            else None)


def _with_target(exc: ProbeFailure, target: str) -> ProbeFailure:
    return ProbeFailure(exc.code, target=target, cause=exc.cause, local=exc.local)


def _without_secrets(exc: ProbeFailure, endpoint: Endpoint) -> ProbeFailure:
    """`exc` with the endpoint's passwords masked wherever a field the user set
    (a host, a db_name) or a server's text has carried one into it."""
    secrets = _secrets(endpoint)
    target, cause = scrub(exc.target, *secrets), scrub(exc.cause, *secrets)
    if (target, cause) == (exc.target, exc.cause):
        return exc
    return ProbeFailure(exc.code, target=target, cause=cause, local=exc.local)


def _with_cause(exc: ProbeFailure, more: str) -> ProbeFailure:
    cause = f"{exc.cause}; {more}" if exc.cause else more
    return ProbeFailure(exc.code, target=exc.target, cause=cause, local=exc.local)


def _dedupe_key(job: Endpoint) -> tuple[Any, ...]:
    """Jobs with equal keys are the same probe (ids and end_point_type aside).

    The certificate counts by its content, not by the checksum the job claims:
    a job whose certificate does not match its checksum must fail on its own,
    not share the answer of a job whose certificate does. Engines count by family
    (the registry's checker name: mysql and taurus are one).
    """
    checker = CHECKERS.get(job.db_type)
    tls = None
    if job.ssl_link:
        assert job.ssl_cert_key is not None
        tls = (
            job.ssl_cert_key.get_secret_value(),
            job.ssl_cert_name,
            (job.ssl_cert_check_sum or "").lower(),
            job.ssl_cert_password.get_secret_value() if job.ssl_cert_password else None,
        )
    return (
        checker.name if checker else job.db_type,
        job.hosts(),
        job.db_user,
        job.db_password.get_secret_value(),
        job.database(),
        tls,
    )


def _round_robin(
    groups: dict[tuple[Any, ...], list[int]], jobs: Sequence[Endpoint | RequestInvalid]
) -> list[list[int]]:
    """Groups interleaved across hosts, so one busy host does not hold up the others."""
    by_host: dict[str, deque[list[int]]] = defaultdict(deque)
    for indices in groups.values():
        by_host[_endpoint(jobs, indices[0]).hosts()[0].host].append(indices)
    order: list[list[int]] = []
    queues = list(by_host.values())
    while queues:
        for queue in queues:
            order.append(queue.popleft())
        queues = [q for q in queues if q]
    return order


def run_batch(
    body: Any, settings: ProbeSettings | None = None, **kwargs: Any
) -> BatchConnectionResponse:
    """Synchronous helper: probe `body` on a fresh event loop (uvloop when installed)."""
    prober = Prober(settings)

    async def main() -> BatchConnectionResponse:
        return await prober.run(body, **kwargs)

    return anyio.run(main, backend_options={"use_uvloop": uvloop_available()})


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


