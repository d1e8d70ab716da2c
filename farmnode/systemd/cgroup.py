"""Reading a task's cgroup: where a scope's cgroup is, and what it says about the task.

Standard library only (the shim imports this). On a hybrid-hierarchy host (the test
container) the v2 tree is /sys/fs/cgroup/unified and has no controllers, so memory and pids
figures are missing there; on a pure v2 host (Debian 12, the VM tier) all are present.
"""

from __future__ import annotations

import os

ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def cgroup_path_dir(path: str) -> str | None:
    """The directory of cgroup `path` (as in ControlGroup=, "/farmnode.slice/x.scope")."""
    for root in ROOTS:
        if os.path.exists(f"{root}{path}/cgroup.procs"):
            return f"{root}{path}"
    return None


def unit_cgroup_path(unit: str, slice_name: str) -> str:
    """systemd's cgroup path of a unit in a slice: "a-b.slice" nests in "a.slice"."""
    stem = slice_name.removesuffix(".slice")
    parts = stem.split("-")
    slices = ["-".join(parts[:i + 1]) + ".slice" for i in range(len(parts))]
    if stem == "-":
        slices = []
    return "/" + "/".join([*slices, unit])


SHIM_NAME = "farmnode-shim"  # the comm the shim gives itself


def shim_pid(directory: str | None) -> int | None:
    """The shim's process among a cgroup's (its name tells it from the job's)."""
    if directory is None:
        return None
    try:
        with open(f"{directory}/cgroup.procs") as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == SHIM_NAME:
                    return pid
        except OSError:
            continue
    return None


def own_cgroup_dir() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    return None if path is None else cgroup_path_dir(path)


def read_accounting(directory: str | None) -> dict[str, int]:
    """What the cgroup says about the whole task; a field is missing where not exposed."""
    out: dict[str, int] = {}
    if directory is None:
        return out

    def read(name: str) -> str | None:
        try:
            with open(f"{directory}/{name}") as f:
                return f.read()
        except OSError:
            return None

    for name, key in (("memory.peak", "memory_peak"), ("memory.current", "memory_current"),
                      ("pids.current", "tasks_current"), ("pids.peak", "tasks_peak")):
        text = read(name)
        if text is not None and text.strip().isdigit():
            out[key] = int(text)
    for name, wanted in (("memory.events", {"oom_kill": "oom_kills", "max": "memory_max_events"}),
                         ("cpu.stat", {"usage_usec": "cpu_usage_usec"})):
        text = read(name)
        for line in (text or "").splitlines():
            k, _, v = line.partition(" ")
            if k in wanted and v.strip().isdigit():
                out[wanted[k]] = int(v)
    return out
