"""Pausing a task scope without ending it: systemd's freezer, or CPUWeight=idle.

"freeze" asks PID 1 (FreezeUnit/ThawUnit): the kernel's cgroup v2 freezer stops every
process of the scope where it stands, and PID 1 answers once cgroup.events says frozen, so
the reply is the proof. systemd thaws a unit itself before stopping it. systemd 252 offers
its freezer only on a pure v2 host; on a hybrid one ("does not support freezing") the same
kernel freezer is there in the v2 tree systemd keeps for its own tracking, and farmnode
writes the scope's cgroup.freeze itself, waits for cgroup.events to say frozen, and must
thaw it before a stop (`release`). "cpu-idle" sets the scope's CPUWeight to idle at runtime
(SCHED_IDLE for the cgroup): the task runs on, but only on CPU time nothing else wants.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
from typing import Literal

from sdbus import SdBus
from sdbus.dbus_exceptions import DbusFailedError
from sdbus.exceptions import SdBusUnmappedMessageError

from farmnode.systemd.cgroup import cgroup_path_dir, unit_cgroup_path
from farmnode.systemd.manager import MANAGER_PATH, SYSTEMD, ManagerProxy

log = logging.getLogger(__name__)

Pause = Literal["freeze", "cpu-idle"]
# systemd's CGROUP_WEIGHT_IDLE and CGROUP_WEIGHT_INVALID (unset: the default weight again)
CPU_WEIGHT_IDLE = 0
CPU_WEIGHT_UNSET = 2**64 - 1
_GONE = ("NoSuchUnit", "not loaded", "inactive", "No such")
_UNSUPPORTED = "does not support freezing"
FREEZE_TIMEOUT = 30.0  # s the kernel may take to stop every process of a scope


class PauseFailed(RuntimeError):
    pass


def _text(exc: Exception) -> str:
    return " ".join(str(a) for a in exc.args) or type(exc).__name__


def _events_frozen(directory: str) -> bool:
    with open(f"{directory}/cgroup.events") as f:
        return any(line.split() == ["frozen", "1"] for line in f)


def kernel_freeze(directory: str, frozen: bool, timeout: float = FREEZE_TIMEOUT) -> None:
    """Write cgroup.freeze; when freezing, wait until cgroup.events says frozen (kernfs
    wakes poll() at each change of it). OSError: the cgroup is gone; TimeoutError: it did
    not settle. Blocking: run it in a thread."""
    with open(f"{directory}/cgroup.freeze", "w") as f:
        f.write("1" if frozen else "0")
    if not frozen:
        return  # thawing needs no wait: the tasks are woken by the write
    fd = os.open(f"{directory}/cgroup.events", os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        os.read(fd, 4096)  # armed: the next change wakes the poll
        deadline = time.monotonic() + timeout
        while not _events_frozen(directory):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{directory} did not freeze in {timeout:g} s")
            poller.poll(min(left, 1.0) * 1000)
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, 4096)
    finally:
        os.close(fd)


class Freezer:
    def __init__(self, bus: SdBus, slice_name: str) -> None:
        self.manager = ManagerProxy.new_proxy(SYSTEMD, MANAGER_PATH, bus)
        self.slice = slice_name
        # Scopes frozen through cgroup.freeze, which systemd knows nothing of.
        self.kernel_frozen: set[str] = set()

    async def pause(self, unit: str, how: Pause) -> bool:
        """Pause the scope; False if it is gone. PauseFailed says why it could not be."""
        try:
            if how == "freeze":
                await self.manager.freeze_unit(unit)
            else:
                await self.manager.set_unit_properties(
                    unit, True, [("CPUWeight", ("t", CPU_WEIGHT_IDLE))])
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            if how == "freeze" and _UNSUPPORTED in _text(exc):
                return await self._kernel(unit, True)
            if any(m in _text(exc) for m in _GONE):
                return False
            raise PauseFailed(f"systemd refused to {how} {unit}: {_text(exc)}") from None
        return True

    async def resume(self, unit: str, how: Pause) -> bool:
        """Undo `pause` (harmless on a scope that is not paused); False if it is gone."""
        if unit in self.kernel_frozen:
            return await self._kernel(unit, False)
        try:
            if how == "freeze":
                await self.manager.thaw_unit(unit)
            else:
                await self.manager.set_unit_properties(
                    unit, True, [("CPUWeight", ("t", CPU_WEIGHT_UNSET))])
        except (DbusFailedError, SdBusUnmappedMessageError) as exc:
            if how == "freeze" and _UNSUPPORTED in _text(exc):
                # Not systemd's to thaw; an earlier agent may have frozen it by the file.
                return await self._kernel(unit, False) if self._kernel_says_frozen(unit) \
                    else True
            if any(m in _text(exc) for m in _GONE):
                return False
            raise PauseFailed(f"systemd refused to resume {unit} ({how}): {_text(exc)}"
                              ) from None
        return True

    async def release(self, unit: str) -> None:
        """Before a stop: thaw what systemd would not thaw itself (a scope frozen by the
        file takes SIGTERM only once thawed, so its stop would end in SIGKILL)."""
        try:
            await self.resume(unit, "freeze")
        except PauseFailed as exc:
            log.warning("%s; stopping it frozen", exc)

    def _directory(self, unit: str) -> str | None:
        return cgroup_path_dir(unit_cgroup_path(unit, self.slice))

    def _kernel_says_frozen(self, unit: str) -> bool:
        # A scope an earlier agent froze through the file: its cgroup.freeze says so.
        directory = self._directory(unit)
        if directory is None:
            return False
        try:
            with open(f"{directory}/cgroup.freeze") as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    async def _kernel(self, unit: str, frozen: bool) -> bool:
        directory = self._directory(unit)
        if directory is None:
            self.kernel_frozen.discard(unit)
            return False
        try:
            await asyncio.to_thread(kernel_freeze, directory, frozen)
        except FileNotFoundError:
            self.kernel_frozen.discard(unit)
            return False
        except (OSError, TimeoutError) as exc:
            raise PauseFailed(f"the kernel's freezer on {directory}: {exc}") from None
        if frozen:
            self.kernel_frozen.add(unit)
        else:
            self.kernel_frozen.discard(unit)
        return True
