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

from farmnode import __version__
from farmnode.agent import control, workstation
from farmnode.agent.control import journal_output
from farmnode.agent.core import Agent
from farmnode.config import Config
from farmnode.jobfile.queue import JobStore
from farmnode.jobfile.service import JobFiles
from farmnode.master.link import MasterLink
from farmnode.master.trust import TrustedMasters
from farmnode.sysinfo.identity import node_uuid
from farmnode.systemd.scope import ScopeManager
from farmnode.tasks.store import Store

log = logging.getLogger("farmnode")

RESTART_JOBS = {"restart", "try-restart", "reload-or-restart", "try-reload-or-restart"}
WEBHOOK_DRAIN = 5.0  # s a stopping agent gives its webhooks' queues to empty


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
    # Reports are queued (in the change's own transaction) only when a master is configured:
    # standalone, nothing would ever take them out of the outbox.
    store = Store(state_dir / "farmnode.db", outbox=bool(config.master_api))
    if store.get_meta("agent_id") is None:
        # The node's identity: derived from /etc/machine-id (systemd's app-specific way): stable
        # for the installation, and the machine-id itself is not handed to the master
        store.set_meta("agent_id", str(node_uuid()))
    bus = sd_bus_open_system()
    set_default_bus(bus)
    scopes = ScopeManager(bus)
    await scopes.start()
    # Awaited before the bus name is taken and READY=1; meanwhile the agent starts too.
    api = asyncio.create_task(control.api_up(scopes))
    agent = Agent(config, store, scopes)
    slice_max = agent.slice_memory_max_mb()
    if slice_max > 0:
        await scopes.limit_slice(config.task_slice, slice_max * 1024 * 1024)
    else:
        log.warning("node_reserve_ram leaves no memory for tasks; %s is not capped",
                    config.task_slice)
    # The API trusts the master by its address: know it before the master can call, so its
    # first request after our announce is not refused.
    trusted = TrustedMasters(config.agent_api_trusted_masters, config.master_api)
    await trusted.refresh()
    agent.trusted_masters = trusted
    service = Agent1Service(agent)
    service.export_to_dbus(OBJECT_PATH, bus)
    # Webhooks: listening before recovery, which reports what ended while no agent ran.
    webhooks = None
    if config.webhooks:
        from farmnode.webhooks.sender import Webhooks
        webhooks = Webhooks(config, state_dir, lambda: agent.agent_id, lambda: agent.hostname)
        webhooks.attach(agent)
        webhooks.start()
    await agent.recover()
    # Judged before the name is taken: an agent that starts while a user is at the node
    # takes no work, and its tasks stay paused.
    agent.workstation = await workstation.start(config, agent, bus)
    # Job files: the node's own queue without a master, submission to the master with one.
    job_files = JobFiles(agent, JobStore(state_dir / "jobs.db"), config.master_api)
    service.job_files = job_files
    job_files.start()
    # Health checks gate work from the first moment: the node is disabled until every check
    # has passed once since boot; READY waits for their first verdicts (at most START_WAIT).
    from farmnode.health.watch import HealthWatch

    runtime_dir = Path(os.environ.get("RUNTIME_DIRECTORY", config.agent_runtime_dir).split(":")[0])
    health = HealthWatch(bus, config.health_interval,
                         lambda reason: agent.set_hold("health", reason),
                         passed_marker=runtime_dir / "health-passed")
    agent.health = health
    health.verdict_listeners.append(agent.status_changed)
    await health.start()
    await health.settled()
    # The name last: a caller that bus-activated us (dbus-daemon holds its call until the
    # name appears) gets its answer from an agent that is ready, its HTTP API included.
    if await api:
        log.info("HTTP API up (%s)", control.API_SERVICE)
    await request_default_bus_name_async(BUS_NAME)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watchdog())
    log.info("farmnode agent %s ready (id %s), %s", __version__, agent.agent_id, agent.state)
    _notify(f"READY=1\nSTATUS=ready, {agent.state}")

    def on_state(state: object) -> None:
        _notify(f"STATUS={state}, {len(agent.runs)} assignment(s)")

    agent.state_listeners.append(on_state)
    # No master configured: standalone, nothing tries to reach one.
    link = (MasterLink(config, store, agent, log_output=journal_output)
            if config.master_api else None)
    if link is not None:
        agent.master_link = link
        link.start()
    trusted.start()
    accounting = asyncio.create_task(agent.account_periodically())
    await stop.wait()
    # Refused from the first moment: a task accepted now would be stopped or orphaned.
    agent.stop_accepting()
    job_files.stop()  # the next agent takes the queue up where it is
    await trusted.stop()
    job = await scopes.own_pending_job(os.getpid())
    log.info("asked to stop; systemd's job on this unit: %s", job)
    accounting.cancel()
    if agent.workstation is not None:
        await agent.workstation.stop()
    await health.stop()
    if job in RESTART_JOBS:
        # restart, upgrade (try-restart): the tasks run on; the next agent re-adopts them
        _notify(f"STOPPING=1\nSTATUS=restarting, {len(agent.runs)} task scope(s) keep running")
        log.info("restarting: leaving %d assignment(s) running", len(agent.runs))
        await agent.detach()
    else:
        _notify("STOPPING=1\nSTATUS=telling the master we go offline")
        if link is not None:
            # Offline first: the master releases our tasks and assigns us nothing more.
            # Requeued first, it would hand them straight back to this stopping node.
            await link.go_offline()
        _notify("STATUS=stopping tasks")
        log.info("stopping: cancelling %d assignment(s)", len(agent.runs))
        await agent.shutdown()
    if link is not None:
        # Deliver what is queued; "offline" only when the tasks stopped too (a restart
        # leaves them running, and an offline agent's tasks are requeued by the master)
        await link.stop(offline=job not in RESTART_JOBS)
    if job not in RESTART_JOBS:
        _notify("STATUS=closing the HTTP API")
        await control.release_bus_name(bus, BUS_NAME)
        await control.api_down(scopes)
    if webhooks is not None:
        # A stop (not a restart) lets the events of the tasks it stopped go out first,
        # briefly; what is still queued goes out from the next agent.
        await webhooks.stop(drain=0.0 if job in RESTART_JOBS else WEBHOOK_DRAIN)
    watchdog.cancel()
    store.close()


def _stderr_is_journal() -> bool:
    """Whether stderr is journald's stream (systemd says so in JOURNAL_STREAM)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def log_handler() -> logging.Handler:
    """Under systemd, journald's native protocol: a datagram per line, so the agent's lines
    reach a journald that was stopped and started again (a stream on stderr is cut for good
    then, and every later line of the agent was lost), each with its PRIORITY. Elsewhere
    (a terminal, the tests), stderr."""
    if _stderr_is_journal():
        from systemd.journal import JournalHandler

        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="farmnode")
        return handler
    return logging.StreamHandler(sys.stderr)


def run(config: Config) -> int:
    handler = log_handler()
    # journald stamps time and unit itself
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.agent_log_level.upper(), handlers=[handler])
    asyncio.run(serve(config))
    return 0
