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
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar, cast

from farmnode.agent import core
from farmnode.bus.views import (
    AGENT_PROPERTIES,
    AgentFigures,
    AgentView,
    agent_changes,
    changed_properties,
    usec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Emit = Callable[[dict[str, tuple[str, Any]]], None]


def _seconds_or(value: Any, none: float) -> float:
    return float(value) if isinstance(value, (int, float)) else none


def agent_view(agent: core.Agent) -> AgentView:
    link = agent.master_link
    st: dict[str, Any] = {}
    if link is None:
        master, error, contact, queued = "standalone", "", 0, 0
    else:
        st = link.status().get("master_link") or {}
        master = "announced" if st.get("announced") else "unannounced"
        error = str(st.get("last_error") or "")
        contact = _iso_usec(st.get("last_contact"))
        queued = int(st.get("queued_reports") or 0)
    held = [i for ids in agent.gpus_held().values() for i in ids]
    health = (agent.health.status() if agent.health else None) or {}
    ws = agent.workstation.status() if agent.workstation else {}
    return AgentView(
        **_master_fields(link, st), **_health_fields(health), **_workstation_fields(ws),
        agent_hostname=agent.hostname, farm_name=agent.config.farm_name or "",
        state_reason="; ".join(agent.holds.values()),
        jobs=tuple(sorted({r.assignment.job.id for r in agent.runs.values()})),
        gpus=tuple((str(g["id"]), str(g["pci_slot"]), str(g["name"]), str(g["uuid"] or ""),
                    [str(d) for d in g["devices"]], str(g["assignment"] or ""))
                   for g in agent.gpu_status()),
        state=str(agent.state), free_ram=max(agent.free_ram_mb(), 0),
        total_ram=max(agent.total_ram_mb(), 0), cpus=agent.total_cpus(),
        running_tasks=sum(len(r.assignment.tasks) for r in agent.runs.values()),
        assignments=tuple(sorted(agent.runs)), gpus_total=len(agent.gpu_pool.gpus),
        gpus_free=len(agent.gpu_pool.free(held)), master_link=master,
        master_last_error=error, last_master_contact=contact, queued_reports=queued,
        storage_error=agent.storage_error or "")


def _iso_usec(value: Any) -> int:
    """The link's ISO times (milliseconds) as usec: exact, so a client writes them back the
    same."""
    if not isinstance(value, str):
        return 0
    return round(datetime.fromisoformat(value).timestamp() * 1000) * 1000


def _master_fields(link: Any, st: dict[str, Any]) -> dict[str, Any]:
    return {
        "master": str(st.get("master") or "") if link is not None else "",
        "master_agent_id": str(st.get("agent_id") or ""),
        "last_announce": _iso_usec(st.get("last_announce")),
        "master_last_error_at": _iso_usec(st.get("last_error_at")),
        "master_time_offset": int(st.get("time_offset") or 0)}


def _health_fields(health: dict[str, Any]) -> dict[str, Any]:
    return {
        "health_enabled": bool(health), "health_passed_once": bool(health.get("passed_once")),
        "health_interval": float(health.get("interval") or 0.0),
        "health_checks": tuple(
            (str(c["name"]), str(c["unit"]), c["ok"] is not None, bool(c["ok"]),
             str(c["detail"]), [str(line) for line in c["output"]],
             _seconds_or(c["at"], 0.0)) for c in health.get("checks", ()))}


def _workstation_fields(ws: dict[str, Any]) -> dict[str, Any]:
    return {
        "workstation": bool(ws), "workstation_mode": bool(ws.get("mode")),
        "render_schedule": str(ws.get("schedule") or ""),
        "workstation_pause": str(ws.get("pause") or ""),
        "rendering": bool(ws.get("rendering")), "rendering_reason": str(ws.get("reason") or ""),
        "paused_since": _seconds_or(ws.get("paused_since"), 0.0),
        "paused_units": tuple(ws.get("paused_units") or ()),
        "pause_errors": {str(k): str(v) for k, v in (ws.get("pause_errors") or {}).items()},
        "last_pause": _seconds_or(ws.get("last_pause_s"), -1.0),
        "last_resume": _seconds_or(ws.get("last_resume_s"), -1.0),
        "sessions": tuple(
            (str(s["id"]), str(s["user"]), str(s["type"]), str(s["class"]), str(s["seat"]),
             str(s["tty"]), bool(s["remote"]), bool(s["active"]), bool(s["idle_hint"]),
             _seconds_or(s["idle_since"], 0.0), bool(s["counted"]))
            for s in ws.get("sessions") or ())}


def agent_figures(agent: core.Agent) -> AgentFigures:
    fig = agent.figures()
    link = (agent.master_link.status().get("master_link") if agent.master_link else None) or {}
    return AgentFigures(
        uptime=usec(time.time() - agent.started),
        agent_process_ram=int(fig["agent_process_ram"]), consumed_ram=int(fig["consumed_ram"]),
        child_processes=int(fig["child_processes"]),
        disks=[(str(d["mountpoint"]), int(d["size"]), int(d["free"])) for d in fig["disks"]],
        master_requests=int(link.get("requests") or 0),
        master_reports_sent=int(link.get("reports_sent") or 0),
        master_reports_dropped=int(link.get("reports_dropped") or 0))


class AgentProperties:
    def __init__(self, agent: core.Agent, emit: Emit) -> None:
        self._agent = agent
        self._emit = emit
        self._last: AgentView | None = None
        self._pending = False
        self._periodic: asyncio.Task[None] | None = None
        # What was read this turn of the loop (a GetAll reads every property): by kind.
        self._this_turn: dict[str, Any] = {}

    def _once_per_turn(self, kind: str, read: Callable[[], T]) -> T:
        if kind in self._this_turn:
            return cast(T, self._this_turn[kind])
        value = read()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the core alone in a test): nothing is kept
            return value
        if not self._this_turn:
            loop.call_soon(self._this_turn.clear)
        self._this_turn[kind] = value
        return value

    def view(self) -> AgentView:
        """The current values; read once per turn of the loop."""
        return self._once_per_turn("view", lambda: agent_view(self._agent))

    def figures(self) -> AgentFigures:
        """Read once per turn of the loop too: the disks are looked at for each read."""
        return self._once_per_turn("figures", lambda: agent_figures(self._agent))

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
        self._this_turn.pop("view", None)
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
