"""The agent object's changing properties: read from the core, PropertiesChanged on change.

The values are read live on every Get. What changed is found by comparing a fresh AgentView
with the one last signalled: after any state or task change (coalesced to one look per turn
of the event loop, so a 5,000-task assignment ending costs one), and every
agent_ram_check_interval for what changes on its own (free RAM, the master link).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from farmnode.agent import core
from farmnode.bus.views import AGENT_PROPERTIES, AgentView, agent_changes, changed_properties, usec

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, tuple[str, Any]]], None]


def agent_view(agent: core.Agent) -> AgentView:
    link = agent.master_link
    if link is None:
        master, error, contact, queued = "standalone", "", 0, 0
    else:
        st = link.status().get("master_link") or {}
        master = "announced" if st.get("announced") else "unannounced"
        error = str(st.get("last_error") or "")
        last = getattr(link, "last_contact", None)
        contact = usec(last) if isinstance(last, (int, float)) else 0
        queued = int(st.get("queued_reports") or 0)
    held = [i for ids in agent.gpus_held().values() for i in ids]
    return AgentView(
        state=str(agent.state), free_ram=max(agent.free_ram_mb(), 0),
        total_ram=max(agent.total_ram_mb(), 0), cpus=agent.total_cpus(),
        running_tasks=sum(len(r.assignment.tasks) for r in agent.runs.values()),
        assignments=tuple(sorted(agent.runs)), gpus_total=len(agent.gpu_pool.gpus),
        gpus_free=len(agent.gpu_pool.free(held)), master_link=master,
        master_last_error=error, last_master_contact=contact, queued_reports=queued,
        storage_error=agent.storage_error or "")


class AgentProperties:
    def __init__(self, agent: core.Agent, emit: Emit) -> None:
        self._agent = agent
        self._emit = emit
        self._last: AgentView | None = None
        self._pending = False
        self._periodic: asyncio.Task[None] | None = None
        self._cached: AgentView | None = None

    def view(self) -> AgentView:
        """The current values; read once per turn of the loop (a GetAll reads every one)."""
        if self._cached is not None:
            return self._cached
        view = agent_view(self._agent)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the core alone in a test): nothing is kept
            return view
        self._cached = view
        loop.call_soon(self._forget)
        return view

    def _forget(self) -> None:
        self._cached = None

    def start(self) -> None:
        self._last = self.view()
        self._periodic = asyncio.get_running_loop().create_task(self._every_interval())

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()

    def changed(self) -> None:
        """Something may have changed: look once this turn of the loop is over."""
        if self._pending:
            return
        self._pending = True
        try:
            asyncio.get_running_loop().call_soon(self.refresh)
        except RuntimeError:  # no loop (the core alone in a test): look now
            self.refresh()

    def refresh(self) -> None:
        self._pending = False
        self._cached = None
        new = self.view()
        if self._last is None:
            self._last = new
            return
        fields = agent_changes(self._last, new, self._agent.config.agent_ram_report_delta)
        if "free_ram" not in fields:  # compared with the last value signalled, not read
            new = dataclasses.replace(new, free_ram=self._last.free_ram)
        self._last = new
        if fields:
            self._emit(changed_properties(new, fields, AGENT_PROPERTIES))

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._agent.config.agent_ram_check_interval)
            try:
                self.refresh()
            except Exception:  # a property that cannot be read now; the next look retries
                log.exception("reading the agent's properties failed")
