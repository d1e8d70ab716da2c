"""The server side of org.farmnode.Agent1: D-Bus calls → agent core, core events → signals."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sdbus import dbus_method_async_override, dbus_property_async_override

from farmnode import __version__
from farmnode.agent import core
from farmnode.bus.interface import (
    Agent1Interface,
    InvalidArgumentError,
    InvalidAssignmentError,
    NotAcceptingError,
    NotEnoughResourcesError,
    PartialOverlapError,
    UnknownTaskError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERRORS: list[tuple[type[core.AgentError], type[Exception]]] = [
    (core.InvalidAssignment, InvalidAssignmentError),
    (core.PartialOverlap, PartialOverlapError),
    (core.NotEnoughResources, NotEnoughResourcesError),
    (core.NotAccepting, NotAcceptingError),
    (core.UnknownTask, UnknownTaskError),
    (core.InvalidArgument, InvalidArgumentError),
]


async def _translated(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except core.AgentError as exc:
        for ours, theirs in _ERRORS:
            if isinstance(exc, ours):
                raise theirs(str(exc)) from None
        raise InvalidArgumentError(str(exc)) from None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Agent1Service(Agent1Interface):
    def __init__(self, agent: core.Agent) -> None:
        super().__init__()
        self.agent = agent
        agent.task_listeners.append(self._on_task)
        agent.state_listeners.append(self._on_state)
        agent.idle_listeners.append(self._on_idle)

    def _on_task(self, c: core.TaskChange) -> None:
        self.task_changed.emit((c.assignment_id, c.task_id, str(c.state), c.reason, c.progress))

    def _on_state(self, state: core.AgentState) -> None:
        self.state_changed.emit(str(state))

    def _on_idle(self) -> None:
        self.idle.emit(None)

    @dbus_method_async_override()
    async def assign(self, assignment_json: str) -> str:
        async def call() -> str:
            try:
                payload = json.loads(assignment_json)
            except RecursionError:
                raise core.InvalidArgument("assignment is not valid JSON: nested too deeply")\
                    from None
            except ValueError as exc:
                raise core.InvalidArgument(f"assignment is not valid JSON: {exc}") from None
            assignment_id, _created = self.agent.assign(payload)
            return assignment_id

        try:
            return await _translated(call)
        except InvalidArgumentError as exc:  # bad JSON is a bad assignment to the caller
            raise InvalidAssignmentError(str(exc)) from None

    @dbus_method_async_override()
    async def cancel_task(self, task_id: int) -> bool:
        return await _translated(lambda: self.agent.cancel_task(task_id))

    @dbus_method_async_override()
    async def list_tasks(self, active_only: bool) -> str:
        async def call() -> str:
            return _dumps(self.agent.list_tasks(active_only))

        return await _translated(call)

    @dbus_method_async_override()
    async def get_task(self, task_id: int) -> str:
        async def call() -> str:
            return _dumps(self.agent.get_task(task_id).to_dict())

        return await _translated(call)

    @dbus_method_async_override()
    async def get_status(self) -> str:
        async def call() -> str:
            return _dumps(self.agent.status())

        return await _translated(call)

    @dbus_method_async_override()
    async def set_state(self, state: str) -> None:
        async def call() -> None:
            self.agent.set_state(state)

        await _translated(call)

    @dbus_method_async_override()
    async def note_master_contact(self) -> None:
        self.agent.note_master_contact()

    @dbus_property_async_override()
    def state(self) -> str:
        return str(self.agent.state)

    @dbus_property_async_override()
    def version(self) -> str:
        return __version__

    @dbus_property_async_override()
    def agent_id(self) -> str:
        return self.agent.agent_id

    @dbus_property_async_override()
    def trusted_masters(self) -> list[str]:
        trusted = self.agent.trusted_masters
        return trusted.as_strings() if trusted is not None else []

    # ---- control for the HTTP API ([3]) ----------------------------------------------
    @dbus_method_async_override()
    async def signal_task(self, task_id: int, signal: int) -> bool:
        return await _translated(lambda: self.agent.signal_task(task_id, signal))

    @dbus_method_async_override()
    async def stop(self) -> None:
        await _translated(self.agent.stop_agent)

    @dbus_method_async_override()
    async def restart(self, immediately: bool) -> bool:
        return await _translated(lambda: self.agent.restart_agent(immediately))

    @dbus_method_async_override()
    async def update(self, version: str) -> None:
        async def call() -> None:
            self.agent.request_update(version)

        await _translated(call)

    @dbus_method_async_override()
    async def get_config(self) -> str:
        async def call() -> str:
            return _dumps(self.agent.config_dict())

        return await _translated(call)

    @dbus_method_async_override()
    async def patch_config(self, patch_json: str) -> str:
        async def call() -> str:
            try:
                patch = json.loads(patch_json)
            except RecursionError:
                raise core.InvalidArgument("patch is not valid JSON: nested too deeply")\
                    from None
            except ValueError as exc:
                raise core.InvalidArgument(f"patch is not valid JSON: {exc}") from None
            return _dumps(self.agent.patch_config(patch))

        return await _translated(call)

    @dbus_method_async_override()
    async def task_log(self, identifier: str) -> int:
        return await _translated(lambda: self.agent.task_log(identifier))
