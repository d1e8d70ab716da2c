"""The node's GPUs as a resource: how many a job asks for, which ones it gets, what its scope
may open and what its environment says.

A job asks with `gpus` in its job data (PyFarm's free-form dict, so the 0.8.6 master carries it
unchanged); without it the count comes from `task_gpus` for its job type, else 0. GPUs are handed
out whole, lowest PCI address first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from farmnode.sysinfo.gpu import AMD, NVIDIA, Gpu, control_devices
from farmnode.tasks.model import Assignment

FIELD = "job.data.gpus"


class GpuRequestError(ValueError):
    """The job's `gpus` is not a count (the message names what is wrong)."""


def requested(a: Assignment, per_jobtype: Mapping[str, int]) -> int:
    value = a.job.data.get("gpus")
    if value is None:
        return per_jobtype.get(a.jobtype.name, 0)
    # bool is an int to Python, never a count to anyone
    if isinstance(value, bool) or not isinstance(value, int):
        raise GpuRequestError(f"must be a whole number of GPUs, got {value!r}")
    if value < 0:
        raise GpuRequestError(f"must be 0 or more, got {value}")
    return value


@dataclass(frozen=True)
class GpuPool:
    """The GPUs tasks may get (display-only ones such as a BMC's are not among them)."""

    gpus: tuple[Gpu, ...]

    @classmethod
    def of(cls, found: Iterable[Gpu]) -> GpuPool:
        return cls(tuple(g for g in found if g.assignable))

    def by_ident(self, idents: Iterable[str]) -> list[Gpu]:
        known = {g.ident: g for g in self.gpus}
        return [known[i] for i in idents if i in known]

    def free(self, held: Iterable[str]) -> list[Gpu]:
        taken = set(held)
        return [g for g in self.gpus if g.ident not in taken]


def split_listed(value: str) -> list[str]:
    return [e.strip() for e in value.split(",") if e.strip()]


def device_allow(assigned: list[Gpu], extra: Iterable[str] = ()) -> list[tuple[str, str]]:
    """DeviceAllow= entries: the assigned GPUs' nodes, their drivers' control nodes, extras
    ("PATH" or "PATH rw")."""
    out = [(node, "rw") for g in assigned for node in g.devices]
    out += [(node, "rw") for node in control_devices(assigned)]
    for entry in extra:
        path, _, mode = entry.strip().partition(" ")
        out.append((path, mode.strip() or "rw"))
    return out


def environment(assigned: list[Gpu]) -> dict[str, str]:
    """What tells CUDA/ROCm which GPUs are the task's (the kernel already refuses the rest)."""
    env: dict[str, str] = {}
    nvidia = [g for g in assigned if g.vendor_id == NVIDIA]
    # Set also with no NVIDIA GPU assigned: "" hides every GPU from CUDA, which would
    # otherwise find the others through the driver and fail opening them.
    names = ",".join(g.uuid or str(g.index) for g in nvidia)
    env["CUDA_VISIBLE_DEVICES"] = names
    # NVIDIA's container toolkit reads this one ("void": none)
    env["NVIDIA_VISIBLE_DEVICES"] = names or "void"
    # Indexes mean PCI order only with this (CUDA's default is fastest first).
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    amd = [g for g in assigned if g.vendor_id == AMD]
    if amd and all(g.uuid for g in amd):
        # ROCr takes UUIDs; without them it is left alone: ROCr drops the GPUs whose render
        # node the device cgroup refuses and numbers the rest from 0, so the node-wide
        # indexes would name the wrong ones.
        env["ROCR_VISIBLE_DEVICES"] = ",".join(g.uuid or "" for g in amd)
    if amd:
        # OpenCL's ordinals count only what the task can open: 0..n-1.
        env["GPU_DEVICE_ORDINAL"] = ",".join(str(i) for i in range(len(amd)))
    return env
