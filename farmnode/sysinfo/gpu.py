"""GPUs from sysfs PCI: vendor, model, driver, the /dev nodes of each and, where known, VRAM/UUID.

sysfs works for every vendor without a vendor library and without root. Names come from, in
order: NVML (the optional `nvidia-ml-py`, imported only if installed), the NVIDIA driver's
/proc/driver/nvidia/gpus/<bus>/information, the pci.ids database, and the raw PCI ids.
VRAM: NVML, or amdgpu's `mem_info_vram_total`; other drivers do not expose it.
Device nodes: DRM's card/renderD nodes are listed under the PCI device in sysfs; NVIDIA's
/dev/nvidiaN takes its N from NVML or the driver's "Device Minor", else the GPU's place among the
NVIDIA GPUs in PCI order (the driver's own default numbering). UUIDs: NVML, the driver's
"GPU UUID", amdgpu's `unique_id`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PCI_CLASS_DISPLAY = 0x03
VENDORS = {
    0x10DE: "NVIDIA", 0x1002: "AMD", 0x8086: "Intel", 0x1A03: "ASPEED", 0x102B: "Matrox",
    0x1234: "QEMU", 0x1AF4: "virtio", 0x15AD: "VMware", 0x1B36: "Red Hat", 0x5143: "Qualcomm",
}
# Vendors whose GPUs render and compute: the others (a server's ASPEED or Matrox BMC display,
# a VM's virtual display) are listed to the master but never handed to a task.
COMPUTE_VENDORS = frozenset({0x10DE, 0x1002, 0x8086})
NVIDIA, AMD = 0x10DE, 0x1002
PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@dataclass(frozen=True)
class Gpu:
    pci_slot: str  # "0000:01:00.0"
    vendor: str
    model: str
    driver: str | None
    vram_mb: int | None
    vendor_id: int = 0
    device_id: int = 0
    uuid: str | None = None
    # The GPU's place among its vendor's GPUs in PCI order (CUDA_DEVICE_ORDER=PCI_BUS_ID).
    index: int = 0
    # The /dev nodes that are this GPU's alone (the shared control nodes: `control_devices`).
    devices: tuple[str, ...] = ()

    @property
    def assignable(self) -> bool:
        return self.vendor_id in COMPUTE_VENDORS

    @property
    def ident(self) -> str:
        """How the agent names the GPU in assignments: the UUID, else the PCI address."""
        return self.uuid or self.pci_slot

    @property
    def fullname(self) -> str:
        """The one string PyFarm's master keeps per GPU (GPU.fullname)."""
        if self.model.lower().startswith(self.vendor.lower()):
            return self.model
        return f"{self.vendor} {self.model}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pci_ids_name(vendor: int, device: int, paths: tuple[Path, ...] = PCI_IDS) -> str | None:
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        in_vendor = False
        for line in lines:
            if not line or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                in_vendor = line[:4].lower() == f"{vendor:04x}"
            elif in_vendor and not line.startswith("\t\t") and line[1:5].lower() == f"{device:04x}":
                return line[5:].strip()
    return None


def _nvidia_proc(slot: str, proc: Path) -> dict[str, str]:
    """The NVIDIA driver's /proc/driver/nvidia/gpus/<slot>/information ("Model", "GPU UUID",
    "Device Minor", ...)."""
    info = _read(proc / "driver/nvidia/gpus" / slot / "information")
    out = {}
    for line in (info or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class _NvmlGpu:
    name: str
    vram_mb: int
    uuid: str | None
    minor: int | None


def _nvml() -> dict[str, _NvmlGpu]:
    """PCI slot → what NVML says; empty without nvidia-ml-py or a driver."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return {}
    out: dict[str, _NvmlGpu] = {}
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound and friends
        log.debug("NVML unavailable: %s", exc)
        return {}
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            bus = nvml.nvmlDeviceGetPciInfo(handle).busId
            bus = bus.decode() if isinstance(bus, bytes) else str(bus)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024)
            uuid: str | None = None
            minor: int | None = None
            with contextlib.suppress(Exception):
                raw = nvml.nvmlDeviceGetUUID(handle)
                uuid = raw.decode() if isinstance(raw, bytes) else str(raw)
            with contextlib.suppress(Exception):
                minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
            # NVML says "00000000:01:00.0"; sysfs "0000:01:00.0"
            out[bus.lower()[-12:]] = _NvmlGpu(name, total, uuid, minor)
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return out


def _drm_nodes(dev: Path) -> list[str]:
    try:
        names = sorted(p.name for p in (dev / "drm").iterdir())
    except OSError:
        return []
    return [f"/dev/dri/{n}" for n in names if n.startswith(("card", "renderD"))]


def gpus(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
         use_nvml: bool = True) -> list[Gpu]:
    devices = sys_root / "bus/pci/devices"
    try:
        slots = sorted(p.name for p in devices.iterdir())
    except OSError:
        return []
    nvml = _nvml() if use_nvml else {}
    out = []
    per_vendor: dict[int, int] = {}
    for slot in slots:
        dev = devices / slot
        cls, ven, did = (_read(dev / n) for n in ("class", "vendor", "device"))
        if cls is None or ven is None or did is None:
            continue
        try:
            pci_class, vendor, device = int(cls, 16), int(ven, 16), int(did, 16)
        except ValueError:
            continue
        if pci_class >> 16 != PCI_CLASS_DISPLAY:
            continue
        index = per_vendor.get(vendor, 0)
        per_vendor[vendor] = index + 1
        driver_link = dev / "driver"
        driver = driver_link.resolve().name if driver_link.is_symlink() else None
        vendor_name = VENDORS.get(vendor, f"PCI vendor {vendor:04x}")
        vram: int | None = None
        model = uuid = None
        nodes = _drm_nodes(dev)
        if vendor == NVIDIA:
            proc = _nvidia_proc(slot, proc_root)
            from_nvml = nvml.get(slot)
            minor: int | None = None
            if from_nvml is not None:
                model, vram, uuid, minor = (from_nvml.name, from_nvml.vram_mb, from_nvml.uuid,
                                            from_nvml.minor)
            model = model or proc.get("Model")
            uuid = uuid or proc.get("GPU UUID") or None
            if minor is None:
                text = proc.get("Device Minor", "")
                minor = int(text) if text.isdigit() else index
            nodes.insert(0, f"/dev/nvidia{minor}")
        elif vendor == AMD:
            unique = _read(dev / "unique_id")
            # ROCr names a GPU "GPU-" and amdgpu's unique_id (ROCR_VISIBLE_DEVICES takes it)
            uuid = f"GPU-{unique}" if unique else None
        if model is None:
            model = _pci_ids_name(vendor, device) or f"device {device:04x}"
        if vram is None:
            vram_bytes = _read(dev / "mem_info_vram_total")  # amdgpu
            if vram_bytes and vram_bytes.isdigit():
                vram = int(vram_bytes) // (1024 * 1024)
        out.append(Gpu(slot, vendor_name, model, driver, vram, vendor, device, uuid, index,
                       tuple(nodes)))
    return out


# What a driver's user-space needs besides the GPU's own nodes; nodes that do not exist (yet)
# cost nothing: systemd skips a DeviceAllow= path it cannot stat.
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-modeset", "/dev/nvidia-uvm",
                  "/dev/nvidia-uvm-tools")
AMD_CONTROL = ("/dev/kfd",)  # ROCm's compute interface, one for all AMD GPUs


def control_devices(assigned: list[Gpu]) -> tuple[str, ...]:
    vendors = {g.vendor_id for g in assigned}
    out: tuple[str, ...] = ()
    if NVIDIA in vendors:
        out += NVIDIA_CONTROL
    if AMD in vendors:
        out += AMD_CONTROL
    return out
