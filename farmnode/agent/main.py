"""farmnode.service's process: config, store, bus name, sd_notify, signals, watchdog."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from sdbus import request_default_bus_name_async, sd_bus_open_system, set_default_bus
from systemd import daemon

from farmnode.agent.core import Agent
from farmnode.config import Config
from farmnode.systemd.scope import ScopeManager
from farmnode.tasks.store import Store

log = logging.getLogger("farmnode")


def _notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        daemon.notify(message)


async def _watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    if not usec:
        return
    # Pinging from the event loop means a wedged loop stops the pings and systemd restarts us.
    while True:
        _notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2_000_000)


async def serve(config: Config) -> None:
    # Imported here: the bus layer sits above the core, and only this entry point joins them.
    from farmnode.bus.interface import BUS_NAME, OBJECT_PATH
    from farmnode.bus.service import Agent1Service

    state_dir = Path(os.environ.get("STATE_DIRECTORY", config.agent_state_dir).split(":")[0])
    store = Store(state_dir / "farmnode.db")
    bus = sd_bus_open_system()
    set_default_bus(bus)
    scopes = ScopeManager(bus)
    await scopes.start()
    agent = Agent(config, store, scopes)
    service = Agent1Service(agent)
    service.export_to_dbus(OBJECT_PATH, bus)
    await agent.recover()
    await request_default_bus_name_async(BUS_NAME)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watchdog())
    log.info("farmnode agent %s ready (id %s)", agent.agent_id, agent.state)
    _notify(f"READY=1\nSTATUS=ready, {agent.state}")

    def on_state(state: object) -> None:
        _notify(f"STATUS={state}, {len(agent.runs)} assignment(s)")

    agent.state_listeners.append(on_state)
    await stop.wait()
    _notify("STOPPING=1\nSTATUS=stopping tasks")
    log.info("stopping: cancelling %d assignment(s)", len(agent.runs))
    await agent.shutdown()
    watchdog.cancel()
    store.close()


def run(config: Config) -> int:
    logging.basicConfig(
        level=config.agent_log_level.upper(),
        stream=sys.stderr,
        # journald stamps time and unit itself
        format="%(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(config))
    return 0
