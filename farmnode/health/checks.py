"""The built-in health checks: each a function returning a CheckResult, run by farmnode-health
inside its own unit (farmnode-health@<name>.service), never inside the agent.

The network check is in farmnode.health.network (it imports pyroute2, which the agent must not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from farmnode.sysinfo import gpu

MB = 1024 * 1024
JOURNAL_VARLINK = "/run/systemd/journal/io.systemd.journal"
JOURNAL_TIMEOUT = 5.0  # s a journald that answers nothing is given


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    message: str


def _oserror(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"


def scratch(path: str, min_free_mb: int) -> CheckResult:
    """Free space where tasks write: below min_free_mb the node takes no work."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return CheckResult(False, f"{path}: cannot read its free space ({_oserror(exc)})")
    free = st.f_bavail * st.f_frsize // MB
    if free < min_free_mb:
        return CheckResult(False, f"{path}: {free} MB free, below health_scratch_min_free "
                                  f"({min_free_mb} MB)")
    return CheckResult(True, f"{path}: {free} MB free (health_scratch_min_free "
                             f"{min_free_mb} MB)")


def state_dir(path: str) -> CheckResult:
    """The agent's state directory takes a durable write (what the store needs)."""
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".farmnode-health-")
    except OSError as exc:
        return CheckResult(False, f"state directory {path}: cannot create a file "
                                  f"({_oserror(exc)})")
    try:
        os.write(fd, b"farmnode health check\n" * 64)
        os.fsync(fd)
    except OSError as exc:
        return CheckResult(False, f"state directory {path}: cannot write and sync a file "
                                  f"({_oserror(exc)})")
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return CheckResult(True, f"state directory {path}: writable")


def journald(socket_path: str = JOURNAL_VARLINK, timeout: float = JOURNAL_TIMEOUT
             ) -> CheckResult:
    """journald answers: a Synchronize call over its varlink socket returns. A socket that
    only accepts (journald stopped, its socket units holding the sockets) would not."""
    start = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(json.dumps({"method": "io.systemd.Journal.Synchronize",
                                  "parameters": {}}).encode() + b"\0")
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = s.recv(4096)
                if not chunk:
                    return CheckResult(False, f"journald closed {socket_path} without an "
                                              "answer")
                reply += chunk
                if len(reply) > 65536:
                    return CheckResult(False, f"journald's answer on {socket_path} is not "
                                              "varlink")
    except TimeoutError:
        return CheckResult(False, f"journald did not answer on {socket_path} within "
                                  f"{timeout:g} s")
    except OSError as exc:
        return CheckResult(False, f"journald is not reachable on {socket_path} "
                                  f"({_oserror(exc)})")
    try:
        answer = json.loads(reply[:-1])
    except ValueError:
        return CheckResult(False, f"journald's answer on {socket_path} is not JSON")
    if not isinstance(answer, dict) or answer.get("error"):
        err = answer.get("error") if isinstance(answer, dict) else answer
        return CheckResult(False, f"journald refused Synchronize: {err}")
    return CheckResult(True, f"journald answered in {(time.monotonic() - start) * 1000:.0f} ms")


def gpus(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
         dev_root: Path = Path("/"), use_nvml: bool = True) -> CheckResult:
    """Every GPU tasks may get has its driver bound and its device nodes present (a GPU whose
    driver failed to load, or whose nodes are gone, fails every frame given to it)."""
    found = [g for g in gpu.gpus(sys_root, proc_root, use_nvml) if g.assignable]
    if not found:
        return CheckResult(True, "no GPUs for tasks on this node")
    problems = []
    for g in found:
        name = f"{g.pci_slot} ({g.fullname})"
        if g.driver is None:
            problems.append(f"{name}: no driver bound")
            continue
        nodes = [*g.devices, *gpu.control_devices([g])[:1]]
        missing = [n for n in nodes if not (dev_root / n.lstrip("/")).exists()]
        if missing:
            problems.append(f"{name}: driver {g.driver} but no {', '.join(missing)}")
    if problems:
        return CheckResult(False, "; ".join(problems))
    return CheckResult(True, ", ".join(f"{g.pci_slot} {g.driver}" for g in found))
