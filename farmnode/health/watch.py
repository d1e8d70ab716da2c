"""The agent's side of the health checks: it runs the checks' units and learns their verdicts
from systemd, over the D-Bus connection the agent already has.

The checks are the services farmnode-health.target wants or requires (the built-in ones, and
an admin's own units with WantedBy=farmnode-health.target) plus one
farmnode-health@NAME.service per executable in /etc/farmnode/health.d. Each round (at start,
then every health_interval) starts them all; whoever starts one (a round, an admin's timer,
`systemctl start`), its verdict arrives as systemd's JobRemoved for the unit, and is read
from the unit's own properties (Result, ExecMainStatus) and the journal lines of that run.
A hung check is systemd's to kill (TimeoutStartSec=); it then fails with Result=timeout like
any other failure. Nothing of a check runs in the agent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbus import SdBus

from farmnode.systemd.manager import MANAGER_IFACE, MANAGER_PATH, SYSTEMD

log = logging.getLogger(__name__)

TARGET = "farmnode-health.target"
TEMPLATE = "farmnode-health@{}.service"
HEALTH_D = Path("/etc/farmnode/health.d")
# run-parts' rule for names, so editor backups and dpkg leftovers (x~, x.dpkg-old) never run.
DROPIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
OUTPUT_LINES = 5  # of a check's last run, in its verdict
OUTPUT_CHARS = 300  # per line
# Before it says READY the agent waits this long for every check's first verdict; beyond it
# the node starts disabled and waits on.
START_WAIT = 30.0
JOURNAL_SYNC_TIMEOUT = 2.0

UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
RUNNING = ("activating", "deactivating", "reloading")


@dataclass(frozen=True)
class Verdict:
    unit: str
    ok: bool
    detail: str  # what systemd says of the run: "passed", "exited with status 1", ...
    output: tuple[str, ...]
    at: float  # wall clock

    @property
    def name(self) -> str:
        prefix, suffix = TEMPLATE.split("{}")
        if self.unit.startswith(prefix) and self.unit.endswith(suffix):
            return self.unit[len(prefix):-len(suffix)]
        return self.unit

    @property
    def reason(self) -> str:
        text = f"health check {self.name} {self.detail}"
        return text + (f": {' | '.join(self.output)}" if self.output else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "ok": self.ok, "detail": self.detail,
                "output": list(self.output), "at": self.at}


def describe(result: str, code: int, status: int, timeout_usec: int) -> str:
    """systemd's Result of a service run, in words."""
    if result == "success":
        return "passed"
    if result == "exit-code":
        return f"exited with status {status}"
    if result == "timeout":
        limit = f" {timeout_usec / 1e6:g} s" if 0 < timeout_usec < 2**63 else ""
        return f"did not finish within its timeout{limit} (TimeoutStartSec=) and was killed"
    if result in ("signal", "core-dump"):
        with contextlib.suppress(ValueError):
            return (f"was killed by {signal.Signals(status).name}"
                    + (" and dumped core" if result == "core-dump" else ""))
        return f"was killed by signal {status}"
    return f"failed (systemd's result: {result})"


def dropin_units(directory: Path = HEALTH_D, warned: set[str] | None = None) -> list[str]:
    """farmnode-health@NAME.service for each executable NAME in the directory."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s: %s", directory, exc)
        return []
    out = []
    for name in names:
        path = directory / name
        skip = None
        if not DROPIN_NAME.fullmatch(name):
            skip = "its name is not letters, digits, _ and - (run-parts' rule)"
        elif not path.is_file() or not os.access(path, os.X_OK):
            skip = "it is not an executable file"
        if skip is None:
            out.append(TEMPLATE.format(name))
        elif warned is not None and name not in warned:
            warned.add(name)
            log.warning("health check %s ignored: %s", path, skip)
    return out


def run_output(unit: str, invocation: str, since: float,
               lines: int = OUTPUT_LINES) -> tuple[str, ...]:
    """The last lines a run of the unit wrote to the journal: the run `invocation` names (a
    failed unit keeps it), else the unit's latest run, if it wrote anything after `since`
    (wall clock; a unit that passed is unloaded at once, its invocation id with it). Blocks:
    run it in a thread."""
    from systemd import journal

    reader = journal.Reader(flags=journal.SYSTEM)
    try:
        reader.this_boot()
        if not invocation:
            reader.add_match(_SYSTEMD_UNIT=unit)
            reader.seek_tail()
            latest = reader.get_previous()
            stamp = latest.get("__REALTIME_TIMESTAMP") if latest else None
            if not latest or stamp is None or stamp.timestamp() < since:
                return ()
            invocation = str(latest.get("_SYSTEMD_INVOCATION_ID", ""))
            reader.flush_matches()
            reader.this_boot()
            if not invocation:
                return ()
        reader.add_match(_SYSTEMD_INVOCATION_ID=invocation.replace("-", ""))
        reader.seek_tail()
        out: collections.deque[str] = collections.deque()
        while len(out) < lines:
            entry = reader.get_previous()
            if not entry:
                break
            message = entry.get("MESSAGE", "")
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            out.appendleft(str(message).strip()[:OUTPUT_CHARS])
        return tuple(out)
    finally:
        reader.close()


_PASSED = Verdict("", True, "passed", (), 0)


def journal_sync() -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["journalctl", "--sync"], check=False, timeout=JOURNAL_SYNC_TIMEOUT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class HealthWatch:
    def __init__(self, bus: SdBus, interval: float, on_change: Callable[[str | None], None],
                 checks_dir: Path = HEALTH_D, passed_marker: Path | None = None) -> None:
        self.bus = bus
        # In /run: "the checks have passed once since boot", so a restarted agent (an upgrade,
        # a crash) does not wait for a round before it takes work again. A check that failed
        # stays failed in systemd (a failed unit keeps its state), so the restart sees it.
        self.passed_marker = passed_marker
        self.interval = interval
        self.on_change = on_change
        # Told of every verdict, a passing check's new output too (on_change: the hold alone).
        self.verdict_listeners: list[Callable[[], None]] = []
        self.checks_dir = checks_dir
        self.enabled = False
        self.units: list[str] = []
        self.verdicts: dict[str, Verdict] = {}
        self.passed_once = False
        self.reason: str | None = None
        self._settled = asyncio.Event()
        # Units with a verdict of this agent's own rounds: a failing verdict from before a
        # restart does not end the wait before READY (a fresh run may pass).
        self._fresh: set[str] = set()
        self._warned: set[str] = set()
        self._slot: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # ---- systemd over D-Bus (raw calls: farmnode.systemd.manager declares the interfaces) --
    async def _call(self, path: str, iface: str, member: str, signature: str = "",
                    *args: Any) -> Any:
        message = self.bus.new_method_call_message(SYSTEMD, path, iface, member)
        if signature:
            message.append_data(signature, *args)
        reply = await self.bus.call_async(message)
        return reply.get_contents()

    async def _properties(self, unit: str, iface: str) -> dict[str, Any]:
        path = await self._call(MANAGER_PATH, MANAGER_IFACE, "LoadUnit", "s", unit)
        props = await self._call(path, PROPERTIES_IFACE, "GetAll", "s", iface)
        return {name: value for name, (_sig, value) in props.items()}

    async def check_units(self) -> list[str] | None:
        """The checks now; None when farmnode-health.target is not installed (or masked)."""
        target = await self._properties(TARGET, UNIT_IFACE)
        if target.get("LoadState") != "loaded":
            return None
        wanted = {*target.get("Wants", ()), *target.get("Requires", ()),
                  *target.get("ConsistsOf", ())}
        candidates = sorted(u for u in wanted if u.endswith(".service"))
        candidates += [u for u in dropin_units(self.checks_dir, self._warned)
                       if u not in wanted]
        out = []
        for unit in candidates:
            state = (await self._properties(unit, UNIT_IFACE)).get("LoadState")
            if state == "loaded":
                out.append(unit)
            elif state != "masked" and unit not in self._warned:
                self._warned.add(unit)
                log.warning("health check %s is not loaded (%s): left out", unit, state)
        return out

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Read the checks and any verdicts from before this agent started (a restart), then
        start the first round. No target: no gating, said once."""
        self._slot = await self.bus.match_signal_async(
            SYSTEMD, MANAGER_PATH, MANAGER_IFACE, "JobRemoved", self._on_job_removed)
        try:
            units = await self.check_units()
        except Exception as exc:
            log.error("cannot read %s from systemd (%s): health checks do not gate work",
                      TARGET, exc)
            return
        if units is None:
            log.warning("%s is not installed: health checks do not gate work", TARGET)
            return
        self.enabled = True
        self.units = units
        if self.passed_marker is not None and self.passed_marker.exists():
            self.passed_once = True
        for unit in units:
            await self._conclude(unit, only_if_ran=True)
        self._publish()
        self._loop_task = asyncio.get_running_loop().create_task(self._rounds())

    async def settled(self, timeout: float = START_WAIT) -> None:
        """Until every check has a verdict (or they passed once), at most `timeout` s."""
        if self.enabled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout)

    async def stop(self) -> None:
        for task in [*self._pending, *([self._loop_task] if self._loop_task else [])]:
            task.cancel()

    async def _rounds(self) -> None:
        # Every check every interval, failing or not (as Slurm's HealthCheckInterval): while
        # journald is away, systemd writes its lines about each run to the console instead.
        # To check again now: systemctl start farmnode-health@NAME.service.
        while True:
            await self.round()
            await asyncio.sleep(self.interval)

    async def round(self) -> None:
        try:
            units = await self.check_units()
        except Exception as exc:
            log.error("health round: cannot read the checks from systemd: %s", exc)
            return
        self.units = units or []
        for gone in set(self.verdicts) - set(self.units):
            del self.verdicts[gone]
        for unit in self.units:
            try:
                await self._call(MANAGER_PATH, MANAGER_IFACE, "StartUnit", "ss", unit,
                                 "replace")
            except Exception as exc:  # e.g. a unit file that does not parse
                self.verdicts[unit] = Verdict(unit, False, f"could not be started ({exc})",
                                              (), time.time())
                self._fresh.add(unit)
        self._publish()

    # ---- verdicts ---------------------------------------------------------------------
    def _on_job_removed(self, message: Any) -> None:
        _id, _job, unit, _result = message.get_contents()
        if unit in self.units:
            task = asyncio.get_running_loop().create_task(self._conclude(unit))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _conclude(self, unit: str, only_if_ran: bool = False) -> None:
        try:
            props = await self._properties(unit, UNIT_IFACE)
            service = await self._properties(unit, SERVICE_IFACE)
        except Exception as exc:
            log.warning("health check %s: cannot read its state from systemd: %s", unit, exc)
            return
        if props.get("ActiveState") in RUNNING:
            return  # a run in progress: its own JobRemoved comes
        if only_if_ran and not service.get("ExecMainStartTimestampMonotonic"):
            return
        if not only_if_ran:
            self._fresh.add(unit)
        result = str(service.get("Result", ""))
        ok = result == "success" and props.get("ActiveState") != "failed"
        detail = describe(result, int(service.get("ExecMainCode", 0)),
                          int(service.get("ExecMainStatus", 0)),
                          int(service.get("TimeoutStartUSec", 0)))
        # Kept by a failed unit; a unit that passed is unloaded, so its run is found by name.
        invocation = bytes(props.get("InvocationID", b"")).hex().strip("0")
        invocation = bytes(props.get("InvocationID", b"")).hex() if invocation else ""
        previous = self.verdicts.get(unit)
        since = previous.at if previous is not None else 0.0
        output = await asyncio.to_thread(run_output, unit, invocation, since)
        if not output:
            # journald may not have read the check's stream yet: have it write what it was
            # handed (as the task logs do), then look once more.
            await asyncio.to_thread(journal_sync)
            output = await asyncio.to_thread(run_output, unit, invocation, since)
        if unit not in self.units:
            return  # removed meanwhile
        self.verdicts[unit] = Verdict(unit, ok, detail, output, time.time())
        self._publish()

    def _publish(self) -> None:
        for cb in self.verdict_listeners:
            cb()
        current = [self.verdicts[u] for u in self.units if u in self.verdicts]
        failing = [v for v in current if not v.ok]
        if not self.passed_once and not failing and len(current) == len(self.units):
            self.passed_once = True
            log.info("every health check passed (%s): the node takes work",
                     ", ".join(v.name for v in current) or "none installed")
            if self.passed_marker is not None:
                try:
                    self.passed_marker.touch()
                except OSError as exc:
                    log.warning("cannot note that the checks passed in %s: %s",
                                self.passed_marker, exc)
        if failing:
            reason: str | None = "; ".join(v.reason for v in failing)
        elif not self.passed_once:
            pending = [Verdict(u, False, "", (), 0).name for u in self.units
                       if u not in self.verdicts]
            reason = f"health checks have not passed yet (waiting for {', '.join(pending)})"
        else:
            reason = None
        # Settled: every check has a verdict of this agent's rounds; or, once they passed
        # since boot, every check that failed before has (a restart after a fix is online).
        unsure = [u for u in self.units if u not in self._fresh
                  and not (self.passed_once and self.verdicts.get(u, _PASSED).ok)]
        if not unsure:
            self._settled.set()
        if reason == self.reason:
            return
        if failing:
            log.warning("no new work: %s", reason)
        elif reason is None and self.reason is not None:
            log.info("health checks pass again: the node takes work")
        self.reason = reason
        self.on_change(reason)

    def status(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None  # no farmnode-health.target: nothing gates work
        return {"passed_once": self.passed_once, "interval": self.interval,
                "checks": [self.verdicts[u].to_json() if u in self.verdicts
                           else {"name": Verdict(u, False, "", (), 0).name, "unit": u,
                                 "ok": None, "detail": "not run yet", "output": [], "at": None}
                           for u in self.units]}
