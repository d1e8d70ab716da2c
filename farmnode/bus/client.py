"""What every client of the typed API needs: the task objects as TaskViews, a task's proxy.

Used by the CLI and the HTTP API alike, so both read tasks the same way.
"""

from __future__ import annotations

from typing import Any

from sdbus.dbus_common_elements import DbusRemoteObjectMeta
from sdbus.dbus_exceptions import DbusFailedError

from farmnode.bus.interface import Agent1Interface
from farmnode.bus.task1 import TASK_INTERFACE, Task1Interface, task_id_of, task_path
from farmnode.bus.views import TaskView

# What a call on a task's object answers when the agent holds no object for that id.
NO_OBJECT = ("org.freedesktop.DBus.Error.UnknownObject",
             "org.freedesktop.DBus.Error.UnknownMethod",
             "org.freedesktop.DBus.Error.UnknownInterface")


def no_such_object(exc: DbusFailedError) -> bool:
    return str(getattr(exc, "dbus_error_name", "")) in NO_OBJECT


def task_proxy(agent: Agent1Interface, task_id: int) -> Task1Interface:
    """The task's object, at the same peer and on the same connection as `agent` (the HTTP
    API talks to the agent's unique name, never the activatable one)."""
    meta = agent._dbus
    assert isinstance(meta, DbusRemoteObjectMeta)
    return Task1Interface.new_proxy(meta.service_name, task_path(task_id), meta.attached_bus)


def views_of(managed: dict[str, dict[str, dict[str, Any]]]) -> list[TaskView]:
    """GetManagedObjects' answer as TaskViews, newest assignment first, then by frame (the
    order the listings always had)."""
    views = []
    for path, interfaces in managed.items():
        props = interfaces.get(TASK_INTERFACE)
        if props is None or task_id_of(path) is None:
            continue
        views.append(TaskView.from_properties({k: v for k, (_sig, v) in props.items()}))
    return sorted(views, key=lambda v: (-v.created, v.frame))


async def task_views(agent: Agent1Interface, active_only: bool = False) -> list[TaskView]:
    """Every task the agent holds an object for; active_only: of the assignments it runs."""
    views = views_of(await agent.get_managed_objects())
    if not active_only:
        return views
    running = set(await agent.assignments)
    return [v for v in views if v.assignment_id in running]
