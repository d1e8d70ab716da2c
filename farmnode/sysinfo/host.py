"""Facts about the host that need no network and no privileges: OS, CPUs, RAM, disks, load.

Each function reads the kernel (/proc, /sys via psutil) on every call; the sync loop decides
how often to ask. Units are PyFarm's: RAM in MB, disk sizes in bytes.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024

# Filesystems that hold no render data: virtual, in-memory or read-only images.
_PSEUDO_FS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay", "proc",
    "pstore", "ramfs", "securityfs", "squashfs", "sysfs", "tmpfs", "tracefs", "fuse.lxcfs",
    "fuse.portal", "iso9660",
})


@dataclass(frozen=True)
class Disk:
    mountpoint: str
    size: int  # bytes
    free: int  # bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def hostname() -> str:
    # PyFarm announces the FQDN; fall back to the kernel's name when the resolver has none.
    fqdn = socket.getfqdn()
    return fqdn if fqdn and fqdn != "localhost" else socket.gethostname()


def os_class() -> str:
    """PyFarm's OperatingSystem enum: linux, windows, mac, bsd or other."""
    name = platform.system().lower()
    if name == "linux":
        return "linux"
    if name == "darwin":
        return "mac"
    if name == "windows":
        return "windows"
    return "bsd" if "bsd" in name else "other"


def _os_release(root: Path = Path("/")) -> dict[str, str]:
    for rel in ("etc/os-release", "usr/lib/os-release"):
        path = root / rel
        if path.exists():
            out = {}
            for line in path.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep and not key.startswith("#"):
                    out[key.strip()] = value.strip().strip("\"'")
            return out
    return {}


def os_fullname(root: Path = Path("/")) -> str:
    """e.g. 'Debian GNU/Linux 12 (bookworm), Linux 6.1.0-18-amd64 x86_64'."""
    rel = _os_release(root)
    distro = rel.get("PRETTY_NAME") or rel.get("NAME") or platform.system()
    return f"{distro}, {platform.system()} {platform.release()} {platform.machine()}"


def cpu_count() -> int:
    """CPUs this process may use (cpuset/affinity aware), as PyFarm's integer `cpus`."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return psutil.cpu_count() or 1


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    # x86 says "model name"; arm64 kernels may only have "Hardware"/"CPU part"; first wins.
    for key in ("model name", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if sep and k.strip() == key and v.strip():
                return " ".join(v.split())
    return platform.processor() or platform.machine()


def ram_total_mb() -> int:
    return int(psutil.virtual_memory().total // MB)


def ram_free_mb() -> int:
    # "available", not "free": page cache is reclaimable, and a render node is mostly cache.
    return int(psutil.virtual_memory().available // MB)


def disks() -> list[Disk]:
    """Real, writable-or-not local filesystems, one entry per mountpoint."""
    out: list[Disk] = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _PSEUDO_FS or part.mountpoint in seen:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:  # a stale network mount must not stop an announce
            continue
        seen.add(part.mountpoint)
        out.append(Disk(part.mountpoint, int(usage.total), int(usage.free)))
    if not out:
        # Containers mount / as overlay; still report the root filesystem.
        usage = psutil.disk_usage("/")
        out.append(Disk("/", int(usage.total), int(usage.free)))
    return out


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def uptime() -> float:
    """Seconds since boot."""
    return max(0.0, time.time() - psutil.boot_time())
