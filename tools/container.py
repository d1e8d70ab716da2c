"""A real systemd to test against: a cached Debian 12 tree booted with systemd-nspawn.

Recipe (DESIGN.md "Testing against real systemd"): debootstrap a minbase bookworm tree with
systemd, dbus and python3, and put farmnode's Python dependencies into a venv at /opt/farmnode
inside it (from wheels downloaded on the host, since pip inside the container cannot verify
the package index's TLS here). The tree is cached under CACHE_ROOT keyed by a hash of this
recipe and of the dependency list, so it is rebuilt only when either changes.

Each boot uses --volatile=overlay: a tmpfs over the pristine tree, gone at power-off, so
several containers can boot from one tree and each test session starts clean.

Used by tests/system (pytest fixture), bench/ and the demo; also a small CLI:
    python3 tools/container.py build            # build (or reuse) the cached tree
    python3 tools/container.py shell            # boot one and open a shell in it
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("FARMNODE_TEST_CACHE", "/var/cache/farmnode-test"))
MIRROR = os.environ.get("FARMNODE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
VENV = "/opt/farmnode"
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps", "iproute2",
    "util-linux", "libsystemd0",
    # Fleet control's far side: `farmnode -H` reaches a node's bus through sshd and
    # systemd-stdio-bridge, `-M` through systemd-machined.
    "openssh-server", "systemd-container",
    # pam_systemd: PAM logins register logind sessions (workstation mode's tests open some)
    "libpam-systemd",
]
# Bump when the recipe changes in a way the hash of the lists above would not show.
RECIPE_VERSION = "2"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _log(msg: str) -> None:
    print(f"[container] {msg}", file=sys.stderr, flush=True)


def dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(" ".join(PACKAGES).encode())
    h.update("\n".join(dependencies()).encode())
    return h.hexdigest()[:12]


def build_wheelhouse(dest: Path) -> None:
    """Wheels for the container's Python 3.11 (cp311, manylinux), fetched by the host's pip."""
    dest.mkdir(parents=True, exist_ok=True)
    binary = [d for d in dependencies() if not d.startswith("systemd-python")]
    source = [d for d in dependencies() if d.startswith("systemd-python")]
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "download", "--only-binary=:all:", "--python-version", "3.11",
         "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "-d", str(dest), *binary],
        check=True,
    )
    # systemd-python ships only an sdist: build it here against the host's libsystemd
    # (Debian 12, the same as the container's).
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), *source], check=True)


def ensure_tree() -> Path:
    """The cached tree for the current recipe, built if missing."""
    tree = CACHE_ROOT / f"tree-{recipe_hash()}"
    if (tree / ".farmnode-tree-complete").exists():
        return tree
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run 'make apt' (debootstrap systemd-container)")
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    work = CACHE_ROOT / f"building-{recipe_hash()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    _log(f"building {tree} (debootstrap, about a minute)")
    t0 = time.monotonic()
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), "bookworm",
         str(work), MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )
    wheelhouse = CACHE_ROOT / f"wheelhouse-{recipe_hash()}"
    if not any(wheelhouse.glob("*.whl")):
        build_wheelhouse(wheelhouse)
    nspawn = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(work),
              f"--bind-ro={wheelhouse}:/wheelhouse"]
    subprocess.run([*nspawn, "python3", "-m", "venv", VENV], check=True)
    subprocess.run(
        [*nspawn, f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
         "/wheelhouse", *dependencies()],
        check=True,
    )
    # Users the tests need: a job user, an admin in group farmnode, and an outsider.
    script = (
        "groupadd --system farmnode && useradd --system --no-create-home -s /usr/sbin/nologin "
        "-g farmnode farmnode-api && useradd -m jobuser && useradd -m -G farmnode artist && "
        "useradd -m guest && echo farmnode-test > /etc/hostname"
    )
    subprocess.run([*nspawn, "/bin/sh", "-c", script], check=True)
    # Nothing in the test tree should wait on the network or a getty.
    masked = ("getty@tty1.service", "console-getty.service",
              "systemd-networkd-wait-online.service")
    for unit in masked:
        (work / "etc/systemd/system" / unit).unlink(missing_ok=True)
        os.symlink("/dev/null", work / "etc/systemd/system" / unit)
    # Most containers share the host's network: an sshd there would take the host's port 22.
    # The tests that want one start it in their own network namespace.
    (work / "etc/systemd/system/multi-user.target.wants/ssh.service").unlink(missing_ok=True)
    (work / "etc/systemd/system/sshd.service").unlink(missing_ok=True)
    (work / ".farmnode-tree-complete").write_text(recipe_hash() + "\n")
    try:
        os.rename(work, tree)
    except OSError:
        # Another test run built the same recipe meanwhile: keep theirs.
        shutil.rmtree(work, ignore_errors=True)
        if not (tree / ".farmnode-tree-complete").exists():
            raise
    for old in CACHE_ROOT.glob("tree-*"):
        if old != tree and old.is_dir():
            _remove_unused_tree(old)
    _log(f"built {tree} in {time.monotonic() - t0:.0f}s")
    return tree


def _tree_lock(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.lock")


@contextlib.contextmanager
def using_tree(tree: Path) -> Iterator[None]:
    """A shared lock on the tree for as long as a container runs from it."""
    with open(_tree_lock(tree), "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


_host_net_depth = 0


@contextlib.contextmanager
def host_network() -> Iterator[None]:
    """An exclusive lock on the host's network for containers that share it.

    Such containers all bind the agent's port 50000 (and tests put masters on fixed ports), so
    two test runs on one machine (two checkouts, a bench beside a test) would take each other's
    ports. Re-entrant within a process: a test session boots a second container beside its
    first (the package test)."""
    global _host_net_depth
    if _host_net_depth:
        _host_net_depth += 1
        try:
            yield
        finally:
            _host_net_depth -= 1
        return
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / "host-network.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("waiting for another run's containers on the host network to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        _host_net_depth = 1
        try:
            yield
        finally:
            _host_net_depth = 0


def _remove_unused_tree(tree: Path) -> None:
    # Another run (a concurrent session whose recipe is older) may have containers booted
    # from it: deleting the tree under them broke them. Only a tree nobody holds goes.
    with open(_tree_lock(tree), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"kept {tree}: a container runs from it")
            return
        shutil.rmtree(tree, ignore_errors=True)
        _tree_lock(tree).unlink(missing_ok=True)


class CommandFailed(RuntimeError):
    pass


@dataclass
class Container:
    """One booted container; commands run inside it through nsenter."""

    name: str
    tree: Path
    binds: Sequence[tuple[Path, str]] = ()
    process: subprocess.Popen[bytes] | None = None
    leader: int = 0
    log_path: Path = field(default_factory=lambda: Path("/dev/null"))

    def boot(self, timeout: float = 60) -> None:
        self.log_path = CACHE_ROOT / f"{self.name}.console.log"
        argv = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(self.tree),
                "--volatile=overlay", "-M", self.name, "--console=passive", "--boot"]
        argv += [f"--bind-ro={src}:{dst}" for src, dst in self.binds]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(FileNotFoundError):
                children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
                kids = children.read_text().split()
                if kids:
                    self.leader = int(kids[0])
            if time.monotonic() > deadline:
                raise TimeoutError("container did not start")
            time.sleep(0.05)
        # 'is-system-running --wait' blocks until boot finished; it needs the bus up first,
        # so retry until it answers at all.
        while True:
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"container boot stuck in {state!r}: {r.stderr}")
            time.sleep(0.1)

    def argv(self, cmd: Sequence[str], user: str | None = None) -> list[str]:
        base = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i",
                f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]
        if user is not None:
            base += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "--reset-env", "--"]
        return base + list(cmd)

    def run(self, cmd: Sequence[str], *, check: bool = True, user: str | None = None,
            input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(cmd, user), input=input, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise CommandFailed(f"{list(cmd)} exited {r.returncode}\nstdout: {r.stdout[-3000:]}"
                                f"\nstderr: {r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **kw)  # type: ignore[arg-type]

    def popen(self, cmd: Sequence[str], user: str | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(cmd, user), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def shutdown(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def build_farmnode_wheel(dest: Path) -> Path:
    """farmnode itself as a wheel (seconds): installed into each booted container."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dest), str(REPO)], check=True, cwd=REPO)
    (wheel,) = dest.glob("farmnode-*.whl")
    return wheel


def install_farmnode(ct: Container, wheel_dir: str = "/wheels") -> None:
    """Install the wheel and the system files from the checkout bound at /src."""
    ct.sh(
        f"{VENV}/bin/pip install -q --no-deps --no-index --force-reinstall "
        f"{wheel_dir}/farmnode-*.whl\n"
        "sh /src/tools/install-system.sh /src /\n"
        "systemctl daemon-reload\n"
        "systemctl reload dbus\n"
    )


@contextlib.contextmanager
def booted(name: str, install: bool = True,
           binds: Sequence[tuple[Path, str]] = ()) -> Iterator[Container]:
    """A booted container; `install`: farmnode from this checkout (bound at /src), else a
    node with no farmnode and no source tree (the packages' tests and the demo)."""
    tree = ensure_tree()
    wheels = CACHE_ROOT / f"wheels-{name}"
    mounts = list(binds)
    if install:
        build_farmnode_wheel(wheels)
        mounts += [(REPO, "/src"), (wheels, "/wheels")]
    ct = Container(name=name, tree=tree, binds=mounts)
    with using_tree(tree), host_network():
        try:
            ct.boot()
            if install:
                install_farmnode(ct)
            yield ct
        finally:
            ct.shutdown()
            shutil.rmtree(wheels, ignore_errors=True)
            ct.log_path.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "build"
    if cmd == "build":
        print(ensure_tree())
        return 0
    if cmd == "shell":
        with booted(f"farmnode-shell-{os.getpid()}") as ct:
            return subprocess.call(ct.argv(["/bin/bash"]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
