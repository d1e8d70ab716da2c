"""The API's only way to the agent: org.farmnode.Agent1 on the system bus.

gunicorn's gthread workers serve requests on a pool of threads; sd-bus connections and
asyncio loops are not shared between threads, so each thread has its own pair.

Calls go to the agent's *unique* bus name, looked up first: a call to the well-known name
would make dbus-daemon start farmnode.service through bus activation, and the API must not
bring back an agent that was stopped on purpose (POST /api/v1/stop). No owner means 503,
unless systemd is restarting the agent: then the request waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sdbus import (
    DbusInterfaceCommonAsync,
    SdBus,
    dbus_method_async,
    dbus_signal_async,
    sd_bus_open_system,
)
from sdbus.dbus_exceptions import DbusFailedError, DbusNameHasNoOwnerError
from sdbus.sd_bus_internals import SdBusLibraryError

from farmnode.api.errors import ApiError, from_dbus
from farmnode.bus.client import no_such_object, task_proxy
from farmnode.bus.interface import BUS_NAME, OBJECT_PATH, Agent1Interface
from farmnode.bus.task1 import Task1Interface
from farmnode.systemd.manager import SYSTEMD, JobProxy, UnitProxy

log = logging.getLogger("farmnode.api")
T = TypeVar("T")
DBUS = "org.freedesktop.DBus"
# farmnode.service's object (systemd escapes "." as _2e).
AGENT_UNIT_PATH = "/org/freedesktop/systemd1/unit/farmnode_2eservice"
COMING_BACK_JOBS = {"start", "restart", "try-restart", "reload-or-start", "reload-or-restart",
                    "try-reload-or-restart"}
# A restart with running tasks takes about a second (bench/REPORT.md); well under the
# master's request timeout.
RESTART_WAIT = 10.0


class DbusDaemon(DbusInterfaceCommonAsync, interface_name=DBUS):
    @dbus_method_async(input_signature="s", result_signature="s")
    async def get_name_owner(self, name: str) -> str:
        raise NotImplementedError

    @dbus_signal_async("sss")
    def name_owner_changed(self) -> tuple[str, str, str]:
        raise NotImplementedError


class _Local(threading.local):
    loop: asyncio.AbstractEventLoop | None = None
    bus: SdBus | None = None


_local = _Local()


def connection() -> tuple[asyncio.AbstractEventLoop, SdBus]:
    """This thread's loop and bus connection, opened on first use."""
    if _local.loop is None or _local.bus is None:
        _local.loop = asyncio.new_event_loop()
        _local.bus = sd_bus_open_system()
    return _local.loop, _local.bus


def reset() -> None:
    """Drop this thread's connection (after a bus failure); the next call opens a new one."""
    if _local.bus is not None:
        with contextlib.suppress(Exception):
            _local.bus.close()
    if _local.loop is not None:
        _local.loop.close()
    _local.loop = _local.bus = None


async def agent_proxy(bus: SdBus) -> Agent1Interface:
    daemon = DbusDaemon.new_proxy(DBUS, "/org/freedesktop/DBus", bus)
    try:
        owner = await daemon.get_name_owner(BUS_NAME)
    except DbusNameHasNoOwnerError:
        owner = await _restarted_agent(bus, daemon)
    return Agent1Interface.new_proxy(owner, OBJECT_PATH, bus)


async def _restarted_agent(bus: SdBus, daemon: DbusDaemon) -> str:
    """The agent's unique name once a restarting agent is back, so a restart (`systemctl
    restart farmnode`, an upgrade, a crash that systemd restarts) costs the master a slower
    answer rather than a 503. An agent that is stopped, or stopping for good, is 503 at
    once."""
    back = asyncio.Event()

    def on_owner(message: Any) -> None:
        name, _old, new = message.get_contents()
        if name == BUS_NAME and new:
            back.set()

    # Subscribed before anything is asked, so an agent that comes back meanwhile is seen.
    slot = await bus.match_signal_async(DBUS, "/org/freedesktop/DBus", DBUS,
                                        "NameOwnerChanged", on_owner)
    try:
        if await _agent_coming_back(bus):
            with contextlib.suppress(DbusNameHasNoOwnerError):
                return await daemon.get_name_owner(BUS_NAME)
            log.warning("the agent is restarting: a request waits for it (up to %gs)",
                        RESTART_WAIT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(back.wait(), RESTART_WAIT)
                return await daemon.get_name_owner(BUS_NAME)
    finally:
        del slot
    raise ApiError(503, "the farmnode agent is not running")


async def _agent_coming_back(bus: SdBus) -> bool:
    """Whether systemd is (re)starting farmnode.service: a start or restart job on it, or
    the wait before an automatic restart (Restart=). Read from systemd's unit object, which
    anyone may read; nothing here starts a unit."""
    unit = UnitProxy.new_proxy(SYSTEMD, AGENT_UNIT_PATH, bus)
    try:
        job_id, job_path = await unit.job
        if job_id:
            job_type = await JobProxy.new_proxy(SYSTEMD, job_path, bus).job_type
            return job_type in COMING_BACK_JOBS
        return await unit.active_state == "activating"
    except DbusFailedError:
        return False  # the unit or its job went meanwhile: not worth waiting on


def call(fn: Callable[[Agent1Interface], Awaitable[T]]) -> T:
    """One request's calls to the agent, on this thread's loop; errors become ApiErrors."""

    async def with_agent(bus: SdBus) -> T:
        return await fn(await agent_proxy(bus))

    return call_with_bus(with_agent)


def call_task(task_id: int, fn: Callable[[Task1Interface], Awaitable[T]]) -> T:
    """A call on a task's object (org.farmnode.Task1); 404 when the agent holds none."""

    async def with_task(bus: SdBus) -> T:
        task = task_proxy(await agent_proxy(bus), task_id)
        try:
            return await fn(task)
        except DbusFailedError as exc:
            if no_such_object(exc):
                raise ApiError(404, f"no task {task_id} on this node") from None
            raise

    return call_with_bus(with_task)


def call_with_bus(fn: Callable[[SdBus], Awaitable[T]]) -> T:
    """Like `call`, for work that needs the connection itself (signal matches)."""
    loop, bus = connection()
    try:
        return loop.run_until_complete(fn(bus))
    except ApiError:
        raise
    except DbusFailedError as exc:
        if str(getattr(exc, "dbus_error_name", "")).endswith(".Disconnected"):
            reset()  # sd-bus's own reply for a connection that is gone
        raise from_dbus(exc) from None
    except SdBusLibraryError as exc:
        # Not an answer from the agent: the connection itself failed. Start afresh next time.
        log.warning("D-Bus call failed, reconnecting: %s", exc, exc_info=True)
        reset()
        raise ApiError(503, f"the system bus is not reachable: {exc}") from None
    except Exception as exc:
        # An error reply sdbus turned into a Python exception (org.python.Error.*: the agent
        # failed on its side) or a fault of ours: the connection is fine and stays.
        log.warning("D-Bus call failed: %s", exc, exc_info=True)
        raise ApiError(502, f"the agent failed: {type(exc).__name__}: {exc}"[:500]) from None


def run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine on this thread's loop (event streams, waits)."""
    loop, _bus = connection()
    return loop.run_until_complete(coro)
