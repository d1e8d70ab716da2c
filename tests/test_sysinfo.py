"""Host facts (farmnode.sysinfo) on this host and on fake /sys trees."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from farmnode.sysinfo import collect, gpu, host, identity, net
from farmnode.sysinfo.timeoffset import NTP_EPOCH_OFFSET, offset_from_timesyncd, sntp_offset


def test_node_uuid_is_systemds_app_specific_id() -> None:
    # The same ID as systemd's own tool derives for farmnode's application ID on this host.
    out = subprocess.run(["systemd-id128", "machine-id", "--uuid",
                          f"--app-specific={identity.APP_ID}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert identity.node_uuid() == uuid.UUID(out)
    assert identity.node_uuid().version == 4
    assert identity.node_uuid() != identity.APP_ID


@pytest.mark.parametrize("content", ["uninitialized\n", ""])
def test_uuid_without_machine_id_is_random(tmp_path: Path, content: str) -> None:
    # A first-boot machine-id, seen through a private mount namespace so the host's is
    # untouched; each process asks sd-id128 afresh.
    fake = tmp_path / "machine-id"
    fake.write_text(content)
    probe = "from farmnode.sysinfo import identity; print(identity.node_uuid())"
    script = (f"mount --bind {fake} /etc/machine-id && "
              f"{sys.executable} -c '{probe}' && {sys.executable} -c '{probe}'")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True)
    if res.returncode != 0 and "unshare" in res.stderr:
        pytest.skip(f"no private mount namespace here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    first, second = (uuid.UUID(line) for line in res.stdout.split())
    assert first != second
    assert first.version == 4
    assert identity.node_uuid() not in (first, second)


def test_host_facts_on_this_host() -> None:
    assert host.os_class() == "linux"
    assert "Linux" in host.os_fullname()
    assert host.cpu_count() >= 1
    assert host.cpu_name()
    assert 0 < host.ram_free_mb() <= host.ram_total_mb()
    disks = host.disks()
    assert disks and all(d.size >= d.free >= 0 for d in disks)
    assert any(d.mountpoint == "/" for d in disks) or len(disks) >= 1
    assert host.uptime() > 0
    assert len(host.load_average()) == 3


def test_cpu_name_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R)  Xeon(R) Gold 6248R CPU @ 3.00GHz\n")
    assert host.cpu_name(info) == "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz"


def test_os_fullname_reads_os_release(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('NAME="Rocky"\nPRETTY_NAME="Rocky Linux 9.3"\n')
    assert host.os_fullname(tmp_path).startswith("Rocky Linux 9.3, Linux ")


def test_network_addresses_over_netlink() -> None:
    macs = asyncio.run(net.mac_addresses())
    assert all(len(m) == 17 and m == m.lower() and m != "00:00:00:00:00:00" for m in macs)
    addrs = asyncio.run(net.ip_addresses())
    assert all(not a.address.startswith("127.") and a.address != "::1" for a in addrs)
    # the address the default route leaves from is among them
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.200", 9))
            mine = s.getsockname()[0]
        except OSError:
            mine = None
    if mine and not mine.startswith("127."):
        assert mine in {a.address for a in addrs}


def _pci(root: Path, slot: str, cls: str, vendor: str, device: str,
         driver: str | None = None, **files: str) -> Path:
    dev = root / "bus/pci/devices" / slot
    dev.mkdir(parents=True)
    (dev / "class").write_text(cls + "\n")
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "device").write_text(device + "\n")
    if driver:
        target = root / "bus/pci/drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (dev / "driver").symlink_to(target)
    for name, text in files.items():
        (dev / name).write_text(text)
    return dev


def test_gpus_from_fake_sysfs(tmp_path: Path) -> None:
    sys_root, proc = tmp_path / "sys", tmp_path / "proc"
    _pci(sys_root, "0000:00:02.0", "0x030000", "0x8086", "0x9bc4", "i915")
    _pci(sys_root, "0000:01:00.0", "0x030200", "0x10de", "0x2330", "nvidia")
    _pci(sys_root, "0000:02:00.0", "0x030000", "0x1002", "0x744c", "amdgpu",
         mem_info_vram_total=str(24 * 1024**3))
    _pci(sys_root, "0000:03:00.0", "0x020000", "0x8086", "0x1521", "igb")  # a NIC
    nv = proc / "driver/nvidia/gpus/0000:01:00.0"
    nv.mkdir(parents=True)
    (nv / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   42\n")
    found = gpu.gpus(sys_root, proc, use_nvml=False)
    assert [g.pci_slot for g in found] == ["0000:00:02.0", "0000:01:00.0", "0000:02:00.0"]
    intel, nvidia, amd = found
    assert (intel.vendor, intel.driver, intel.vram_mb) == ("Intel", "i915", None)
    assert nvidia.fullname == "NVIDIA H100 80GB HBM3" and nvidia.driver == "nvidia"
    assert (amd.vendor, amd.driver, amd.vram_mb) == ("AMD", "amdgpu", 24576)
    assert amd.fullname.startswith("AMD ")


def test_pci_ids_lookup(tmp_path: Path) -> None:
    ids = tmp_path / "pci.ids"
    ids.write_text("# comment\n1002  Advanced Micro Devices, Inc. [AMD/ATI]\n"
                   "\t744c  Navi 31 [Radeon RX 7900 XT/7900 XTX]\n"
                   "\t\t1002 0e3b  subsystem\n10de  NVIDIA Corporation\n\t744c  not this\n")
    assert gpu._pci_ids_name(0x1002, 0x744C, (ids,)) == "Navi 31 [Radeon RX 7900 XT/7900 XTX]"
    assert gpu._pci_ids_name(0x1002, 0x0001, (ids,)) is None


def test_no_gpus_without_sysfs(tmp_path: Path) -> None:
    assert gpu.gpus(tmp_path, tmp_path, use_nvml=False) == []


def test_offset_from_timesyncd_message() -> None:
    # T1..T4 in µs: the server is 2.5 s ahead, 10 ms each way.
    t1 = 1_700_000_000_000_000
    msg = (0, 4, 4, 2, -20, 0, 0, b"", t1, t1 + 2_510_000, t1 + 2_510_100, t1 + 20_100,
           False, 5, 100)
    assert offset_from_timesyncd(msg) == pytest.approx(2.5)
    assert offset_from_timesyncd((0,) * 15) is None


def test_sntp_against_a_local_server() -> None:
    """A real UDP NTP server on loopback answering 30 s ahead of our clock."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        data, addr = srv.recvfrom(48)
        now = time.time() + 30 + NTP_EPOCH_OFFSET
        ts = struct.pack("!II", int(now), int((now % 1) * 2**32))
        reply = bytes([(4 << 3) | 4]) + bytes(23) + data[40:48] + ts + ts
        srv.sendto(reply, addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        offset = asyncio.run(sntp_offset("127.0.0.1", timeout=5, port=port))
    finally:
        t.join(5)
        srv.close()
    assert offset == pytest.approx(30, abs=1)


def test_sntp_gives_up_quickly_without_a_server() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        with pytest.raises((TimeoutError, OSError)):
            asyncio.run(sntp_offset("127.0.0.1", timeout=0.3, port=srv.getsockname()[1]))
    finally:
        srv.close()


def test_collect_everything() -> None:
    facts = asyncio.run(collect())
    body = facts.to_json()
    assert body["os_class"] == "linux" and body["cpus"] >= 1 and body["ram"] > 0
    assert isinstance(body["gpus"], list) and isinstance(body["mac_addresses"], list)
    assert not facts.errors
