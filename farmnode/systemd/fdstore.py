"""systemd's file-descriptor store: where each task's link outlives the agent process.

farmnode.service has FileDescriptorStoreMax=; systemd keeps what we store across a restart,
a crash or kill -9 and hands it back as LISTEN_FDS/LISTEN_FDNAMES. Outside systemd (no
NOTIFY_SOCKET) these are no-ops: the agent then simply cannot survive its own death.
"""

from __future__ import annotations

import os

from systemd import daemon

# A task link's name says its protocol (link.py): an agent adopting a link a different
# version stored (an upgrade with tasks running) must know which one the shim speaks.
PREFIXES = {1: "task-", 2: "link2-"}


def link_name(assignment_id: str, version: int) -> str:
    return f"{PREFIXES[version]}{assignment_id}"


def available() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def store(name: str, fd: int) -> None:
    if available():
        daemon.notify(f"FDSTORE=1\nFDNAME={name}", fds=[fd])


def remove(name: str) -> None:
    if available():
        daemon.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def inherited() -> dict[str, list[int]]:
    """Stored fds handed back to this process, by name (LISTEN_FDS is cleared after)."""
    by_name: dict[str, list[int]] = {}
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return by_name
    for fd, name in daemon.listen_fds_with_names(True).items():
        by_name.setdefault(name, []).append(fd)
    return by_name
