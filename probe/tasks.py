"""DRS task-state rules: which jobs may be tested at all.

Applied per job, before any network traffic, when a `TaskStateProvider` is
configured (without one, the embedded default, no rule applies):

- unknown task: ``DRS.10000010``;
- a parent task may not be tested: ``DRS.C10052``;
- the task must be in status CONFIGURATION: ``DRS.C10050``;
- a backward task of a dual-active DR pair only while its forward task is
  INCRE_TRANSFER_STARTED: ``DRS.C10051``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from probe.errors import ErrorCode, RequestInvalid

Role = Literal["single", "forward", "backward", "parent"]
ROLES: tuple[Role, ...] = ("single", "forward", "backward", "parent")


@dataclass(frozen=True, slots=True)
class TaskState:
    status: str
    role: Role = "single"
    forward_task_id: str | None = None


@runtime_checkable
class TaskStateProvider(Protocol):
    """Looks up a DRS task by id; None when the task does not exist."""

    async def get(self, task_id: str) -> TaskState | None: ...


class InMemoryTaskStates:
    """Task states held in a dict (for tests and embedding)."""

    def __init__(self, states: Mapping[str, TaskState] | None = None) -> None:
        self.states: dict[str, TaskState] = dict(states or {})

    async def get(self, task_id: str) -> TaskState | None:
        return self.states.get(task_id)


class JsonFileTaskStates(InMemoryTaskStates):
    """Task states from a JSON file: ``{"task-id": {"status": "...", "role": "single",
    "forward_task_id": "..."}}``. Read once, when created."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(parse_task_states(json.loads(Path(path).read_text(encoding="utf-8"))))


def parse_task_states(data: Any) -> dict[str, TaskState]:
    """Task states from decoded JSON; ValueError names the first bad entry."""
    if not isinstance(data, dict):
        raise ValueError("the tasks file must hold a JSON object of task id -> state")
    states: dict[str, TaskState] = {}
    for task_id, entry in data.items():
        if isinstance(entry, str):
            entry = {"status": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            raise ValueError(f"task {task_id!r}: needs a string status")
        role = entry.get("role", "single")
        if role not in ROLES:
            raise ValueError(f"task {task_id!r}: role must be one of {', '.join(ROLES)}")
        forward = entry.get("forward_task_id")
        if role == "backward" and not isinstance(forward, str):
            raise ValueError(f"task {task_id!r}: a backward task needs forward_task_id")
        states[task_id] = TaskState(entry["status"], role, forward)
    return states


def load_provider(spec: str) -> TaskStateProvider:
    """A provider from ``module:factory`` (the factory is called without arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError("a task-state provider is given as module:factory")
    factory = getattr(importlib.import_module(module_name), attr)
    provider = factory()
    if not isinstance(provider, TaskStateProvider):
        raise ValueError(f"{spec} did not return a TaskStateProvider")
    return provider


async def task_problem(provider: TaskStateProvider, task_id: str) -> RequestInvalid | None:
    """Why the job of `task_id` may not be tested, or None when it may."""
    state = await provider.get(task_id)
    if state is None:
        return RequestInvalid(ErrorCode.TASK_NOT_FOUND, field=task_id)
    if state.role == "parent":
        return RequestInvalid(ErrorCode.PARENT_TASK_NOT_ALLOWED, field=task_id)
    if state.status != "CONFIGURATION":
        return RequestInvalid(ErrorCode.TASK_STATUS_INVALID, field=task_id,
                              cause=f"it is {state.status}")
    if state.role == "backward":
        forward = await provider.get(state.forward_task_id or "")
        if forward is None or forward.status != "INCRE_TRANSFER_STARTED":
            now = forward.status if forward else "not found"
            return RequestInvalid(ErrorCode.DR_FORWARD_NOT_READY, field=task_id,
                                  cause=f"the forward task is {now}")
    return None
