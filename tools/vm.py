"""A real kernel with every cgroup v2 controller: the container tree booted in qemu (TCG).

The container tier cannot enforce memory or CPU limits (the host's controllers are cgroup v1),
so limits, OOM kills and the slice reserve are tested here (DESIGN.md "VM"): the cached
container tree plus a kernel becomes a root image (cached by recipe hash, booted read-only
with -snapshot); each run adds a small payload disk with the farmnode wheel, the system
files and tests/vm/inside.py. A oneshot unit in the image installs the payload, runs the
scenarios, prints one JSON result line per scenario to the serial console, and powers off.

    python3 tools/vm.py build     # build (or reuse) the image
    python3 tools/vm.py run       # boot once and print the results
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import container

VM_RECIPE_VERSION = "1"
RESULT_MARK = "FARMNODE-VM-RESULT "
DONE_MARK = "FARMNODE-VM-DONE"
KERNEL_PACKAGES = ["linux-image-amd64", "initramfs-tools", "e2fsprogs"]

RUNNER_UNIT = """\
[Unit]
Description=farmnode VM test run
After=multi-user.target dbus.service
Wants=dbus.service
RequiresMountsFor=/payload

[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh /payload/run.sh
ExecStopPost=/bin/systemctl poweroff --no-block

[Install]
WantedBy=multi-user.target
"""

PAYLOAD_MOUNT = """\
[Unit]
Description=farmnode VM test payload

[Mount]
What=/dev/vdb
Where=/payload
Type=ext4
Options=ro

[Install]
WantedBy=multi-user.target
"""

RUN_SH = """\
set -e
/opt/farmnode/bin/pip install -q --no-deps --no-index --force-reinstall /payload/farmnode-*.whl
sh /payload/src/tools/install-system.sh /payload/src /
# This tier proves what the kernel enforces; its GPUs have no driver on purpose and it has
# no network: the health checks (proven in the system tier) would keep the node from work.
rm -f /etc/systemd/system/farmnode-health.target
systemctl daemon-reload
systemctl reload dbus
systemctl start farmnode.service
/opt/farmnode/bin/python /payload/src/tests/vm/inside.py || true
echo FARMNODE-VM-DONE
"""


def _log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


def vm_hash() -> str:
    h = hashlib.sha256((container.recipe_hash() + VM_RECIPE_VERSION).encode())
    h.update(" ".join(KERNEL_PACKAGES).encode())
    h.update((RUNNER_UNIT + PAYLOAD_MOUNT).encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    root: Path
    kernel: Path
    initrd: Path


def ensure_image() -> Image:
    out = container.CACHE_ROOT / f"vm-{vm_hash()}"
    image = Image(out / "root.img", out / "vmlinuz", out / "initrd.img")
    if (out / ".complete").exists():
        return image
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 not found: run 'make apt' (qemu-system-x86)")
    tree = container.ensure_tree()
    work = container.CACHE_ROOT / f"vm-building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    vmtree = work / "tree"
    _log(f"building {out} (kernel into a copy of the tree, about two minutes)")
    t0 = time.monotonic()
    subprocess.run(["cp", "-a", "--reflink=auto", str(tree), str(vmtree)], check=True)
    nspawn = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(vmtree)]
    subprocess.run(
        [*nspawn, "/bin/sh", "-c",
         "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
         "--no-install-recommends " + " ".join(KERNEL_PACKAGES) + " >/dev/null && "
         "apt-get clean && rm -rf /var/lib/apt/lists/*"],
        check=True,
    )
    (vmtree / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (vmtree / "etc/systemd/system/farmnode-vmtest.service").write_text(RUNNER_UNIT)
    (vmtree / "etc/systemd/system/payload.mount").write_text(PAYLOAD_MOUNT)
    wants = vmtree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("farmnode-vmtest.service", "payload.mount"):
        (wants / unit).unlink(missing_ok=True)
        os.symlink(f"/etc/systemd/system/{unit}", wants / unit)
    for unit in ("serial-getty@ttyS0.service", "getty@tty1.service"):
        (vmtree / "etc/systemd/system" / unit).unlink(missing_ok=True)
        os.symlink("/dev/null", vmtree / "etc/systemd/system" / unit)
    kernel = sorted(vmtree.glob("boot/vmlinuz-*"))[-1]
    initrd = sorted(vmtree.glob("boot/initrd.img-*"))[-1]
    shutil.copy(kernel, work / "vmlinuz")
    shutil.copy(initrd, work / "initrd.img")
    subprocess.run(["mkfs.ext4", "-q", "-L", "farmnode-vm", "-d", str(vmtree),
                    str(work / "root.img"), "3G"], check=True)
    shutil.rmtree(vmtree)
    (work / ".complete").write_text(vm_hash() + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(work, out)
    for old in container.CACHE_ROOT.glob("vm-*"):
        if old != out and not old.name.startswith("vm-building"):
            shutil.rmtree(old, ignore_errors=True)
    _log(f"built {out} in {time.monotonic() - t0:.0f}s")
    return image


def build_payload(dest: Path) -> Path:
    """A small ext4 disk: the farmnode wheel and the source files the VM needs."""
    stage = dest / "payload"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    container.build_farmnode_wheel(stage / "wheel")
    for whl in (stage / "wheel").glob("*.whl"):
        shutil.move(str(whl), stage / whl.name)
    (stage / "wheel").rmdir()
    src = stage / "src"
    for part in ("units", "dbus", "etc", "tools/install-system.sh", "tests/vm/inside.py"):
        target = src / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if (container.REPO / part).is_dir():
            shutil.copytree(container.REPO / part, target)
        else:
            shutil.copy(container.REPO / part, target)
    (stage / "run.sh").write_text(RUN_SH)
    img = dest / "payload.img"
    img.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(stage), str(img), "64M"], check=True)
    return img


def run(timeout: float = 900) -> tuple[dict[str, dict[str, object]], str]:
    """Boot the VM once; the scenarios' results by name, and the console log."""
    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="farmnode-vm-") as tmp:
        payload = build_payload(Path(tmp))
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", "2", "-nographic",
            "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0",
            "-drive", f"file={image.root},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={payload},format=raw,if=virtio,readonly=on",
        ]
        t0 = time.monotonic()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
        console = proc.stdout
        _log(f"VM ran {time.monotonic() - t0:.0f}s")
    results: dict[str, dict[str, object]] = {}
    for line in console.splitlines():
        if RESULT_MARK in line:
            rec = json.loads(line.split(RESULT_MARK, 1)[1])
            results[str(rec["scenario"])] = rec
    if DONE_MARK not in console:
        raise RuntimeError(f"the VM run did not finish; console tail:\n{console[-4000:]}")
    return results, console


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "build"
    if cmd == "build":
        print(ensure_image().root)
        return 0
    if cmd == "run":
        results, _ = run()
        print(json.dumps(results, indent=2))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
