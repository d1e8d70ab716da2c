"""Interop tier: PyFarm's own 0.8.6 master (with its celery scheduler and redis, from
tools/pyfarm_master.py) as the peer, farmnode installed from its .deb in a booted Debian 12
container (tools/container.py), both on the host's network.

One container serves the whole session; each test gets a fresh master (empty database) and a
farmnode with an empty state directory pointed at it, so one test's agent id, outbox or
assignments never reach another test's master.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from container import Container, booted
from pyfarm_master import Master, free_port, running_master

REPO = Path(__file__).resolve().parents[2]
MASTER_LOG_DIR = "/var/lib/pyfarm-test/task_logs"

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/interop" in str(item.fspath):
            item.add_marker(pytest.mark.interop)
            # Also a system test: a plain `-m "not system"` host run leaves it out too.
            item.add_marker(pytest.mark.system)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30,
              interval: float = 0.05, detail: Callable[[], str] = lambda: "") -> Any:
    """check()'s first truthy result; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s\n{detail()}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    # The package's own build (lintian runs in the package tests, not here).
    subprocess.run([sys.executable, "packaging/build.py", "deb", "--release", "1", "--out",
                    str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    (path,) = out.glob("farmnode_*_amd64.deb")
    return path


@pytest.fixture(scope="session")
def node(deb: Path) -> Iterator[Container]:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.fail("the interop tier needs root and systemd-nspawn (make setup installs it)")
    with booted(f"farmnode-interop-{os.getpid()}", install=False,
                binds=[(deb.parent, "/pkgs")]) as ct:
        # The tree's own venv would be the package's: the package must bring everything.
        ct.sh("rm -rf /opt/farmnode")
        ct.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                f"/pkgs/{deb.name}"], timeout=300)
        yield ct


@dataclass
class Farm:
    master: Master
    node: Container
    agent_port: int

    # ---- the node ---------------------------------------------------------------------------
    def journal(self, unit: str = "farmnode.service", lines: int = 60) -> str:
        return self.node.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager"],
                             check=False).stdout

    def detail(self) -> str:
        return (f"--- farmnode ---\n{self.journal()}\n{self.master.logs_tail()}")

    def start_agent(self) -> float:
        """`systemctl start farmnode`; the monotonic time it was issued."""
        t0 = time.monotonic()
        self.node.run(["systemctl", "start", "farmnode.service"], timeout=60)
        return t0

    def status(self) -> dict[str, Any]:
        r = self.node.run(["farmnode", "--json", "status"])
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def node_tasks(self) -> list[dict[str, Any]]:
        r = self.node.run(["farmnode", "--json", "tasks"])
        got: list[dict[str, Any]] = json.loads(r.stdout)
        return got

    # ---- the master ---------------------------------------------------------------------
    def agents(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.master.get("/agents/")
        return got

    def agent(self) -> dict[str, Any]:
        """The master's full record of our (only) agent."""
        (a,) = wait_for("the master knows one agent", self.agents, detail=self.detail)
        row: dict[str, Any] = self.master.get(f"/agents/{a['id']}")
        return row

    def jobtype(self, name: str, max_batch: int = 1) -> None:
        self.master.jobtype(name, max_batch)

    def submit(self, jobtype: str, frames: int, data: dict[str, Any], **job: Any) -> int:
        return self.master.submit(jobtype, frames, data, **job)

    def job(self, job_id: int) -> dict[str, Any]:
        return self.master.job(job_id)

    def tasks(self, job_id: int) -> list[dict[str, Any]]:
        return self.master.tasks(job_id)

    def wait_job(self, job_id: int, states: tuple[str, ...] = ("done", "failed"),
                 timeout: float = 120) -> dict[str, Any]:
        return self.master.wait_job(job_id, states, timeout=timeout, detail=self.detail)

    def master_log(self) -> str:
        return self.master.log("master") + self.master.log("scheduler")


def configure(ct: Container, master: Master, agent_port: int, farm_name: str | None,
              extra: dict[str, Any] | None = None) -> None:
    settings: dict[str, Any] = {"master": f"127.0.0.1:{master.port}",
                                "agent_api_port": agent_port, **(extra or {})}
    if farm_name is not None:
        settings["farm_name"] = farm_name
    ct.run(["sh", "-ec", "mkdir -p /etc/farmnode/conf.d; cat > "
            "/etc/farmnode/conf.d/50-interop.yaml"], input=json.dumps(settings))


@pytest.fixture
def farm_factory(node: Container) -> Iterator[Callable[..., Farm]]:
    """farm(master_farm_name=None, agent_farm_name=None, start=True): a fresh master and a
    farmnode with no state pointed at it."""
    stack = contextlib.ExitStack()
    farms: list[Farm] = []

    def make(master_farm_name: str | None = None, agent_farm_name: str | None = None,
             start: bool = True, agent_settings: dict[str, Any] | None = None,
             master_env: dict[str, str] | None = None) -> Farm:
        master = stack.enter_context(running_master(farm_name=master_farm_name,
                                                    env=master_env or {}))
        port = free_port()
        configure(node, master, port, agent_farm_name, agent_settings)
        # farmnode-generator turns agent_api_port into the socket's ListenStream= at
        # daemon-reload.
        node.sh("systemctl daemon-reload; systemctl restart farmnode-api.socket")
        farm = Farm(master=master, node=node, agent_port=port)
        farms.append(farm)
        if start:
            farm.start_agent()
        return farm

    try:
        yield make
    finally:
        # The agent stops (and says offline) while its master still runs; then its state
        # goes, so the next test's master never sees this one's agent id or reports.
        node.run(["systemctl", "stop", "farmnode.service"], check=False, timeout=120)
        node.sh("rm -rf /var/lib/farmnode/* /etc/farmnode/conf.d/50-interop.yaml; "
                "systemctl reset-failed farmnode.service || true", check=False)
        stack.close()


@pytest.fixture
def farm(farm_factory: Callable[..., Farm]) -> Farm:
    return farm_factory()
