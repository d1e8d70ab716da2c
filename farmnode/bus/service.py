"""The server side of org.farmnode.Agent1: D-Bus calls → agent core, core events → signals."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

from sdbus import SdBus, dbus_method_async_override, dbus_property_async_override
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle

from farmnode import __version__
from farmnode.agent import core
from farmnode.bus.agent_props import AgentProperties
from farmnode.bus.errors import detail, error_class, translated
from farmnode.bus.interface import (
    INTERFACE,
    Agent1Interface,
    InvalidArgumentError,
    InvalidAssignmentError,
)
from farmnode.bus.tasks import TaskObjects
from farmnode.bus.views import AgentFigures, AgentView, usec

if TYPE_CHECKING:
    from farmnode.jobfile.service import JobFiles

log = logging.getLogger(__name__)
T = TypeVar("T")

_translated = translated


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Agent1Service(Agent1Interface):
    def __init__(self, agent: core.Agent) -> None:
        super().__init__()
        self.agent = agent
        self.job_files: JobFiles | None = None  # set by the entry point
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
        self.props.changed()

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

    # ---- control for the HTTP API ----------------------------------------------------
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

    # ---- job files (farmnode.jobfile) ---------------------------------------------------
    def _job_files(self) -> JobFiles:
        if self.job_files is None:
            raise core.NotAccepting("job files are not available yet (the agent is starting)")
        return self.job_files

    @dbus_method_async_override()
    async def submit_jobs(self, name: str, yaml: str, source_lines: list[int],
                          submission: str) -> str:
        async def call() -> str:
            return _dumps(await self._job_files().submit(name, yaml, source_lines,
                                                         submission))

        return await _translated(call)

    @dbus_method_async_override()
    async def list_jobs(self) -> str:
        async def call() -> str:
            return _dumps(self._job_files().listing())

        return await _translated(call)

    # ---- typed API: PropertiesChanged, task objects, TryAssign ---------------------------
    def export_to_dbus(self, object_path: str, bus: SdBus | None = None) -> DbusExportHandle:
        """Export the agent, its ObjectManager and the objects of the tasks it knows."""
        handle = super().export_to_dbus(object_path, bus)
        attached = self._dbus.attached_bus
        assert attached is not None
        self.task_objects = TaskObjects(self, attached, self.agent,
                                        lambda: self.agent.config.agent_task_object_retention)
        self.task_objects.load(self.agent.store.tasks(active_only=True)
                               + self.agent.store.finished_since(
                                   time.time() - self.agent.config.agent_task_object_retention))
        self.props = AgentProperties(self.agent, self._emit_agent_properties)
        self.props.start()
        self.agent.task_listeners.append(self._on_task_record)
        self.agent.state_listeners.append(lambda _state: self.props.changed())
        self.agent.runs_listeners.append(self.props.changed)
        self.agent.status_listeners.append(self.props.changed)
        self.agent.accounting_listeners.append(self.task_objects.accounting)
        self.agent.record_listeners.append(self.task_objects.update)
        return handle

    def _view(self) -> AgentView:
        return self.props.view()

    def _figures(self) -> AgentFigures:
        return self.props.figures()

    def _started(self) -> int:
        return usec(self.agent.started)

    def _emit_agent_properties(self, changed: dict[str, tuple[str, Any]]) -> None:
        self.properties_changed.emit((INTERFACE, changed, []))

    def _on_task_record(self, c: core.TaskChange) -> None:
        if c.record is not None:
            self.task_objects.update(c.record)
        self.props.changed()

    @dbus_method_async_override()
    async def try_assign(self, assignment_json: str,
                         ) -> tuple[str, bool, str, str, dict[str, tuple[str, Any]]]:
        try:
            payload = json.loads(assignment_json)
        except RecursionError:
            return "", False, InvalidAssignmentError.dbus_error_name, \
                "assignment is not valid JSON: nested too deeply", {}
        except ValueError as exc:
            return "", False, InvalidAssignmentError.dbus_error_name, \
                f"assignment is not valid JSON: {exc}", {}
        try:
            assignment_id, created = self.agent.assign(payload)
        except core.AgentError as exc:
            return "", False, error_class(exc).dbus_error_name, str(exc), detail(exc)
        return assignment_id, created, "", "", {}

    @dbus_property_async_override()
    def free_ram(self) -> int:
        return self.props.view().free_ram

    @dbus_property_async_override()
    def total_ram(self) -> int:
        return self.props.view().total_ram

    @dbus_property_async_override()
    def cpus(self) -> float:
        return self.props.view().cpus

    @dbus_property_async_override()
    def running_tasks(self) -> int:
        return self.props.view().running_tasks

    @dbus_property_async_override()
    def assignments(self) -> list[str]:
        return list(self.props.view().assignments)

    @dbus_property_async_override()
    def gpus_total(self) -> int:
        return self.props.view().gpus_total

    @dbus_property_async_override()
    def gpus_free(self) -> int:
        return self.props.view().gpus_free

    @dbus_property_async_override()
    def master_link(self) -> str:
        return self.props.view().master_link

    @dbus_property_async_override()
    def master_last_error(self) -> str:
        return self.props.view().master_last_error

    @dbus_property_async_override()
    def last_master_contact(self) -> int:
        return self.props.view().last_master_contact

    @dbus_property_async_override()
    def queued_reports(self) -> int:
        return self.props.view().queued_reports

    @dbus_property_async_override()
    def storage_error(self) -> str:
        return self.props.view().storage_error
