"""The packages ([5]): the .deb installed with apt on a node that has no farmnode and no
source tree, driven over HTTP and busctl, upgraded under a running task, purged; the .rpm's
files, scriptlets and dependencies read back with rpm (no RPM-based system boots here).

The container tree comes with the farmnode group and the farmnode-api user (the other tests
need them); they are deleted first, so that the package's own sysusers.d file creates them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from container import Container, booted

from tests.system.conftest import assignment

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
TOKEN = "tok-" + uuid.uuid4().hex
UNITS = ["farmnode.service", "farmnode-api.socket", "farmnode-api.service", "farmnode.slice"]
# What the filesystem snapshot ignores: the package manager's own records, logs and caches,
# and the account databases (the accounts stay on purge, by Debian's convention).
SNAPSHOT_SKIP = (
    "/proc", "/sys", "/dev", "/run", "/tmp", "/var/log", "/var/cache/apt", "/var/cache/debconf",
    "/var/lib/apt", "/var/lib/dpkg", "/var/lib/systemd/catalog", "/var/lib/systemd/timers",
    "/var/tmp", "/etc/ld.so.cache",
)
ACCOUNT_FILES = {f"/etc/{n}{s}" for n in ("passwd", "group", "shadow", "gshadow")
                 for s in ("", "-")}


@dataclass
class Packages:
    deb: Path
    deb_next: Path
    rpm: Path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    out = tmp_path_factory.mktemp("packages")
    # `make deb rpm` is the real interface: it builds, then runs lintian and rpmlint, and fails
    # on any error either reports.
    subprocess.run(["make", "-s", "--no-print-directory", "deb", "rpm", f"PKG_OUT={out}"],
                   cwd=REPO, check=True)
    subprocess.run([sys.executable, "packaging/build.py", "deb", "--release", "2", "--out",
                    str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    pkgs = Packages(deb=out / f"farmnode_{VERSION}-1_amd64.deb",
                    deb_next=out / f"farmnode_{VERSION}-2_amd64.deb",
                    rpm=out / f"farmnode-{VERSION}-1.x86_64.rpm")
    for p in (pkgs.deb, pkgs.deb_next, pkgs.rpm):
        print(f"\n{p.name}: {p.stat().st_size / 1e6:.2f} MB")
    return pkgs


@pytest.fixture(scope="module")
def node(packages: Packages) -> Iterator[Container]:
    with booted(f"farmnode-pkg-{os.getpid()}", install=False,
                binds=[(packages.deb.parent, "/pkgs")]) as ct:
        ct.sh("rm -rf /opt/farmnode; userdel farmnode-api; groupdel farmnode")
        assert ct.run(["test", "-e", "/src"], check=False).returncode != 0
        yield ct


def snapshot(ct: Container) -> set[str]:
    prune = " -o ".join(f"-path {p}" for p in SNAPSHOT_SKIP)
    out = ct.sh(f"find / -xdev \\( {prune} \\) -prune -o -print").stdout
    return set(out.splitlines()) - ACCOUNT_FILES


def apt(ct: Container, *args: str) -> float:
    t0 = time.monotonic()
    ct.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", *args], timeout=300)
    return time.monotonic() - t0


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def busctl_assign(ct: Container, a: dict[str, object]) -> str:
    r = ct.run(["busctl", "call", "org.farmnode.Agent1", "/org/farmnode/Agent1",
                "org.farmnode.Agent1", "Assign", "s", json.dumps(a)])
    m = re.fullmatch(r's "([0-9a-f-]+)"\s*', r.stdout)
    assert m, r.stdout
    return str(m.group(1))


def task_state(ct: Container, task_id: int) -> dict[str, object]:
    tasks = json.loads(ct.run(["farmnode", "--json", "tasks"]).stdout)
    (t,) = [t for t in tasks if t["id"] == task_id]
    return dict(t)


def test_deb_install_use_upgrade_purge(node: Container, packages: Packages) -> None:
    ct = node
    before = snapshot(ct)
    # The farm's provisioning drops site settings first: the API on a free port (the
    # container shares the host's network).
    port = free_port()
    ct.sh(f"mkdir -p /etc/farmnode/conf.d && echo 'agent_api_port: {port}' "
          "> /etc/farmnode/conf.d/50-site.yaml")

    t0 = time.monotonic()
    install_s = apt(ct, "install", f"/pkgs/{packages.deb.name}")
    # accounts from the package's sysusers.d; the token file root-only; the agent enabled, the
    # API units static (the agent's unit wants them); nothing started, so the port is closed
    assert ct.run(["id", "-nG", "farmnode-api"]).stdout.split() == ["farmnode"]
    assert ct.run(["stat", "-c", "%a %U", "/etc/farmnode/tokens"]).stdout.split() == ["600",
                                                                                      "root"]
    enabled = ct.run(["systemctl", "is-enabled", "farmnode.service", "farmnode-api.socket"])
    assert enabled.stdout.split() == ["enabled", "static"]
    assert ct.run(["systemctl", "is-active", "farmnode-api.socket"],
                  check=False).stdout.strip() == "inactive"
    assert ct.run(["systemctl", "is-active", "farmnode.service"],
                  check=False).stdout.strip() == "inactive"
    for path in ("/usr/share/man/man8/farmnode.8.gz", "/usr/share/man/man5/farmnode.yaml.5.gz",
                 "/usr/share/bash-completion/completions/farmnode",
                 "/usr/share/dbus-1/system.d/org.farmnode.Agent1.conf",
                 "/lib/systemd/system-generators/farmnode-generator"):
        ct.run(["test", "-e", path])
    conffiles = ct.run(["dpkg-query", "-W", "-f", "${Conffiles}", "farmnode"]).stdout
    assert "/etc/farmnode/farmnode.yaml" in conffiles
    # --man=no: the node has no man(1) to look up Documentation=; the pages' files are above
    verify = ct.run(["systemd-analyze", "verify", "--man=no", *UNITS], check=False)
    assert verify.returncode == 0 and not verify.stdout.strip(), verify.stdout + verify.stderr

    # first contact: start the agent, one job over HTTP, one over busctl
    # The token is the API's credential, copied when the API starts (with the agent): a token
    # added later counts once farmnode-api.service is restarted (further below).
    ct.sh(f"echo {TOKEN} >> /etc/farmnode/tokens")
    ct.run(["systemctl", "start", "farmnode"])
    http_job = assignment("fakerender", {"duration": 0.2, "lines": 2}, [1, 2])
    r = requests.post(f"http://127.0.0.1:{port}/api/v1/assign", json=http_job, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    ct.run(["farmnode", "wait", r.json()["id"]])
    first_task_s = time.monotonic() - t0
    bus_job = assignment("fakerender", {"duration": 0.2, "lines": 2}, [3])
    ct.run(["farmnode", "wait", busctl_assign(ct, bus_job)])
    for job in (http_job, bus_job):
        task = job["tasks"][0]["id"]
        assert task_state(ct, task)["state"] == "done"
        ct.run(["journalctl", "--sync"])
        log = ct.run(["journalctl", "-u", f"farmnode-task-{task}.scope", "-o", "cat"]).stdout
        assert re.search(r"fakerender: frame \d+ done", log), log

    check_completion(ct, [j["tasks"][0]["id"] for j in (http_job, bus_job)])

    # a token added to the running node counts once the API is restarted, as the man page says
    later = "tok-" + uuid.uuid4().hex
    ct.sh(f"echo {later} >> /etc/farmnode/tokens")
    ct.run(["systemctl", "restart", "farmnode-api.service"])
    # past the credentials check (401) to the body's (400)
    r = requests.post(f"http://127.0.0.1:{port}/api/v1/assign", json={}, timeout=30,
                      headers={"Authorization": f"Bearer {later}"})
    assert r.status_code == 400, r.text

    # upgrade while a task runs: the task finishes done, in the scope it started in
    gate = "/run/farmnode-test-upgraded"
    script = (f"echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after")
    long_job = assignment("command", {"command": ["/bin/sh", "-c", script]}, [1])
    long_task = long_job["tasks"][0]["id"]
    aid = busctl_assign(ct, long_job)
    ct.run(["farmnode", "wait", aid, "--until", "running"])
    scope = f"farmnode-task-{long_task}.scope"

    def scope_started() -> str:
        return str(ct.run(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                           scope]).stdout.strip())

    started = scope_started()
    agent_before = ct.run(["systemctl", "show", "-P", "MainPID", "farmnode"]).stdout.strip()
    upgrade_s = apt(ct, "install", f"/pkgs/{packages.deb_next.name}")
    assert ct.run(["dpkg-query", "-W", "-f", "${Version}", "farmnode"]).stdout == f"{VERSION}-2"
    agent_after = ct.run(["systemctl", "show", "-P", "MainPID", "farmnode"]).stdout.strip()
    assert agent_after not in ("0", agent_before), "the upgrade did not restart the agent"
    assert task_state(ct, long_task)["state"] == "running"
    assert scope_started() == started
    ct.run(["touch", gate])
    ct.run(["farmnode", "wait", aid])
    assert task_state(ct, long_task)["state"] == "done"
    ct.run(["journalctl", "--sync"])
    log = ct.run(["journalctl", "-u", scope, "-o", "cat"]).stdout.splitlines()
    assert [ln for ln in log if ln in ("before", "after")] == ["before", "after"], log

    # purge: the agent stops, and nothing but the accounts is left
    apt(ct, "purge", "farmnode")
    units = ct.run(["systemctl", "list-unit-files", "farmnode*", "--no-legend"], check=False)
    assert units.stdout == "", units.stdout
    assert ct.run(["getent", "group", "farmnode"]).returncode == 0
    left = snapshot(ct) - before
    gone = before - snapshot(ct)
    assert not left and not gone, f"left behind: {sorted(left)}; removed: {sorted(gone)}"
    print(f"\napt install {install_s:.1f} s; install to first task done {first_task_s:.1f} s; "
          f"upgrade under a running task {upgrade_s:.1f} s")


COMPLETE = r"""
# bash-completion's _init_completion, reduced to what the farmnode completion uses
_init_completion() { COMPREPLY=(); words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD;
                     cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}; }
_filedir() { :; }
. /usr/share/bash-completion/completions/farmnode
for line in "$@"; do
    read -ra COMP_WORDS <<< "$line"; [[ $line == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _farmnode; echo "${COMPREPLY[*]}"
done
"""


def check_completion(ct: Container, task_ids: list[int]) -> None:
    lines = ["farmnode st", "farmnode --json ta", "farmnode cancel ", "farmnode wait x --until ",
             "farmnode state "]
    out = ct.run(["bash", "-c", COMPLETE, "complete", *lines]).stdout.splitlines()
    assert out[0].split() == ["status", "state"] and out[1] == "tasks", out
    assert {str(t) for t in task_ids} <= set(out[2].split()), out
    assert out[3:] == ["running finished", "online disabled"], out


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], check=True, capture_output=True,
                          text=True).stdout


def test_rpm_files_scriptlets_dependencies(packages: Packages) -> None:
    files = set(rpm_query(packages.rpm, "-l").split())
    for path in (
        "/usr/lib/systemd/system/farmnode.service", "/usr/lib/systemd/system/farmnode-api.socket",
        "/usr/lib/systemd/system/farmnode-api.service", "/usr/lib/systemd/system/farmnode.slice",
        "/usr/lib/systemd/system-generators/farmnode-generator",
        "/usr/lib/systemd/system-preset/50-farmnode.preset", "/usr/lib/sysusers.d/farmnode.conf",
        "/usr/share/dbus-1/system.d/org.farmnode.Agent1.conf",
        "/usr/share/dbus-1/system-services/org.farmnode.Agent1.service",
        "/etc/farmnode/farmnode.yaml", "/usr/share/man/man8/farmnode.8.gz",
        "/usr/share/man/man5/farmnode.yaml.5.gz", "/usr/bin/farmnode",
        "/usr/share/bash-completion/completions/farmnode", "/opt/farmnode/bin/farmnode",
        "/opt/farmnode/bin/gunicorn",
    ):
        assert path in files, path
    assert not any(f.startswith("/lib/") or "__pycache__" in f for f in files)
    flags = rpm_query(packages.rpm, "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]")
    assert re.search(r"^cn /etc/farmnode/farmnode.yaml$", flags, re.M), "not %config(noreplace)"
    links = rpm_query(packages.rpm, "--qf", "[%{FILENAMES} -> %{FILELINKTOS}\n]")
    assert "/opt/farmnode/bin/python3 -> /usr/bin/python3.11" in links

    requires = set(rpm_query(packages.rpm, "-R").splitlines())
    assert {"/usr/bin/python3.11", "systemd", "dbus", "libsystemd.so.0()(64bit)",
            "libc.so.6()(64bit)"} <= {r.strip() for r in requires}

    scripts = rpm_query(packages.rpm, "--scripts")
    pre, post, preun, postun = (
        scripts.split(f"{name} scriptlet (using /bin/sh):\n")[1].split(" scriptlet (using")[0]
        for name in ("preinstall", "postinstall", "preuninstall", "postuninstall"))
    assert "systemd-sysusers" in pre and "u farmnode-api -:farmnode" in pre
    assert "systemctl --no-reload preset farmnode.service " in post
    # nothing starts before `systemctl start farmnode`
    assert not any("systemctl start" in line for line in post.splitlines()
                   if not line.lstrip().startswith("#"))
    # only an erase stops the agent (which stops tasks); an upgrade try-restarts it
    assert re.search(r'if \[ "\$1" -eq 0 \]; then\s+systemctl --no-reload disable --now', preun)
    assert re.search(r'if \[ "\$1" -ge 1 \]; then\s+systemctl try-restart farmnode.service',
                     postun)
    for script in (pre, post, preun, postun):
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)
