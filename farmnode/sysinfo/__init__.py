"""sysinfo: facts about this host for the master — CPUs, RAM, disks, NICs, GPUs.
May import the standard library and psutil only.

`collect()` gathers everything at once (announce); the sync loop re-reads the cheap,
changing facts (free RAM, disks) itself through `farmnode.sysinfo.host`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from farmnode.sysinfo import gpu, host, net
from farmnode.sysinfo.gpu import Gpu
from farmnode.sysinfo.host import Disk
from farmnode.sysinfo.net import Address

log = logging.getLogger(__name__)

__all__ = ["Address", "Disk", "Gpu", "HostFacts", "collect"]


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    os_class: str
    os_fullname: str
    cpus: int
    cpu_name: str
    ram: int  # MB
    free_ram: int  # MB
    disks: tuple[Disk, ...]
    mac_addresses: tuple[str, ...] = ()
    ip_addresses: tuple[Address, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uptime: float = 0.0
    errors: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname, "os_class": self.os_class,
            "os_fullname": self.os_fullname, "cpus": self.cpus, "cpu_name": self.cpu_name,
            "ram": self.ram, "free_ram": self.free_ram,
            "disks": [d.to_json() for d in self.disks],
            "mac_addresses": list(self.mac_addresses),
            "ip_addresses": [{"interface": a.interface, "address": a.address,
                              "prefixlen": a.prefixlen} for a in self.ip_addresses],
            "gpus": [g.to_json() for g in self.gpus],
            "load": list(self.load), "uptime": self.uptime,
        }


def _local_facts() -> dict[str, Any]:
    # File reads only, but a hung NFS mount can block statvfs: run in a thread.
    return {
        "hostname": host.hostname(), "os_class": host.os_class(),
        "os_fullname": host.os_fullname(), "cpus": host.cpu_count(),
        "cpu_name": host.cpu_name(), "ram": host.ram_total_mb(),
        "free_ram": host.ram_free_mb(), "disks": tuple(host.disks()),
        "gpus": tuple(gpu.gpus()), "load": host.load_average(), "uptime": host.uptime(),
    }


async def collect() -> HostFacts:
    """Every fact; a source that fails is left empty and named in `errors`, never raised."""
    facts = await asyncio.to_thread(_local_facts)
    errors: list[str] = []
    macs: list[str] = []
    addrs: list[Address] = []
    try:
        macs = await net.mac_addresses()
        addrs = await net.ip_addresses()
    except Exception as exc:  # sysfs or getifaddrs failed (odd namespace): announce anyway
        log.warning("cannot read network interfaces: %s", exc)
        errors.append(f"network: {exc}")
    return HostFacts(mac_addresses=tuple(macs), ip_addresses=tuple(addrs),
                     errors=tuple(errors), **facts)
