"""GPUs from sysfs PCI: vendor, model, driver and, where the driver says, VRAM.

sysfs works for every vendor without a vendor library and without root. Names come from, in
order: NVML (the optional `nvidia-ml-py`, imported only if installed), the NVIDIA driver's
/proc/driver/nvidia/gpus/<bus>/information, the pci.ids database, and the raw PCI ids.
VRAM: NVML, or amdgpu's `mem_info_vram_total`; other drivers do not expose it.
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
PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@dataclass(frozen=True)
class Gpu:
    pci_slot: str  # "0000:01:00.0"
    vendor: str
    model: str
    driver: str | None
    vram_mb: int | None

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


def _nvidia_proc_model(slot: str, proc: Path) -> str | None:
    info = _read(proc / "driver/nvidia/gpus" / slot / "information")
    for line in (info or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Model":
            return value.strip()
    return None


def _nvml() -> dict[str, tuple[str, int]]:
    """PCI slot → (name, VRAM MB) from NVML; empty without nvidia-ml-py or a driver."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return {}
    out: dict[str, tuple[str, int]] = {}
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
            # NVML says "00000000:01:00.0"; sysfs "0000:01:00.0"
            out[bus.lower()[-12:]] = (name, total)
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return out


def gpus(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
         use_nvml: bool = True) -> list[Gpu]:
    devices = sys_root / "bus/pci/devices"
    try:
        slots = sorted(p.name for p in devices.iterdir())
    except OSError:
        return []
    nvml = _nvml() if use_nvml else {}
    out = []
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
        driver_link = dev / "driver"
        driver = driver_link.resolve().name if driver_link.is_symlink() else None
        vendor_name = VENDORS.get(vendor, f"PCI vendor {vendor:04x}")
        vram: int | None = None
        model = None
        if slot in nvml:
            model, vram = nvml[slot]
        if model is None and vendor == 0x10DE:
            model = _nvidia_proc_model(slot, proc_root)
        if model is None:
            model = _pci_ids_name(vendor, device) or f"device {device:04x}"
        if vram is None:
            vram_bytes = _read(dev / "mem_info_vram_total")  # amdgpu
            if vram_bytes and vram_bytes.isdigit():
                vram = int(vram_bytes) // (1024 * 1024)
        out.append(Gpu(slot, vendor_name, model, driver, vram))
    return out
