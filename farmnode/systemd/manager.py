"""Proxy for org.freedesktop.systemd1.Manager and the unit and job properties we read.

sdbus-systemd covers only part of Manager; the few members we need are declared here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sdbus import (
    DbusInterfaceCommonAsync,
    SdBus,
    dbus_method_async,
    dbus_property_async,
)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"

# a(sv) as sdbus expects it: (name, (signature, value))
UnitProperty = tuple[str, tuple[str, Any]]


class ManagerProxy(DbusInterfaceCommonAsync, interface_name=MANAGER_IFACE):
    @dbus_method_async(input_signature="ssa(sv)a(sa(sv))", result_signature="o")
    async def start_transient_unit(
        self, name: str, mode: str, properties: list[UnitProperty],
        aux: list[tuple[str, list[UnitProperty]]],
    ) -> str:
        raise NotImplementedError

    @dbus_method_async(input_signature="sba(sv)")
    async def set_unit_properties(self, name: str, runtime: bool,
                                  properties: list[UnitProperty]) -> None:
        raise NotImplementedError

    @dbus_method_async(input_signature="ss", result_signature="o")
    async def start_unit(self, name: str, mode: str) -> str:
        raise NotImplementedError

    @dbus_method_async(input_signature="ss", result_signature="o")
    async def stop_unit(self, name: str, mode: str) -> str:
        raise NotImplementedError

    @dbus_method_async(input_signature="ssi")
    async def kill_unit(self, name: str, whom: str, signal: int) -> None:
        raise NotImplementedError

    @dbus_method_async()
    async def subscribe(self) -> None:
        raise NotImplementedError

    @dbus_method_async(input_signature="u", result_signature="o", method_name="GetUnitByPID")
    async def get_unit_by_pid(self, pid: int) -> str:
        raise NotImplementedError

    # The freezer (workstation mode): answered once the cgroup is frozen or thawed.
    @dbus_method_async(input_signature="s")
    async def freeze_unit(self, name: str) -> None:
        raise NotImplementedError

    @dbus_method_async(input_signature="s")
    async def thaw_unit(self, name: str) -> None:
        raise NotImplementedError


class UnitProxy(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Unit"):
    @dbus_property_async("s")
    def active_state(self) -> str:
        raise NotImplementedError

    @dbus_property_async("(uo)")
    def job(self) -> tuple[int, str]:
        raise NotImplementedError


class JobProxy(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Job"):
    @dbus_property_async("s")
    def job_type(self) -> str:
        raise NotImplementedError


class JobWatcher:
    """Turns systemd's JobRemoved signals into awaitable results.

    The match is installed before any job is started, and results that arrive before anyone
    awaits them are kept, because the signal can be dispatched before the StartTransientUnit
    reply resumes its caller.
    """

    def __init__(self, bus: SdBus, unit_prefix: str | tuple[str, ...]) -> None:
        self._bus = bus
        self._prefix = unit_prefix
        self._results: dict[str, str] = {}
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._slot: Any = None

    async def start(self, manager: ManagerProxy) -> None:
        self._slot = await self._bus.match_signal_async(
            SYSTEMD, MANAGER_PATH, MANAGER_IFACE, "JobRemoved", self._on_job_removed
        )
        await manager.subscribe()

    def _on_job_removed(self, message: Any) -> None:
        _id, job_path, unit, result = message.get_contents()
        if not unit.startswith(self._prefix):
            return
        waiter = self._waiters.pop(job_path, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        else:
            self._results[job_path] = result

    async def wait(self, job_path: str, timeout: float = 30) -> str:
        if job_path in self._results:
            return self._results.pop(job_path)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job_path] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(job_path, None)
