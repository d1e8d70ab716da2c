"""Transient scopes for tasks: properties from limits, start gated on JobRemoved, stop, kill."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sdbus import SdBus
from sdbus.dbus_exceptions import DbusFailedError
from sdbus.exceptions import SdBusUnmappedMessageError

from farmnode.systemd.manager import (
    MANAGER_PATH,
    SYSTEMD,
    JobProxy,
    JobWatcher,
    ManagerProxy,
    UnitProperty,
    UnitProxy,
)

log = logging.getLogger(__name__)


# systemd's errors for a unit that is gone or has no process left. sdbus raises errors it has
# no class for as SdBusUnmappedMessageError(name, message).
_GONE = ("NoSuchUnit", "NoSuchProcess", "not loaded", "No process", "not active")


def _unit_gone(exc: Exception) -> bool:
    text = " ".join(str(a) for a in exc.args) + " " + type(exc).__name__
    return any(marker in text for marker in _GONE)


class ScopeError(RuntimeError):
    pass


@dataclass(frozen=True)
class ScopeLimits:
    """cgroup limits of one task scope; None leaves systemd's default (no limit)."""

    memory_max: int | None = None  # bytes
    memory_high: int | None = None
    memory_swap_max: int | None = None
    cpu_quota_per_sec_usec: int | None = None
    allowed_cpus: str | None = None  # cpuset list, "0-3,6"
    tasks_max: int | None = None
    io_weight: int | None = None


def cpuset_mask(spec: str) -> bytes:
    """systemd's AllowedCPUs wire format: bit j of byte i is CPU 8*i + j."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    mask = bytearray(max(cpus) // 8 + 1)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def scope_properties(pids: Sequence[int], slice_name: str, description: str, limits: ScopeLimits,
                     stop_timeout_usec: int, kill_signal: int = 15,
                     devices: Sequence[tuple[str, str]] | None = None) -> list[UnitProperty]:
    """`devices`: (node, access) the task alone may open besides systemd's pseudo devices
    (/dev/null, zero, full, random, urandom, tty, ptmx); None leaves device access alone."""
    props: list[UnitProperty] = [
        ("PIDs", ("au", list(pids))),
        ("Slice", ("s", slice_name)),
        ("Description", ("s", description)),
        # A failed scope would otherwise linger until reset-failed.
        ("CollectMode", ("s", "inactive-or-failed")),
        ("MemoryAccounting", ("b", True)),
        ("CPUAccounting", ("b", True)),
        ("TasksAccounting", ("b", True)),
        ("IOAccounting", ("b", True)),
        ("TimeoutStopUSec", ("t", stop_timeout_usec)),
        ("SendSIGHUP", ("b", False)),
        # What a cancel sends first (the job type's choice, PyFarm's stop(signal=...));
        # SIGKILL to the whole cgroup follows after TimeoutStopUSec.
        ("KillSignal", ("i", kill_signal)),
    ]
    simple = (
        ("MemoryMax", limits.memory_max),
        ("MemoryHigh", limits.memory_high),
        ("MemorySwapMax", limits.memory_swap_max),
        ("CPUQuotaPerSecUSec", limits.cpu_quota_per_sec_usec),
        ("TasksMax", limits.tasks_max),
        ("IOWeight", limits.io_weight),
    )
    props += [(name, ("t", value)) for name, value in simple if value is not None]
    if limits.allowed_cpus:
        props.append(("AllowedCPUs", ("ay", cpuset_mask(limits.allowed_cpus))))
    if devices is not None:
        props.append(("DevicePolicy", ("s", "closed")))
        props.append(("DeviceAllow", ("a(ss)", [(node, access) for node, access in devices])))
    return props


class ScopeManager:
    def __init__(self, bus: SdBus) -> None:
        self.bus = bus
        self.manager = ManagerProxy.new_proxy(SYSTEMD, MANAGER_PATH, bus)
        # The tasks' scopes, the jobs' warm scopes (farmnode.warm), and the HTTP API's units,
        # whose start and stop follow the agent.
        self.jobs = JobWatcher(bus, unit_prefix=("farmnode-task-", "farmnode-warm-",
                                                 "farmnode-api."))

    async def start(self) -> None:
        await self.jobs.start(self.manager)

    async def start_scope(self, unit: str, properties: list[UnitProperty]) -> None:
        """Create the scope and return only once systemd has moved the PIDs into it."""
        try:
            job = await self.manager.start_transient_unit(unit, "fail", properties, [])
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            raise ScopeError(f"systemd refused scope {unit}: {exc}") from exc
        result = await self.jobs.wait(job)
        if result != "done":
            raise ScopeError(f"scope {unit} did not start: job result {result!r}")

    async def stop_scope(self, unit: str) -> bool:
        """Stop (TERM, TimeoutStopUSec, KILL the cgroup); False if the unit is already gone."""
        try:
            await self.manager.stop_unit(unit, "replace")
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            if _unit_gone(exc):
                return False
            raise
        return True

    async def stop_scope_wait(self, unit: str, timeout: float) -> bool:
        """As stop_scope, and return once it is stopped (its name free for a new scope)."""
        try:
            await self.unit_job(unit, "stop", timeout)
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            if _unit_gone(exc):
                return False
            raise
        return True

    async def kill_scope(self, unit: str, signum: int) -> bool:
        try:
            await self.manager.kill_unit(unit, "all", signum)
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            if _unit_gone(exc):
                return False
            raise
        return True

    async def unit_job(self, unit: str, action: str, timeout: float) -> str:
        """Start or stop a unit of ours and wait for systemd's job: its result ("done",
        "failed", "timeout", ...). A job already queued for the unit (the one farmnode.service's
        Wants= started) is merged with, so this waits for that one."""
        call = self.manager.start_unit if action == "start" else self.manager.stop_unit
        job = await call(unit, "replace")
        return await self.jobs.wait(job, timeout)

    async def own_pending_job(self, pid: int) -> str | None:
        """The type of the job systemd is running on our own unit ("stop", "restart", ...).

        SIGTERM alone does not say whether the admin stopped or restarted us; this does."""
        try:
            unit_path = await self.manager.get_unit_by_pid(pid)
            job_id, job_path = await UnitProxy.new_proxy(SYSTEMD, unit_path, self.bus).job
            if job_id == 0:
                return None
            return str(await JobProxy.new_proxy(SYSTEMD, job_path, self.bus).job_type)
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            log.warning("cannot tell why we are asked to stop (%s); treating it as a stop", exc)
            return None

    async def limit_slice(self, slice_name: str, memory_max: int) -> None:
        """Cap all tasks together (runtime only: the config decides again at each start)."""
        await self.manager.set_unit_properties(slice_name, True,
                                               [("MemoryMax", ("t", memory_max))])
