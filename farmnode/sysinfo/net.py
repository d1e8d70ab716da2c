"""MAC and IP addresses from the kernel over rtnetlink (pyroute2's asyncio API).

Netlink rather than parsing `ip` output or /sys/class/net: one request each for links and
addresses, no subprocess, and it works in a network namespace exactly as on the host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
RT_SCOPE_UNIVERSE = 0
# Link kinds that are not a way to reach the node: traffic shapers, bridges, tunnels.
_SKIP_KINDS = frozenset({"ifb", "dummy", "bridge", "tun", "vxlan", "ipip", "gre", "sit"})


@dataclass(frozen=True)
class Link:
    name: str
    mac: str
    kind: str | None
    up: bool


@dataclass(frozen=True)
class Address:
    interface: str
    address: str
    prefixlen: int


def _iproute() -> Any:
    # Imported on first use: pyroute2 costs ~11 MB of RSS at import, and only the master
    # sync's host facts need it (a standalone node never does; bench/REPORT.md).
    from pyroute2 import AsyncIPRoute

    return AsyncIPRoute()


async def links() -> list[Link]:
    out = []
    async with _iproute() as ipr:
        async for msg in await ipr.link("dump"):
            if msg["flags"] & IFF_LOOPBACK or msg["ifi_type"] != ARPHRD_ETHER:
                continue
            mac = (msg.get("address") or "").lower()
            if not mac or mac == "00:00:00:00:00:00":
                continue
            kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            out.append(Link(msg.get("ifname") or "", mac, kind, bool(msg["flags"] & 1)))
    return out


async def mac_addresses() -> list[str]:
    """Hardware addresses of the node's Ethernet-like links, as PyFarm sends them."""
    seen: dict[str, None] = {}
    for link in await links():
        if link.kind not in _SKIP_KINDS:
            seen.setdefault(link.mac)
    return list(seen)


async def ip_addresses() -> list[Address]:
    """Global-scope addresses (no loopback, no link-local), IPv4 first."""
    out = []
    async with _iproute() as ipr:
        names = {m["index"]: m.get("ifname") or "" async for m in await ipr.link("dump")}
        async for msg in await ipr.addr("dump"):
            if msg["scope"] != RT_SCOPE_UNIVERSE:
                continue
            addr = msg.get("address")
            if not addr:
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local:
                continue
            out.append(Address(names.get(msg["index"], ""), str(ip), int(msg["prefixlen"])))
    out.sort(key=lambda a: (ipaddress.ip_address(a.address).version, a.interface))
    return out
