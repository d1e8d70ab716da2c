"""What every client of the typed API needs: the task objects as TaskViews, a task's proxy.

Used by the CLI and the HTTP API alike, so both read tasks the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
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


def _iso(value: int) -> str | None:
    """A usec timestamp as GetStatus's record writes its times (the master link's)."""
    if not value:
        return None
    return datetime.fromtimestamp(value / 1_000_000, UTC).isoformat(timespec="milliseconds")


async def agent_properties(agent: Agent1Interface) -> dict[str, Any]:
    """org.farmnode.Agent1's properties in one GetAll, by their Python names (a property a
    newer agent has and this client does not know is left out)."""
    props: dict[str, Any] = await agent.properties_get_all_dict(on_unknown_member="ignore")
    return props


class MissingProperty(Exception):
    """The agent has no such property: it is older than this client."""


class _Properties(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        name = getattr(Agent1Interface.__dict__.get(key), "property_name", key)
        raise MissingProperty(f"the agent has no property {name} (it is older than this "
                              "client): upgrade farmnode on the node")


def status_record(props: dict[str, Any]) -> dict[str, Any]:
    """The agent's properties as the record GetStatus has always answered (the same keys in
    the same order, the same values)."""
    p = _Properties(props)
    health = None if not p["health_enabled"] else {
        "passed_once": p["health_passed_once"], "interval": p["health_interval"],
        "checks": [{"name": name, "unit": unit, "ok": ok if ran else None, "detail": detail,
                    "output": list(output), "at": at if ran else None}
                   for name, unit, ran, ok, detail, output, at in p["health_checks"]]}
    workstation = None if not p["workstation"] else {
        "mode": p["workstation_mode"], "schedule": p["render_schedule"] or None,
        "pause": p["workstation_pause"], "rendering": p["rendering"],
        "reason": p["rendering_reason"], "paused_since": p["paused_since"] or None,
        "paused_units": list(p["paused_units"]), "pause_errors": dict(p["pause_errors"]),
        "last_pause_s": None if p["last_pause"] < 0 else p["last_pause"],
        "last_resume_s": None if p["last_resume"] < 0 else p["last_resume"],
        "sessions": [{"id": sid, "user": user, "type": kind, "class": cls, "seat": seat,
                      "tty": tty, "remote": remote, "active": active, "idle_hint": idle,
                      "idle_since": since or None, "counted": counted}
                     for sid, user, kind, cls, seat, tty, remote, active, idle, since, counted
                     in p["sessions"]]}
    if p["master_link"] == "standalone":
        master: dict[str, Any] = {"master_link": None}
    else:
        link = {
            "master": p["master"], "agent_id": p["master_agent_id"],
            "announced": p["master_link"] == "announced",
            "last_contact": _iso(p["last_master_contact"]),
            "last_announce": _iso(p["last_announce"]), "queued_reports": p["queued_reports"],
            "last_error": p["master_last_error"] or None,
            "last_error_at": _iso(p["master_last_error_at"]),
            "time_offset": p["master_time_offset"], "requests": p["master_requests"],
            "reports_sent": p["master_reports_sent"],
            "reports_dropped": p["master_reports_dropped"]}
        master = {"master_link": link, "last_master_contact": link["last_contact"],
                  "last_announce": link["last_announce"]}
    return {
        "state": p["state"], "health": health, "agent_id": p["agent_id"],
        "agent_hostname": p["agent_hostname"], "version": p["version"],
        "free_ram": p["free_ram"], "ram": p["total_ram"], "cpus": p["cpus"],
        "agent_process_ram": p["agent_process_ram"], "consumed_ram": p["consumed_ram"],
        "child_processes": p["child_processes"], "pids": [p["main_pid"]],
        "uptime": p["uptime"] / 1_000_000, "jobs": list(p["jobs"]),
        "assignments": list(p["assignments"]), "running_tasks": p["running_tasks"],
        "gpus": [{"id": gid, "pci_slot": slot, "name": name, "uuid": uuid or None,
                  "devices": list(devices), "assignment": holder or None}
                 for gid, slot, name, uuid, devices, holder in p["gpus"]],
        "farm_name": p["farm_name"] or None, "storage_error": p["storage_error"] or None,
        "state_reason": p["state_reason"] or None, "workstation": workstation,
        "disks": [{"mountpoint": mount, "size": size, "free": free}
                  for mount, size, free in p["disks"]],
        **master,
    }
