"""GPUs: detection on sysfs trees shaped like real machines, and admission/assignment.

Each fixture tree is built from a small description of the machine (PCI devices with their
class, ids, driver, DRM nodes and the NVIDIA driver's /proc information), after what those
machines show in /sys/bus/pci/devices and /proc/driver/nvidia/gpus.
"""

from __future__ import annotations

import sys
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from farmnode.agent import gpus as gpumod
from farmnode.agent.core import Agent, InvalidAssignment, NotEnoughResources
from farmnode.api.errors import from_refusal
from farmnode.bus.errors import detail, error_class
from farmnode.config import Config
from farmnode.config.loader import ConfigError, load_config
from farmnode.sysinfo import gpu
from farmnode.systemd.scope import ScopeLimits, scope_properties
from farmnode.tasks.model import Assignment
from farmnode.tasks.store import Store


@dataclass
class Pci:
    slot: str
    cls: int
    vendor: int
    device: int
    driver: str | None = None
    drm: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    nvidia_info: dict[str, str] | None = None  # /proc/driver/nvidia/gpus/<slot>/information


def build(root: Path, devices: list[Pci]) -> tuple[Path, Path]:
    sys_root, proc = root / "sys", root / "proc"
    (sys_root / "bus/pci/devices").mkdir(parents=True)
    for d in devices:
        # sysfs: devices/<slot> is a link into the device tree, as on a real machine
        real = sys_root / "devices/pci0000:00" / d.slot
        real.mkdir(parents=True)
        (sys_root / "bus/pci/devices" / d.slot).symlink_to(real)
        (real / "class").write_text(f"0x{d.cls:06x}\n")
        (real / "vendor").write_text(f"0x{d.vendor:04x}\n")
        (real / "device").write_text(f"0x{d.device:04x}\n")
        if d.driver:
            drv = sys_root / "bus/pci/drivers" / d.driver
            drv.mkdir(parents=True, exist_ok=True)
            (real / "driver").symlink_to(drv)
        for name in d.drm:
            (real / "drm" / name).mkdir(parents=True)
        for name, text in d.files.items():
            (real / name).write_text(text)
        if d.nvidia_info is not None:
            info = proc / "driver/nvidia/gpus" / d.slot
            info.mkdir(parents=True)
            (info / "information").write_text(
                "".join(f"{k}:\t\t {v}\n" for k, v in d.nvidia_info.items()))
    return sys_root, proc


def h100(slot: str, minor: int, card: int) -> Pci:
    return Pci(slot, 0x030200, 0x10DE, 0x2330, "nvidia", (f"card{card}", f"renderD{127 + card}"),
               nvidia_info={"Model": "NVIDIA H100 80GB HBM3", "IRQ": "0",
                            "GPU UUID": f"GPU-{minor:08x}-1111-2222-3333-444455556666",
                            "Video BIOS": "96.00.74.00.01", "Bus Type": "PCIe",
                            "Device Minor": str(minor)})


# A 4-GPU server: the BMC's ASPEED display first, the driver's minors not in PCI order.
NVIDIA_SERVER = [
    Pci("0000:03:00.0", 0x030000, 0x1A03, 0x2000, "ast", ("card0",)),
    h100("0000:18:00.0", 0, 1), h100("0000:2a:00.0", 1, 2),
    h100("0000:ba:00.0", 3, 3), h100("0000:db:00.0", 2, 4),
    Pci("0000:19:00.0", 0x020000, 0x15B3, 0x1021, "mlx5_core"),  # a NIC
]
# A workstation: Intel iGPU, AMD RX 7900 XTX and its HDMI audio function.
WORKSTATION = [
    Pci("0000:00:02.0", 0x030000, 0x8086, 0xA780, "i915", ("card0", "renderD128")),
    Pci("0000:03:00.0", 0x030000, 0x1002, 0x744C, "amdgpu", ("card1", "renderD129"),
        files={"mem_info_vram_total": str(24 * 1024**3), "unique_id": "5c3c1a8e41b2f0e3"}),
    Pci("0000:03:00.1", 0x040300, 0x1002, 0xAB30, "snd_hda_intel"),
]
NO_GPU = [Pci("0000:00:1f.6", 0x020000, 0x8086, 0x15BC, "e1000e")]


def detect(tmp_path: Path, machine: list[Pci]) -> list[gpu.Gpu]:
    sys_root, proc = build(tmp_path, machine)
    return gpu.gpus(sys_root, proc, use_nvml=False)


def test_nvidia_server(tmp_path: Path) -> None:
    found = detect(tmp_path, NVIDIA_SERVER)
    assert [g.pci_slot for g in found] == ["0000:03:00.0", "0000:18:00.0", "0000:2a:00.0",
                                           "0000:ba:00.0", "0000:db:00.0"]
    bmc, *h100s = found
    assert (bmc.vendor, bmc.assignable, bmc.devices) == ("ASPEED", False, ("/dev/dri/card0",))
    assert all(g.assignable and g.fullname == "NVIDIA H100 80GB HBM3" for g in h100s)
    # /dev/nvidiaN from the driver's Device Minor, not the PCI order
    assert [g.devices[0] for g in h100s] == ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia3",
                                             "/dev/nvidia2"]
    assert h100s[2].devices == ("/dev/nvidia3", "/dev/dri/card3", "/dev/dri/renderD130")
    assert h100s[3].uuid == "GPU-00000002-1111-2222-3333-444455556666"
    assert [g.index for g in h100s] == [0, 1, 2, 3]
    assert gpumod.GpuPool.of(found).gpus == tuple(h100s)


def test_workstation(tmp_path: Path) -> None:
    intel, amd = detect(tmp_path, WORKSTATION)
    assert (intel.vendor, intel.uuid, intel.devices) == (
        "Intel", None, ("/dev/dri/card0", "/dev/dri/renderD128"))
    assert (amd.vendor, amd.vram_mb, amd.uuid) == ("AMD", 24576, "GPU-5c3c1a8e41b2f0e3")
    assert amd.devices == ("/dev/dri/card1", "/dev/dri/renderD129")
    assert intel.ident == "0000:00:02.0"  # no UUID: its PCI address names it
    assert gpu.control_devices([amd]) == ("/dev/kfd",)
    assert gpu.control_devices([intel]) == ()


def test_node_without_gpus(tmp_path: Path) -> None:
    assert detect(tmp_path, NO_GPU) == []
    assert gpumod.GpuPool.of([]).gpus == ()


def test_nvidia_without_driver_numbers_by_pci_order(tmp_path: Path) -> None:
    # No /proc/driver/nvidia (driver not loaded): the driver's default numbering.
    bare = [Pci(p.slot, p.cls, p.vendor, p.device, None) for p in NVIDIA_SERVER[1:3]]
    found = detect(tmp_path, bare)
    assert [(g.devices, g.uuid) for g in found] == [(("/dev/nvidia0",), None),
                                                    (("/dev/nvidia1",), None)]


def test_nvml_gives_uuid_and_minor(tmp_path: Path, monkeypatch: Any) -> None:
    # nvidia-ml-py is optional and not installed here: a module with its API's shape stands
    # in for it, to check what is read from it (bytes or str, as its versions return).
    class Info:
        busId = b"00000000:18:00.0"

    class Mem:
        total = 80 * 1024**3

    fake = types.ModuleType("pynvml")
    calls = {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1, "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetPciInfo": lambda h: Info(), "nvmlDeviceGetName": lambda h: b"H100 NVL",
        "nvmlDeviceGetMemoryInfo": lambda h: Mem(),
        "nvmlDeviceGetUUID": lambda h: "GPU-nvml", "nvmlDeviceGetMinorNumber": lambda h: 7,
    }
    for name, fn in calls.items():
        setattr(fake, name, fn)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sys_root, proc = build(tmp_path, NVIDIA_SERVER[1:2])
    (g,) = gpu.gpus(sys_root, proc)
    assert (g.model, g.uuid, g.vram_mb, g.devices[0]) == ("H100 NVL", "GPU-nvml", 81920,
                                                          "/dev/nvidia7")


# ---- admission and assignment -------------------------------------------------------------


def agent_on(tmp_path: Path, machine: list[Pci], **config: Any) -> Agent:
    pool = gpumod.GpuPool.of(detect(tmp_path, machine))
    agent = Agent(Config(**config), Store(tmp_path / "db"), scopes=None,  # type: ignore[arg-type]
                  gpu_pool=pool)

    def start(a: Assignment, gpu_ids: Any = ()) -> None:
        # Held as a running assignment, without running it (the VM tier runs them)
        agent.runs[a.id] = agent._new_run(a, gpu_ids)

    agent._start = start  # type: ignore[method-assign]
    return agent


_ids = iter(range(100, 10_000))


def job(gpus: object = None, jobtype: str = "command") -> dict[str, Any]:
    n = next(_ids)
    data: dict[str, Any] = {"command": ["/bin/true"]}
    if gpus is not None:
        data["gpus"] = gpus
    return {"job": {"id": n, "by": 1, "data": data}, "jobtype": {"name": jobtype, "version": 1},
            "tasks": [{"id": n, "frame": 1}]}


def test_gpus_assigned_whole_lowest_first_and_freed(tmp_path: Path) -> None:
    agent = agent_on(tmp_path, NVIDIA_SERVER)
    h100s = agent.gpu_pool.gpus
    a1, _ = agent.assign(job(2))
    a2, _ = agent.assign(job(1))
    assert agent.runs[a1].gpu_ids == (h100s[0].uuid, h100s[1].uuid)
    assert agent.runs[a2].gpu_ids == (h100s[2].uuid,)
    with pytest.raises(NotEnoughResources) as exc:
        agent.assign(job(2))
    assert str(exc.value) == ("Not enough gpus: agent_gpus=1 requires_gpus=2 "
                              "(job.data.gpus)")
    # no GPU asked: none given, the scope still confined (to nothing of the GPUs)
    a3, _ = agent.assign(job())
    assert agent.runs[a3].gpu_ids == () and agent.runs[a3].gpus == []
    status = {g["id"]: g["assignment"] for g in agent.status()["gpus"]}
    assert status == {h100s[0].uuid: a1, h100s[1].uuid: a1, h100s[2].uuid: a2,
                      h100s[3].uuid: None}
    # the task records carry their assignment's GPUs
    assert [t["gpus"] for t in agent.list_tasks() if t["assignment_id"] == a1] == [
        [h100s[0].uuid, h100s[1].uuid]]
    del agent.runs[a1]  # the assignment ended
    a4, _ = agent.assign(job(3))
    assert agent.runs[a4].gpu_ids == (h100s[0].uuid, h100s[1].uuid, h100s[3].uuid)


def test_more_gpus_than_the_node_has_is_invalid(tmp_path: Path) -> None:
    agent = agent_on(tmp_path, NVIDIA_SERVER)
    with pytest.raises(InvalidAssignment) as exc:
        agent.assign(job(5))
    assert exc.value.field == "job.data.gpus"
    assert str(exc.value).startswith("job.data.gpus: asks for 5 GPUs; this node has 4 (")
    none = agent_on(tmp_path / "b", NO_GPU)
    with pytest.raises(InvalidAssignment, match=r"asks for 1 GPUs; this node has 0$"):
        none.assign(job(1))
    # a node without GPUs leaves its tasks' device access alone
    aid, _ = none.assign(job())
    assert none.runs[aid].gpus is None


@pytest.mark.parametrize("bad", ["2", 1.5, True, -1, [1]])
def test_gpus_that_are_not_a_count(tmp_path: Path, bad: object) -> None:
    agent = agent_on(tmp_path, NVIDIA_SERVER)
    with pytest.raises(InvalidAssignment) as exc:
        agent.assign(job(bad))
    assert exc.value.field == "job.data.gpus"
    assert repr(bad) in str(exc.value) or str(bad) in str(exc.value)


def test_count_per_job_type_from_config(tmp_path: Path) -> None:
    agent = agent_on(tmp_path, WORKSTATION, task_gpus="blender=1, command=0")
    aid, _ = agent.assign(job(jobtype="blender"))
    assert len(agent.runs[aid].gpu_ids) == 1
    aid, _ = agent.assign(job(jobtype="command"))
    assert agent.runs[aid].gpu_ids == ()
    aid, _ = agent.assign(job(gpus=1, jobtype="command"))  # the job's own count wins
    assert len(agent.runs[aid].gpu_ids) == 1


def test_config_keys_checked(tmp_path: Path) -> None:
    conf = tmp_path / "farmnode.yaml"
    conf.write_text("task_gpus: [blender=1, 'cycles = 2']\ntask_device_allow: ['/dev/fuse rw']\n")
    config = load_config(conf, tmp_path / "none.d")
    assert config.task_gpus == "blender=1, cycles=2"
    conf.write_text("task_gpus: blender\n")
    with pytest.raises(ConfigError, match=r"farmnode.yaml:1.*task_gpus.*JOBTYPE=COUNT"):
        load_config(conf, tmp_path / "none.d")
    conf.write_text("\ntask_device_allow: /dev/fuse rwx\n")
    with pytest.raises(ConfigError, match=r"farmnode.yaml:2.*task_device_allow"):
        load_config(conf, tmp_path / "none.d")


def test_scope_and_environment(tmp_path: Path) -> None:
    pool = gpumod.GpuPool.of(detect(tmp_path, NVIDIA_SERVER))
    mine = [pool.gpus[2]]
    allow = gpumod.device_allow(mine, ["/dev/fuse", "char-drm r"])
    assert allow == [("/dev/nvidia3", "rw"), ("/dev/dri/card3", "rw"),
                     ("/dev/dri/renderD130", "rw"), ("/dev/nvidiactl", "rw"),
                     ("/dev/nvidia-modeset", "rw"), ("/dev/nvidia-uvm", "rw"),
                     ("/dev/nvidia-uvm-tools", "rw"), ("/dev/fuse", "rw"), ("char-drm", "r")]
    props = dict(scope_properties([1], "farmnode.slice", "t", ScopeLimits(), 1, devices=allow))
    assert props["DevicePolicy"] == ("s", "closed")
    assert props["DeviceAllow"] == ("a(ss)", allow)
    assert "DevicePolicy" not in dict(scope_properties([1], "s", "t", ScopeLimits(), 1))
    env = gpumod.environment(mine)
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == mine[0].uuid
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and "ROCR_VISIBLE_DEVICES" not in env
    assert gpumod.environment([]) | {} == {"CUDA_VISIBLE_DEVICES": "",
                                           "NVIDIA_VISIBLE_DEVICES": "void",
                                           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    no_uuid = [Pci(p.slot, p.cls, p.vendor, p.device) for p in NVIDIA_SERVER[1:4]]
    bare = detect(tmp_path / "bare", no_uuid)
    assert gpumod.environment(bare[1:])["CUDA_VISIBLE_DEVICES"] == "1,2"
    _, amd = detect(tmp_path / "ws", WORKSTATION)
    env = gpumod.environment([amd])
    assert (env["ROCR_VISIBLE_DEVICES"], env["GPU_DEVICE_ORDINAL"]) == ("GPU-5c3c1a8e41b2f0e3",
                                                                        "0")


def test_master_gets_pyfarms_resource_answer() -> None:
    refused = NotEnoughResources("gpus", 1, 2, "job.data.gpus")
    err = from_refusal(error_class(refused).dbus_error_name, str(refused),
                       {k: v for k, (_sig, v) in detail(refused).items()})
    assert err.status.startswith("400")
    assert err.to_dict() == {"error": "Not enough gpus", "agent_gpus": 1, "requires_gpus": 2}


def test_gpus_survive_in_the_store(tmp_path: Path) -> None:
    agent = agent_on(tmp_path, NVIDIA_SERVER)
    aid, _ = agent.assign(job(2))
    store = Store(tmp_path / "db")
    assert store.gpus_of(aid) == agent.runs[aid].gpu_ids
    assert store.gpus_of(str(uuid.uuid4())) == ()


def test_job_types_take_the_agents_gpus_key() -> None:
    # `gpus` is the agent's; a job type that refuses unknown data keys must not refuse it
    from farmnode.jobtypes.command import CommandJobType
    from farmnode.tasks.model import Job, JobTypeRef, Task

    a = Assignment("a", Job(id=1, by=1, data={"command": ["/bin/true"], "gpus": 1}),
                   JobTypeRef("command", 1), (Task(1, 1.0),))

    class Reporter:
        def set_task_state(self, *args: Any) -> None: ...
        def set_task_progress(self, *args: Any) -> None: ...

    assert CommandJobType(a, Reporter()).get_command_data().arguments == ()  # type: ignore[arg-type]
    typo = Assignment("b", Job(id=1, by=1, data={"command": ["/bin/true"], "gpu": 1}),
                      JobTypeRef("command", 1), (Task(1, 1.0),))
    with pytest.raises(ValueError, match=r"job.data.gpu: unknown key"):
        CommandJobType(typo, Reporter()).get_command_data()  # type: ignore[arg-type]


def test_store_of_an_older_build_gains_the_gpus_column(tmp_path: Path) -> None:
    import sqlite3

    from farmnode.tasks import store as store_mod

    # the schema as builds before GPUs wrote it
    old = store_mod.SCHEMA.replace(
        "accounting TEXT,  -- JSON: the scope's cgroup figures, last sampled or final\n"
        "    gpus TEXT,  -- JSON: the GPUs (UUID, else PCI address) the assignment holds\n",
        "accounting TEXT\n")
    old = "\n".join(line for line in old.splitlines() if "paused_" not in line)
    assert "gpus" not in old and "accounting TEXT\n);" in old
    db = sqlite3.connect(tmp_path / "db")
    db.executescript(old)
    db.execute("INSERT INTO assignments (id, job_id, payload, unit, created) VALUES"
               " ('a1', 1, '{}', 'u.scope', 0)")
    db.execute("INSERT INTO tasks (assignment_id, id, job_id, frame, attempt, state, created)"
               " VALUES ('a1', 1, 1, 1, 0, 'queued', 0)")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    # rows written before it hold no GPUs; a task of theirs reads as holding none
    assert store.gpus_of("a1") == () and [t.gpus for t in store.tasks("a1")] == [()]
