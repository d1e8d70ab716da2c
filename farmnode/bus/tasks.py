"""The task objects: one org.farmnode.Task1 per task, under the agent's ObjectManager.

An object appears (InterfacesAdded) when its task is stored, follows every change of its
record with one PropertiesChanged naming only what changed, and goes (InterfacesRemoved)
`agent_task_object_retention` seconds after the task finished. A task id that comes back in
a later assignment (a retry) is the same object showing the newer attempt.

Each update touches one task: the objects are found by id, finished tasks wait for removal
in a queue ordered by deadline, and cgroup figures (sampled per assignment) go only to the
tasks of that assignment that are running or finished since the last sample.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from sdbus import DbusObjectManagerInterfaceAsync, SdBus, dbus_method_async_override
from sdbus.dbus_proxy_async_interface_base import DbusExportHandle

from farmnode.agent import core
from farmnode.bus.errors import translated
from farmnode.bus.interface import OBJECT_PATH
from farmnode.bus.task1 import TASK_INTERFACE, Task1Interface, task_path
from farmnode.bus.views import TASK_PROPERTIES, TaskView, changed_properties, usec
from farmnode.tasks.model import TaskState
from farmnode.tasks.store import TaskRecord

log = logging.getLogger(__name__)
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
STANDARD_INTERFACES = ("org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable",
                       "org.freedesktop.DBus.Properties")


class TaskObject(Task1Interface):
    def __init__(self, view: TaskView, agent: core.Agent) -> None:
        super().__init__()
        self.view = view
        self._agent = agent

    def show(self, view: TaskView) -> None:
        """Take the new view; PropertiesChanged for the properties that differ."""
        changed = view.changed(self.view)
        self.view = view
        if changed:
            self.properties_changed.emit(
                (TASK_INTERFACE, changed_properties(view, changed, TASK_PROPERTIES), []))

    @dbus_method_async_override()
    async def cancel(self) -> bool:
        return await translated(lambda: self._agent.cancel_task(self.view.id))

    @dbus_method_async_override()
    async def signal(self, signal: int) -> bool:
        return await translated(lambda: self._agent.signal_task(self.view.id, signal))


class TaskObjects:
    def __init__(self, manager: DbusObjectManagerInterfaceAsync, bus: SdBus,
                 agent: core.Agent, retention: Callable[[], float]) -> None:
        self._manager = manager
        self._bus = bus
        self._agent = agent
        self._retention = retention
        self.objects: dict[int, TaskObject] = {}
        self._handles: dict[int, DbusExportHandle] = {}
        # Per assignment: tasks whose figures follow the scope's samples.
        self._live: dict[str, set[int]] = collections.defaultdict(set)
        # (deadline, task id, its FinishedUSec): finished tasks in the order they go.
        self._expiry: collections.deque[tuple[float, int, int]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def load(self, records: Iterable[TaskRecord]) -> None:
        """The objects an agent starts with: active tasks, and finished ones still within
        their retention (oldest first, so the queue stays ordered)."""
        for rec in sorted(records, key=lambda r: (r.finished or 0.0, r.created)):
            self.update(rec)

    def update(self, rec: TaskRecord) -> None:
        view = TaskView.of(rec)
        obj = self.objects.get(rec.id)
        if obj is None:
            if rec.state.finished and rec.finished is not None \
                    and rec.finished + self._retention() <= time.time():
                return  # gone already (an agent that starts after the retention)
            obj = TaskObject(view, self._agent)
            path = task_path(rec.id)
            self._handles[rec.id] = obj.export_to_dbus(path, self._bus)
            self.objects[rec.id] = obj
            # The manager's own signal, with what sd_bus_emit_object_added would put in it:
            # that call walks every object under the manager (it made announcing a 5,000-task
            # assignment quadratic, seconds on the loop), this one is the same message.
            self._manager.interfaces_added.emit((path, {
                **{name: {} for name in STANDARD_INTERFACES},
                TASK_INTERFACE: changed_properties(view, list(TASK_PROPERTIES),
                                                   TASK_PROPERTIES)}))
        elif view.created < obj.view.created:
            return  # an older attempt of the id than the object shows
        else:
            if obj.view.assignment_id != view.assignment_id:
                self._live[obj.view.assignment_id].discard(rec.id)
            obj.show(view)
        if rec.state.finished:
            # Kept live once more: the figures sampled at the end come after the state.
            self._live[rec.assignment_id].add(rec.id)
            self._expire_later(rec)
        elif rec.state is TaskState.RUNNING:
            self._live[rec.assignment_id].add(rec.id)

    def accounting(self, assignment_id: str, figures: dict[str, int]) -> None:
        live = self._live.get(assignment_id)
        if not live:
            return
        for task_id in list(live):
            obj = self.objects.get(task_id)
            if obj is None or obj.view.assignment_id != assignment_id:
                live.discard(task_id)
                continue
            obj.show(obj.view.with_accounting(figures))
            if obj.view.finished:
                live.discard(task_id)
        if not live:
            del self._live[assignment_id]

    def _expire_later(self, rec: TaskRecord) -> None:
        finished = rec.finished if rec.finished is not None else time.time()
        self._expiry.append((finished + self._retention(), rec.id, usec(rec.finished)))
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        self._timer = None
        if not self._expiry:
            return
        with contextlib.suppress(RuntimeError):  # no loop (the core alone in a test)
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._expiry[0][0] - time.time())
            self._timer = loop.call_later(delay, self.expire)

    def expire(self, now: float | None = None) -> None:
        """Remove the objects whose retention is over."""
        now = time.time() if now is None else now
        while self._expiry and self._expiry[0][0] <= now:
            _deadline, task_id, finished = self._expiry.popleft()
            obj = self.objects.get(task_id)
            if obj is not None and obj.view.finished == finished and obj.view.finished:
                self.remove(task_id)
        if self._timer is not None:
            self._timer.cancel()
        self._arm()

    def remove(self, task_id: int) -> None:
        obj = self.objects.pop(task_id)
        self._live.get(obj.view.assignment_id, set()).discard(task_id)
        self._handles.pop(task_id).stop()
        # Built here: sdbus 0.14 declares the manager's InterfacesRemoved as "oao" (the
        # specification and sd-bus say "oas"), and a name in it fails to append.
        message = self._bus.new_signal_message(OBJECT_PATH, OBJECT_MANAGER,
                                               "InterfacesRemoved")
        message.append_data("oas", task_path(task_id), [*STANDARD_INTERFACES, TASK_INTERFACE])
        message.send()
