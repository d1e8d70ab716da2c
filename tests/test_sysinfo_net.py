"""farmnode.sysinfo.net (psutil + /sys/class/net) against what iproute2 reports.

The checks compare with `ip -j`, which reads the same kernel state over netlink (what
pyroute2 did before): on this host, in a network namespace filled with the kinds of link a
render node meets (veth, macvlan, bridge, tap, vxlan, ifb...), and on a fake sysfs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from farmnode.sysinfo import net

NOT_A_NIC = {"ifb", "dummy", "bridge", "tun", "vxlan", "ipip", "gre", "sit"}
needs_ip = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")


def ip_json(*args: str, ns: str | None = None) -> Any:
    argv = ["ip", *(["-n", ns] if ns else []), "-d", "-j", *args]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def expected_macs(ns: str | None = None) -> list[str]:
    """What the netlink-based implementation sent: Ethernet links, not loopback, not one of
    NOT_A_NIC's kinds; and ARP on (ifb and dummy set NOARP, which sysfs can see)."""
    out = []
    for link in ip_json("link", ns=ns):
        kind = link.get("linkinfo", {}).get("info_kind")
        if (link["link_type"] == "ether" and "LOOPBACK" not in link["flags"]
                and "NOARP" not in link["flags"] and kind not in NOT_A_NIC
                and link["address"] != "00:00:00:00:00:00"):
            out.append(link["address"])
    return out


def expected_addresses(ns: str | None = None) -> set[tuple[str, str, int]]:
    out = set()
    for link in ip_json("addr", ns=ns):
        for a in link["addr_info"]:
            ip = ipaddress.ip_address(a["local"])
            if a["scope"] == "global" and not (ip.is_loopback or ip.is_link_local):
                out.add((link["ifname"], a["local"], a["prefixlen"]))
    return out


def found(addrs: list[net.Address]) -> set[tuple[str, str, int]]:
    return {(a.interface, a.address, a.prefixlen) for a in addrs}


@needs_ip
def test_matches_ip_on_this_host() -> None:
    macs = asyncio.run(net.mac_addresses())
    assert macs == expected_macs()
    assert all(len(m) == 17 and m == m.lower() for m in macs)
    addrs = asyncio.run(net.ip_addresses())
    assert found(addrs) == expected_addresses()
    assert not {"127.0.0.1", "::1"} & {a.address for a in addrs}
    versions = [ipaddress.ip_address(a.address).version for a in addrs]
    assert versions == sorted(versions)  # IPv4 first
    # the loopback link is never among the links, whatever else is
    assert "lo" not in {link.name for link in asyncio.run(net.links())}


def _ns_ip(ns: str, *args: str) -> bool:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True).returncode == 0


@pytest.fixture
def zoo() -> Iterator[tuple[str, set[str]]]:
    """A network namespace holding one link of each kind this kernel can make."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    ns = f"fntest-net-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        made = set()
        for name, *spec in (["v0", "type", "veth", "peer", "name", "v1"],
                            ["mv0", "link", "v0", "type", "macvlan"],
                            ["vl0", "link", "v0", "type", "vlan", "id", "5"],
                            ["br0", "type", "bridge"],
                            ["vx0", "type", "vxlan", "id", "42", "dstport", "4789", "dev", "v0"],
                            ["ifb9", "type", "ifb"], ["dm0", "type", "dummy"]):
            if _ns_ip(ns, "link", "add", name, *spec):
                made.add(name)
        if _ns_ip(ns, "tuntap", "add", "tap0", "mode", "tap"):
            made.add("tap0")
        if _ns_ip(ns, "tuntap", "add", "tun0", "mode", "tun"):
            made.add("tun0")
        if "v0" not in made:
            pytest.skip("cannot create a veth pair here")
        made.add("v1")  # v0's peer
        for args in (["link", "set", "lo", "up"], ["link", "set", "v0", "up"],
                     ["link", "set", "v1", "up"],
                     ["addr", "add", "10.9.9.1/24", "dev", "v0"],
                     ["addr", "add", "10.9.8.1/16", "dev", "v0", "label", "v0:1"],
                     ["addr", "add", "fd09::1/64", "dev", "v0", "nodad"],
                     ["addr", "add", "169.254.3.3/16", "dev", "v1"],
                     ["addr", "add", "2001:db8::5/48", "dev", "v1", "nodad"]):
            assert _ns_ip(ns, *args), args
        if "mv0" in made:
            assert _ns_ip(ns, "addr", "add", "10.6.6.6/24", "dev", "mv0")
        yield ns, made
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_matches_ip_in_a_namespace_of_every_link_kind(zoo: tuple[str, set[str]]) -> None:
    ns, made = zoo
    # `ip netns exec` mounts the namespace's own /sys, as a container or a service has
    code = ("import asyncio, json; from farmnode.sysinfo import net\n"
            "print(json.dumps([asyncio.run(net.mac_addresses()),"
            " [a.__dict__ for a in asyncio.run(net.ip_addresses())],"
            " [l.__dict__ for l in asyncio.run(net.links())]]))")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    macs, addrs, links = json.loads(out)
    mac_of = {link["ifname"]: link.get("address") for link in ip_json("link", ns=ns)}

    assert macs == expected_macs(ns)
    nics = {"v0", "v1", "mv0", "vl0"} & made
    assert sorted(macs) == sorted(mac_of[n] for n in nics)
    kinds = {link["name"]: link["kind"] for link in links}
    assert kinds["v0"] is None and kinds.get("br0", "bridge") == "bridge"
    assert kinds.get("tap0", "tun") == "tun" and kinds.get("vx0", "vxlan") == "vxlan"
    assert "tun0" not in kinds and "lo" not in kinds  # not Ethernet links
    # links come in ifindex order, as a netlink dump gave them
    order = [link["ifname"] for link in ip_json("link", ns=ns)]
    assert [link["name"] for link in links] == [n for n in order if n in kinds]

    assert {(a["interface"], a["address"], a["prefixlen"]) for a in addrs} \
        == expected_addresses(ns)
    assert [(a["interface"], a["address"], a["prefixlen"]) for a in addrs] == (
        [*([("mv0", "10.6.6.6", 24)] if "mv0" in made else []),
         ("v0", "10.9.9.1", 24), ("v0", "10.9.8.1", 16),  # the v0:1 label names v0
         ("v0", "fd09::1", 64), ("v1", "2001:db8::5", 48)])


def _fake_link(root: Path, name: str, ifindex: int, flags: int, arphrd: int = 1,
               devtype: str | None = None, tun: bool = False) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "ifindex").write_text(f"{ifindex}\n")
    (d / "flags").write_text(f"{flags:#x}\n")
    (d / "type").write_text(f"{arphrd}\n")
    (d / "uevent").write_text(f"{f'DEVTYPE={devtype}' + chr(10) if devtype else ''}"
                              f"INTERFACE={name}\nIFINDEX={ifindex}\n")
    if tun:
        (d / "tun_flags").write_text("0x1002\n")


def test_links_from_a_fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mac = {"lo": "00:00:00:00:00:00", "eth1": "02:00:00:00:00:02",
           "eth0": "02:00:00:00:00:01", "dummy0": "02:00:00:00:00:03",
           "br0": "02:00:00:00:00:04", "tap0": "02:00:00:00:00:05",
           "vlan5": "02:00:00:00:00:06", "ib0": ":".join(["80"] + ["00"] * 19),
           "elsewhere": "02:00:00:00:00:07"}
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        name: [SimpleNamespace(family=psutil.AF_LINK, address=m.upper(), netmask=None)]
        for name, m in mac.items()})
    _fake_link(tmp_path, "lo", 1, 0x9, arphrd=772)
    _fake_link(tmp_path, "eth0", 2, 0x1003)
    _fake_link(tmp_path, "eth1", 3, 0x1002)
    _fake_link(tmp_path, "dummy0", 4, 0x82)
    _fake_link(tmp_path, "br0", 5, 0x1003, devtype="bridge")
    _fake_link(tmp_path, "tap0", 6, 0x1003, tun=True)
    _fake_link(tmp_path, "vlan5", 7, 0x1003, devtype="vlan")
    _fake_link(tmp_path, "ib0", 8, 0x1003, arphrd=32)  # InfiniBand
    # "elsewhere" is in psutil's namespace but not in this sysfs: skipped

    links = net._links(tmp_path)
    assert [(x.name, x.kind, x.up, x.arp) for x in links] == [
        ("eth0", None, True, True), ("eth1", None, False, True), ("dummy0", None, False, False),
        ("br0", "bridge", True, True), ("tap0", "tun", True, True),
        ("vlan5", "vlan", True, True)]
    assert links[0].mac == "02:00:00:00:00:01"  # lower case, as PyFarm sends them
    monkeypatch.setattr(net, "SYS_CLASS_NET", tmp_path)
    assert asyncio.run(net.mac_addresses()) == [
        "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:06"]


def test_addresses_from_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    def a(family: int, address: str, netmask: str | None) -> SimpleNamespace:
        return SimpleNamespace(family=family, address=address, netmask=netmask)

    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        "lo": [a(socket.AF_INET, "127.0.0.1", "255.0.0.0"),
               a(socket.AF_INET6, "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")],
        "eth0": [a(psutil.AF_LINK, "02:00:00:00:00:01", None),
                 a(socket.AF_INET6, "2001:db8::1", "ffff:ffff:ffff:ffff::"),
                 a(socket.AF_INET6, "fe80::1%eth0", "ffff:ffff:ffff:ffff::"),
                 a(socket.AF_INET6, "fec0::1", "ffff:ffff:ffff:ffff::"),
                 a(socket.AF_INET, "192.0.2.10", "255.255.255.0"),
                 a(socket.AF_INET, "169.254.1.1", "255.255.0.0")],
        "eth0:1": [a(socket.AF_INET, "198.51.100.7", "255.255.255.128")],
        "wg0": [a(socket.AF_INET, "10.0.0.1", None)],
    })
    assert found(asyncio.run(net.ip_addresses())) == {
        ("eth0", "2001:db8::1", 64), ("eth0", "192.0.2.10", 24),
        ("eth0", "198.51.100.7", 25), ("wg0", "10.0.0.1", 32)}
    assert [a.address for a in asyncio.run(net.ip_addresses())] == [
        "192.0.2.10", "198.51.100.7", "10.0.0.1", "2001:db8::1"]
