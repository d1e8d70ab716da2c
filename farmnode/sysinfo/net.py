"""MAC and IP addresses of this node, for the master: psutil plus /sys/class/net.

Not pyroute2, for memory: the agent is to stay at or under 40 MB of RSS. Importing pyroute2
and using it cost the agent 9-11 MB of RSS, which took an agent with a master configured to
43 MB (bench/REPORT.md), all for two lists sent at announce. psutil is loaded anyway for the
host facts, and `psutil.net_if_addrs()` is getifaddrs(3): netlink dumps of links and
addresses in the caller's network namespace, no subprocess. What it lacks comes from
/sys/class/net/<name>/: the link type (ARPHRD), the IFF_* flags, the ifindex, and what the
link is (`tun_flags` for tun/tap, DEVTYPE= in `uevent` for bridge, vxlan, vlan, bond...).

What netlink gave and this does not, and how it is made up for:
- the link kind (IFLA_INFO_KIND). sysfs names no kind for ifb and dummy links; they are
  left out because they do not answer ARP (both set NOARP; a NIC the node is reached by
  does not), and veth/macvlan get no kind (they are kept, as before).
- an address's scope. Loopback, link-local and site-local addresses are left out by their
  value; an address given `scope host` or `scope link` by hand on a NIC is reported.
- sysfs shows the network namespace it was mounted in: a service, a container or
  `ip netns exec` see their own; a process that only setns(2)'d into another namespace does
  not, and its links that sysfs lacks are skipped.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

SYS_CLASS_NET = Path("/sys/class/net")
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_NOARP = 0x80
ARPHRD_ETHER = 1
# Link kinds that are not a way to reach the node (the ones sysfs names). ifb and dummy are
# caught by NOARP; IP tunnels (ipip, gre, sit) are not Ethernet links at all.
_SKIP_KINDS = frozenset({"bridge", "tun", "vxlan"})


@dataclass(frozen=True)
class Link:
    name: str
    mac: str
    # what sysfs says the link is: "tun" (tun and tap), else uevent's DEVTYPE ("bridge",
    # "vxlan", "vlan", "bond", "wlan"...); None for a plain NIC, veth, macvlan, ifb, dummy
    kind: str | None
    up: bool
    arp: bool = True


@dataclass(frozen=True)
class Address:
    interface: str
    address: str
    prefixlen: int


def _kind(sysdir: Path) -> str | None:
    if (sysdir / "tun_flags").exists():
        return "tun"
    try:
        uevent = (sysdir / "uevent").read_text()
    except OSError:
        return None
    for line in uevent.splitlines():
        if line.startswith("DEVTYPE="):
            return line.removeprefix("DEVTYPE=")
    return None


def _links(sys_class_net: Path) -> list[Link]:
    out = []  # (ifindex, link): getifaddrs's order is not the links' order
    for name, addrs in psutil.net_if_addrs().items():
        mac = next((a.address.lower() for a in addrs if a.family == psutil.AF_LINK), "")
        if not mac or mac == "00:00:00:00:00:00":
            continue
        sysdir = sys_class_net / name
        try:
            flags = int((sysdir / "flags").read_text(), 16)
            arphrd = int((sysdir / "type").read_text())
            ifindex = int((sysdir / "ifindex").read_text())
        except (OSError, ValueError):
            continue  # gone meanwhile, or this sysfs is another network namespace's
        if flags & IFF_LOOPBACK or arphrd != ARPHRD_ETHER:
            continue
        out.append((ifindex, Link(name, mac, _kind(sysdir), bool(flags & IFF_UP),
                                  arp=not flags & IFF_NOARP)))
    return [link for _, link in sorted(out, key=lambda x: x[0])]


async def links() -> list[Link]:
    """The node's Ethernet-like links (no loopback, no zero MAC), in interface order."""
    # No await inside: getifaddrs and a few sysfs files are memory reads, not I/O to wait on.
    return _links(SYS_CLASS_NET)


async def mac_addresses() -> list[str]:
    """Hardware addresses of the node's Ethernet-like links, as PyFarm sends them."""
    seen: dict[str, None] = {}
    for link in await links():
        if link.arp and link.kind not in _SKIP_KINDS:
            seen.setdefault(link.mac)
    return list(seen)


def _prefixlen(netmask: str | None, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    if not netmask:
        return ip.max_prefixlen
    return bin(int(ipaddress.ip_address(netmask))).count("1")


def _global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """What the kernel would give universe scope, judged by the address alone."""
    if ip.is_loopback or ip.is_link_local:
        return False
    return not (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)


async def ip_addresses() -> list[Address]:
    """Global-scope addresses (no loopback, no link-local), IPv4 first."""
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        interface = name.split(":", 1)[0]  # an IPv4 address's label (eth0:1) names its link
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(a.address.split("%", 1)[0])  # fe80::1%eth0
            if _global(ip):
                out.append(Address(interface, str(ip), _prefixlen(a.netmask, ip)))
    out.sort(key=lambda a: (ipaddress.ip_address(a.address).version, a.interface))
    return out
