"""System tier: one real systemd (nspawn container) per test session, farmnode installed
from this checkout as a wheel plus its units and D-Bus files, farmnode.service started."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from container import Container, booted

pytestmark = pytest.mark.system


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def ct() -> Iterator[Container]:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.fail("the system tier needs root and systemd-nspawn (make setup installs it)")
    with booted(f"farmnode-test-{os.getpid()}") as c:
        c.run(["systemctl", "start", "farmnode.service"])
        yield c


_ids = itertools.count(1000)


def next_task_ids(n: int) -> list[int]:
    return [next(_ids) for _ in range(n)]


def assignment(jobtype: str, data: dict[str, Any], frames: list[int], **job: Any) -> dict[str, Any]:
    """A PyFarm assignment with fresh task ids (tests share one agent)."""
    ids = next_task_ids(len(frames))
    job = {"id": ids[0] // 10, "by": 1, "data": data, **job}
    return {
        "job": job,
        "jobtype": {"name": jobtype, "version": 1},
        "tasks": [{"id": i, "frame": f} for i, f in zip(ids, frames, strict=True)],
    }


def farmnode(ct: Container, *args: str, user: str | None = None, check: bool = True,
             input: str | None = None) -> Any:
    return ct.run(["farmnode", *args], user=user, check=check, input=input)


def assign_taken(ct: Container, a: dict[str, Any], *options: str,
                 user: str | None = None) -> str:
    """`farmnode assign` until taken; its output. With a master, an assign is refused while a
    reannounce is unanswered (the node's view is in flight, as PyFarm's agent did): it says
    "try again", so it is asked again until it is taken."""
    deadline = time.monotonic() + 30
    while True:
        r = farmnode(ct, *options, "assign", "-", *(["--wait"] if "--json" in options else []),
                     input=json.dumps(a), user=user, check=False)
        # taken: it printed the assignment (--wait exits 1 when a task failed, as asked)
        if r.stdout or "try again" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.stdout, r.stderr
    return str(r.stdout)


def assign_wait(ct: Container, a: dict[str, Any], user: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(assign_taken(ct, a, "--json", user=user))
    return out


def journal(ct: Container, *match: str) -> list[dict[str, Any]]:
    ct.run(["journalctl", "--sync"])
    # --all: journalctl writes fields over 4 KiB as null otherwise
    r = ct.run(["journalctl", "-o", "json", "--all", "--no-pager", *match])
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def agent_pid(ct: Container) -> int:
    r = ct.run(["systemctl", "show", "-P", "MainPID", "farmnode.service"])
    return int(r.stdout.strip())


def agent_ready(ct: Container, not_pid: int = 0) -> None:
    """Until a new agent (not `not_pid`) has said READY=1.

    `systemctl start` waits for READY (Type=notify); right after a kill it may return at once
    (systemd has not reaped the old process yet) or fail (it merged with the crash), so it is
    asked again until the agent it reports is a new one."""
    for _ in range(200):
        r = ct.run(["systemctl", "start", "farmnode.service"], timeout=60, check=False)
        if r.returncode == 0 and agent_pid(ct) not in (0, not_pid):
            return
        # The tests restart far faster than any admin: keep systemd's start limit (50 in
        # 60 s) from stopping the unit for the rest of the minute.
        ct.run(["systemctl", "reset-failed", "farmnode.service"], check=False)
    log = ct.run(["journalctl", "-u", "farmnode.service", "-n", "40", "--no-pager"]).stdout
    raise AssertionError(f"the agent did not come back:\n{log}")


@contextmanager
def agent_config(ct: Container, yaml_text: str) -> Iterator[None]:
    """A conf.d drop-in for the duration of a test (the agent is restarted around it)."""
    path = "/etc/farmnode/conf.d/50-test.yaml"
    ct.sh(f"cat > {path} <<'EOF'\n{yaml_text}\nEOF")
    ct.run(["systemctl", "restart", "farmnode.service"])
    try:
        yield
    finally:
        ct.run(["rm", "-f", path])
        ct.run(["systemctl", "restart", "farmnode.service"])
