"""The network health check, over rtnetlink with pyroute2: carrier on the uplink, an address on
it, a route to the master. Imported only by farmnode-health, in the check's own process: the
agent never loads pyroute2 (its footprint, bench/NOTES.md)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from farmnode.health.checks import CheckResult

IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class Uplink:
    ifname: str
    carrier: bool
    operstate: str
    loopback: bool
    addresses: tuple[str, ...]
    gateway: str | None


def master_host(master: str | None) -> str | None:
    """The host part of the `master` setting (host, host:port, [v6]:port)."""
    if not master:
        return None
    if master.startswith("["):
        return master[1:].partition("]")[0]
    if master.count(":") == 1:
        return master.partition(":")[0]
    return master


def _uplink(ipr: IPRoute, route: object) -> Uplink:
    oif = route.get("RTA_OIF")  # type: ignore[attr-defined]
    (link,) = ipr.link("get", index=oif)
    family = route["family"]  # type: ignore[index]
    addrs = tuple(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                  for a in ipr.get_addr(index=oif, family=family))
    return Uplink(str(link.get("IFLA_IFNAME")), bool(link.get("IFLA_CARRIER")),
                  str(link.get("IFLA_OPERSTATE")), bool(link["flags"] & IFF_LOOPBACK),
                  addrs, route.get("RTA_GATEWAY"))  # type: ignore[attr-defined]


def _any_link_up(ipr: IPRoute) -> CheckResult:
    for link in ipr.get_links():
        if link["flags"] & IFF_LOOPBACK or not link.get("IFLA_CARRIER"):
            continue
        addrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                 for a in ipr.get_addr(index=link["index"])]
        if addrs:
            return CheckResult(True, f"no master configured and no default route: "
                                     f"{link.get('IFLA_IFNAME')} has carrier and "
                                     f"{', '.join(addrs)}")
    return CheckResult(False, "no master configured, no default route, and no link with "
                              "carrier and an address")


def check(master: str | None) -> CheckResult:
    host = master_host(master)
    with IPRoute() as ipr:
        if host is None:
            routes = [*ipr.get_default_routes(family=socket.AF_INET),
                      *ipr.get_default_routes(family=socket.AF_INET6)]
            if not routes:
                # A node with no master (its own job files) on a LAN without a gateway needs
                # no route anywhere: a link that is up with an address is all it can ask.
                return _any_link_up(ipr)
            route, target = routes[0], "the default route"
        else:
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                return CheckResult(False, f"master {host} does not resolve ({exc})")
            address = str(infos[0][4][0])
            try:
                (route,) = ipr.route("get", dst=address)
            except NetlinkError as exc:
                return CheckResult(False, f"no route to the master {host} ({address}): "
                                          f"{exc.args[-1] if exc.args else exc}")
            target = f"route to the master {host} ({address})"
        up = _uplink(ipr, route)
    via = f" via {up.gateway}" if up.gateway else ""
    if not up.loopback and not up.carrier:
        return CheckResult(False, f"{target}{via} is on {up.ifname}, which has no carrier "
                                  f"(operstate {up.operstate})")
    if not up.addresses:
        return CheckResult(False, f"{target}{via} is on {up.ifname}, which has no address")
    return CheckResult(True, f"{target}{via} on {up.ifname} (carrier, "
                             f"{', '.join(up.addresses)})")
