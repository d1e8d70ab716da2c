"""What fleet control asks of one node's agent: the only module that calls the D-Bus API.

The status is the agent object's typed properties (one GetAll), the tasks are the task
objects its ObjectManager lists (one GetManagedObjects); both are decoded here, through the
same code as `farmnode status`/`tasks` (farmnode.bus.client), into the shapes fleet control
prints, so a change of the API is a change of this module alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from sdbus import SdBusLibraryError

from farmnode.bus.client import MissingProperty, agent_properties, status_record, task_views
from farmnode.bus.interface import BUS_NAME, INTERFACE, OBJECT_PATH, Agent1Interface
from farmnode.fleet.target import library_error

T = TypeVar("T")


class Refused(Exception):
    """The agent (or the bus in front of it) answered with an error."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name  # the D-Bus error name


class Lost(Exception):
    """No answer: the connection to the node failed or closed (ssh, the bridge, the bus)."""


# Errors that say the node was never reached or went away, rather than that it said no.
_LOST = ("NoReply", "Disconnected", "ServiceUnknown", "NameHasNoOwner", "Timeout",
         "TimedOut", "NoServer", "Spawn.ServiceNotFound", "Spawn.ChildExited")


def _decode_error(exc: Exception) -> Exception:
    name = str(getattr(exc, "dbus_error_name", "") or "")
    msg = str(exc.args[0] if exc.args else exc)
    if not name:
        # sd-bus's own failures on a broken connection carry an errno, not a D-Bus name
        return Lost(library_error(exc)) if isinstance(exc, SdBusLibraryError) else exc
    if name.endswith(_LOST):
        if name.endswith(("ServiceUnknown", "NameHasNoOwner", "Spawn.ServiceNotFound")):
            return Lost(f"the farmnode agent is not on this node's bus: {msg}")
        return Lost(msg)
    if name.endswith("AccessDenied"):
        return Refused(name, f"permission denied: {msg}")
    return Refused(name, msg)


@dataclass(frozen=True)
class Status:
    state: str
    assignments: tuple[str, ...]
    running_tasks: int
    raw: dict[str, Any]


class NodeAgent:
    """One node's agent, over whichever bus reaches it."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self._proxy: Any = Agent1Interface.new_proxy(BUS_NAME, OBJECT_PATH, bus)
        self._slots: list[Any] = []

    async def _call(self, name: str, *args: Any) -> Any:
        return await self._answer(getattr(self._proxy, name)(*args))

    async def _answer(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:
            decoded = _decode_error(exc)
            if decoded is exc:
                raise
            raise decoded from None

    async def status(self) -> Status:
        props = await self._answer(agent_properties(self._proxy))
        try:
            raw = status_record(props)
        except MissingProperty as exc:
            raise Refused("", str(exc)) from None
        return Status(state=str(props["state"]), assignments=tuple(props["assignments"]),
                      running_tasks=int(props["running_tasks"]), raw=raw)

    async def tasks(self, active_only: bool = False) -> list[dict[str, Any]]:
        views = await self._answer(task_views(self._proxy, active_only))
        return [v.to_record_dict() for v in views]

    async def cancel(self, task_id: int) -> bool | None:
        """True: stopping; False: the node has it but it is not running; None: the node
        never had it."""
        try:
            return bool(await self._call("cancel_task", task_id))
        except Refused as exc:
            if exc.name == f"{INTERFACE}.Error.UnknownTask":
                return None
            raise

    async def set_state(self, state: str) -> None:
        await self._call("set_state", state)

    async def watch_idle(self) -> asyncio.Queue[str]:
        """A queue that gets "idle" when the agent's last assignment ends and "restarted"
        when another agent process takes the bus name; in place before it returns, so a
        snapshot taken after it cannot miss a change."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        try:
            self._slots.append(await self.bus.match_signal_async(
                BUS_NAME, OBJECT_PATH, INTERFACE, "Idle", lambda _m: queue.put_nowait("idle")))

            def owner_changed(m: Any) -> None:
                name, _old, new = m.get_contents()
                if name == BUS_NAME and new:
                    queue.put_nowait("restarted")

            self._slots.append(await self.bus.match_signal_async(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "NameOwnerChanged", owner_changed))
        except Exception as exc:
            decoded = _decode_error(exc)
            if decoded is exc:
                raise
            raise decoded from None
        return queue
