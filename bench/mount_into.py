"""Bind a host directory into a running container's mount namespace (open_tree + move_mount).

The bench journal needs a disk, not the container's tmpfs overlay: 10 M lines make GBs of
journal files. booted() offers read-only binds only, and the host is no systemd (no shared
propagation for machinectl-style binds), so the host directory is cloned as a detached mount
and attached inside the container's namespace. Run as its own process (setns of a mount
namespace needs a single-threaded caller):

    python3 bench/mount_into.py LEADER_PID HOST_DIR TARGET
"""

from __future__ import annotations

import ctypes
import os
import sys

SYS_OPEN_TREE = 428  # x86_64
SYS_MOVE_MOUNT = 429
AT_FDCWD = -100
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
CLONE_NEWNS = 0x00020000


def mount_into(leader: int, host_dir: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    tree = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, host_dir.encode(),
                        OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)
    if tree < 0:
        raise OSError(ctypes.get_errno(), f"open_tree {host_dir}")
    ns = os.open(f"/proc/{leader}/ns/mnt", os.O_RDONLY)
    if libc.setns(ns, CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    if libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(),
                    MOVE_MOUNT_F_EMPTY_PATH) != 0:
        raise OSError(ctypes.get_errno(), f"move_mount to {target}")


if __name__ == "__main__":
    mount_into(int(sys.argv[1]), sys.argv[2], sys.argv[3])
