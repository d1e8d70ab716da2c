"""Which node a fleet command talks to, and opening that node's system bus.

A target is decoded once from `-H`/`-M` (bad names fail here, naming the entry); the bus
is sd-bus's own transport for it: `ssh -xT host systemd-stdio-bridge` for a host, the
container's namespaces via systemd-machined for a machine, so the far side runs nothing
of ours but the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# What ssh itself may take as [user@]host[:machine]; a leading '-' would be an option to ssh
# (sd-bus passes `--` before the host, but the check here names the entry).
_HOST = re.compile(r"^(?:[A-Za-z0-9_.][A-Za-z0-9_.-]*@)?[A-Za-z0-9_.:\[\]%-]+$")
_MACHINE = re.compile(r"^(?:[A-Za-z0-9_.][A-Za-z0-9_.-]*@)?[A-Za-z0-9_.-]+$")
SSH_EXIT_WAIT = 2.0  # s: how long a failed node's ssh may take to say why
SSH_STDERR_KEEP = 4096  # bytes of ssh's own messages kept per node (the tail explains a failure)


class TargetError(ValueError):
    """A -H/-M entry that cannot name a node."""


class Transport(enum.StrEnum):
    LOCAL = "local"
    HOST = "host"
    MACHINE = "machine"


@dataclass(frozen=True)
class Target:
    transport: Transport
    name: str  # as the user wrote it: the prefix of every line about this node

    @property
    def label(self) -> str:
        return self.name if self.transport is not Transport.LOCAL else "localhost"


LOCAL = Target(Transport.LOCAL, "")


def _split(values: Iterable[str]) -> Iterator[str]:
    for value in values:
        yield from (part.strip() for part in value.split(","))


def parse_targets(hosts: Iterable[str], machines: Iterable[str]) -> list[Target]:
    """-H/-M values (each comma-separated, repeatable) as targets, in order, once each."""
    out: dict[Target, None] = {}
    for transport, values, pattern, option in (
            (Transport.HOST, hosts, _HOST, "-H"), (Transport.MACHINE, machines, _MACHINE, "-M")):
        for name in _split(values):
            if not name:
                raise TargetError(f"{option}: empty name in the list")
            if name.startswith("-") or not pattern.match(name):
                raise TargetError(f"{option} {name!r}: not a [user@]host"
                                  + ("[:machine]" if transport is Transport.HOST else "")
                                  + " name")
            out.setdefault(Target(transport, name))
    return list(out)


def library_error(exc: BaseException) -> str:
    """sdbus's SdBusLibraryError as the errno's text (its message is the C source line)."""
    m = re.search(r"error number: (\d+)", str(exc))
    return os.strerror(int(m.group(1))) if m else str(exc)


@dataclass
class Connection:
    """A node's bus, and what its ssh said on stderr (the cause when the bus fails)."""

    target: Target
    bus: Any
    _stderr: bytearray = field(default_factory=bytearray)
    _fd: int = -1
    _eof: asyncio.Event = field(default_factory=asyncio.Event)

    def transport_messages(self) -> list[str]:
        text = self._stderr.decode("utf-8", "replace")
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            self._stop_reading()
            return
        self._stderr += chunk
        del self._stderr[:-SSH_STDERR_KEEP]

    def _stop_reading(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._eof.set()

    async def final_messages(self) -> list[str]:
        """ssh's messages once it has closed stderr: a bus that died means ssh exits, and
        its last words (the cause) may still be in the pipe."""
        if self._fd >= 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SSH_EXIT_WAIT):
                    await self._eof.wait()
        return self.transport_messages()

    def close(self) -> None:
        self._stop_reading()
        with contextlib.suppress(Exception):
            self.bus.close()


class OpenFailed(Exception):
    """The transport could not even start (no such machine, no local bus)."""


def open_bus(target: Target) -> Connection:
    """The node's system bus, opened by sd-bus (in the running event loop).

    sd-bus starts ssh as its child with our stderr; here that stderr is a pipe for just the
    moment of the fork, so each node's ssh messages ("Could not resolve hostname …") are
    kept for that node instead of landing unprefixed among the others' answers."""
    import sdbus

    if target.transport is Transport.LOCAL:
        try:
            return Connection(target, sdbus.sd_bus_open_system())
        except sdbus.SdBusLibraryError as exc:
            raise OpenFailed(f"cannot connect to the system bus: {library_error(exc)}") from None
    if target.transport is Transport.MACHINE:
        try:
            return Connection(target, sdbus.sd_bus_open_system_machine(target.name))
        except sdbus.SdBusLibraryError as exc:
            # sd-bus asks systemd-machined for the machine's leader: on a host without it
            # (PID 1 not systemd) that fails before any machine is looked up
            raise OpenFailed(f"cannot reach machine {target.name}: {library_error(exc)} "
                             "(is it registered with systemd-machined?)") from None
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)  # ours only: ssh's stderr (the write end) stays as ssh expects
    saved = os.dup(2)
    try:
        os.dup2(w, 2, inheritable=True)
        try:
            bus = sdbus.sd_bus_open_system_remote(target.name)
        except sdbus.SdBusLibraryError as exc:
            os.close(r)
            raise OpenFailed(f"cannot start ssh: {library_error(exc)}") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    conn = Connection(target, bus, _fd=r)
    asyncio.get_running_loop().add_reader(r, conn._read)
    return conn
