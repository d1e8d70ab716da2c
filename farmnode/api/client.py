"""The API's only way to the agent: org.farmnode.Agent1 on the system bus.

gunicorn's gthread workers serve requests on a pool of threads; sd-bus connections and
asyncio loops are not shared between threads, so each thread has its own pair.

Calls go to the agent's *unique* bus name, looked up first: a call to the well-known name
would make dbus-daemon start farmnode.service through bus activation, and the API must not
bring back an agent that was stopped on purpose (POST /api/v1/stop). No owner means 503.
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
from farmnode.bus.interface import BUS_NAME, OBJECT_PATH, Agent1Interface

log = logging.getLogger("farmnode.api")
T = TypeVar("T")
DBUS = "org.freedesktop.DBus"


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
    except DbusFailedError as exc:
        if isinstance(exc, DbusNameHasNoOwnerError):
            raise ApiError(503, "the farmnode agent is not running") from None
        raise
    return Agent1Interface.new_proxy(owner, OBJECT_PATH, bus)


def call(fn: Callable[[Agent1Interface], Awaitable[T]]) -> T:
    """One request's calls to the agent, on this thread's loop; errors become ApiErrors."""

    async def with_agent(bus: SdBus) -> T:
        return await fn(await agent_proxy(bus))

    return call_with_bus(with_agent)


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
