"""Per-task overhead of a job through a master: PyFarm 0.8.6's own against the test stub.

One job of `frames` one-second tasks (`command` job type running /bin/sleep 1), one task at a
time, through

- **the real master** (tools/pyfarm_master.py: PyFarm 0.8.6 with its celery scheduler and
  redis): the job is submitted over its REST API and its scheduler assigns each task, the
  next one when the agent reports the last done;
- **the stub** (tests/master_stub.py), which has no scheduler: this side plays PyFarm's, one
  task per assign (the job type's `max_batch` of 1) sent the moment the stub has received the
  previous task's `done`, with the body and User-Agent PyFarm's master sends and no
  credentials (the agent trusts its master's address, as it must trust PyFarm's).

The figures come from each master's own clock: the job's submission (the real master's
`time_submitted`; for the stub, just before the first assign) and each task's `running` and
`done` as the agent's reports arrive (the real master's task `time_started` /
`time_finished`; the request times at the stub). Per-task overhead is the time between one
task's `done` and the next's (the first counted from the submission) minus the task's own
run time (1 s): these add up to the job's wall time minus 20 times 1 s. `dispatch` (previous
`done` to this task's `running`: the scheduler, the assign, the scope start, the report) and
`run` (`running` to `done`, minus 1 s) split it; a `running` report that lags the process
start moves time from `run` to `dispatch` (so `run` can be negative), never the sum.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tools"), str(REPO)]

from container import Container  # noqa: E402
from pyfarm_master import Master, running_master  # noqa: E402

from bench.stats import percentile  # noqa: E402
from tests.master_stub import MasterStub, Request  # noqa: E402

COMMAND = ["/bin/sleep", "1"]
RUN_S = 1.0
DROPIN = "/etc/farmnode/conf.d/60-bench-overhead.yaml"
# The User-Agent PyFarm's master sends with an assign (protocol transcript).
MASTER_UA = "PyFarm/1.0 (master)"
# Stub task ids far above any the other steps or the real master use.
STUB_FIRST_ID = 9_000_000
# PyFarm's own cadences (pyfarm/scheduler: the periodic assignment pass, the agent polls),
# not the interop tier's faster ones: the figure is what a farm left at its defaults sees.
# Assignment after a task's `done` does not wait for any of them.
PYFARM_DEFAULTS = {"PYFARM_SCHEDULER_INTERVAL": "240", "PYFARM_AGENTS_POLL_INTERVAL": "30",
                   "PYFARM_POLL_IDLE_AGENTS_INTERVAL": "3600"}


def overhead(submitted: float, started: Sequence[float], finished: Sequence[float],
             run_s: float = RUN_S) -> dict[str, Any]:
    """Per-task overhead from one master's timestamps (seconds, any one clock): task i's
    `started[i]` and `finished[i]`, taken in the order the tasks finished (one at a time)."""
    if not finished or len(started) != len(finished):
        raise ValueError("one start and one finish per task")
    order = sorted(range(len(finished)), key=lambda i: finished[i])
    per_task, dispatch, run = [], [], []
    previous = submitted
    for i in order:
        if not previous <= started[i] <= finished[i]:
            raise ValueError(f"task {i} overlaps the one before it or the submission")
        per_task.append(finished[i] - previous - run_s)
        dispatch.append(started[i] - previous)
        run.append(finished[i] - started[i] - run_s)
        previous = finished[i]
    wall = previous - submitted
    return {"tasks": len(per_task), "run_s": run_s, "wall_s": wall,
            "per_task_s": per_task, "dispatch_s": dispatch, "run_extra_s": run,
            "mean_s": (wall - run_s * len(per_task)) / len(per_task),
            "p50_s": percentile(per_task, 50), "p95_s": percentile(per_task, 95)}


def master_time(stamp: str) -> float:
    """A PyFarm timestamp (naive UTC, ISO 8601) as seconds since the epoch."""
    parsed = datetime.datetime.fromisoformat(stamp)
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


# ---- the node --------------------------------------------------------------------------------
def point_agent_at(ct: Container, master_port: int) -> None:
    """farmnode with an empty state directory (no agent id, outbox or task ids carried from
    one master to the other) pointed at the master on 127.0.0.1:master_port."""
    ct.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    ct.sh("rm -rf /var/lib/farmnode/*; systemctl reset-failed farmnode.service || true")
    ct.run(["tee", DROPIN], input=f"master: 127.0.0.1:{master_port}\n")
    # the master's address may be in the socket's IPAddressAllow= (farmnode-generator)
    ct.sh("systemctl daemon-reload; systemctl restart farmnode-api.socket")
    ct.run(["systemctl", "start", "farmnode.service"], timeout=60)


def restore_agent(ct: Container) -> None:
    ct.run(["systemctl", "stop", "farmnode.service"], check=False, timeout=120)
    ct.sh(f"rm -rf /var/lib/farmnode/* {DROPIN}; systemctl reset-failed farmnode.service "
          "|| true; systemctl daemon-reload; systemctl restart farmnode-api.socket", check=False)
    ct.run(["systemctl", "start", "farmnode.service"], timeout=60)


# ---- the real master ------------------------------------------------------------------------
def _online_agent(master: Master, port: int) -> bool:
    # the listing has no state: each agent's own record does (earlier rounds' are offline)
    return any(master.get(f"/agents/{a['id']}").get("state") == "online"
               for a in master.get("/agents/") if a.get("port") == port)


def real_run(ct: Container, master: Master, agent_port: int, frames: int) -> dict[str, Any]:
    t_switch = time.monotonic()
    point_agent_at(ct, master.port)
    switched = time.monotonic() - t_switch
    deadline = time.monotonic() + 30
    while not _online_agent(master, agent_port):  # the master has no event to wait on
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent never came online at the master\n"
                               f"{master.logs_tail()}")
        time.sleep(0.05)
    online = time.monotonic() - t_switch
    t0 = time.time()
    job_id = master.submit("command", frames, {"command": COMMAND}, requeue=0)
    job = master.wait_job(job_id, timeout=frames * 30, interval=0.05)
    host_wall = time.time() - t0
    tasks = master.tasks(job_id)
    bad = [t for t in tasks if t["state"] != "done"]
    if job["state"] != "done" or bad:
        raise RuntimeError(f"job {job_id} {job['state']}; not done: {bad[:3]}")
    out = overhead(master_time(job["time_submitted"]),
                   [master_time(t["time_started"]) for t in tasks],
                   [master_time(t["time_finished"]) for t in tasks])
    out["host_wall_s"] = host_wall
    out["attempts"] = sorted({int(t["attempts"]) for t in tasks})
    out["switch_s"], out["ready_s"] = switched, online
    return out


# ---- the stub, with this side as its scheduler ----------------------------------------------
def _assign(agent_port: int, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{agent_port}/api/v1/assign", data=json.dumps(body).encode(),
        method="POST", headers={"Content-Type": "application/json", "User-Agent": MASTER_UA})
    with urllib.request.urlopen(req, timeout=30) as resp:
        if resp.status != 202:
            raise RuntimeError(f"assign: {resp.status} {resp.read()[:300]!r}")


def _report(stub: MasterStub, task_id: int, state: str) -> Request:
    def seen(rs: list[Request]) -> bool:
        return any(_reports(r, task_id, state) for r in rs)
    stub.wait_for(seen, timeout=60, what=f"task {task_id} {state}")
    return next(r for r in stub.requests if _reports(r, task_id, state))


def _reports(r: Request, task_id: int, state: str) -> bool:
    return (r.kind == "task" and r.task_id == task_id and r.status == 200
            and isinstance(r.body, dict) and r.body.get("state") == state)


def stub_run(ct: Container, agent_port: int, frames: int) -> dict[str, Any]:
    with MasterStub() as stub:
        t_switch = time.monotonic()
        point_agent_at(ct, stub.port)
        switched = time.monotonic() - t_switch
        stub.wait_count("announce", 1, timeout=30)
        online = time.monotonic() - t_switch
        job_id = STUB_FIRST_ID
        ids = [STUB_FIRST_ID + k for k in range(1, frames + 1)]
        job = {"id": job_id, "title": "bench overhead", "data": {"command": COMMAND},
               "by": 1.0, "batch": 1, "cpus": 1, "ram": 32, "ram_max": None,
               "ram_warning": None, "priority": 0, "environ": {}, "tags": [], "notes": "",
               "notified_users": []}
        t0 = time.time()
        submitted = time.monotonic()
        for frame, task_id in enumerate(ids, 1):
            _assign(agent_port, {"job": job, "jobtype": {"name": "command", "version": 1},
                                 "tasks": [{"id": task_id, "frame": float(frame),
                                            "attempt": 1}]})
            _report(stub, task_id, "done")
        host_wall = time.time() - t0
        out = overhead(submitted, [_report(stub, i, "running").at for i in ids],
                       [_report(stub, i, "done").at for i in ids])
        # stopped while the stub still answers: a stopping agent tells its master `offline`
        # and, with the master gone, waits out that report before it stops
        ct.run(["systemctl", "stop", "farmnode.service"], timeout=120)
    out["host_wall_s"] = host_wall
    out["switch_s"], out["ready_s"] = switched, online
    return out


# ---- the step ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _restored(ct: Container) -> Iterator[None]:
    try:
        yield
    finally:
        restore_agent(ct)


def measure(ct: Container, agent_port: int, frames: int = 20, reps: int = 1,
            log: Any = print) -> dict[str, Any]:
    """`reps` rounds, each one job through the real master then one through the stub."""
    runs: dict[str, list[dict[str, Any]]] = {"real": [], "stub": []}
    t0 = time.monotonic()
    with running_master(env=PYFARM_DEFAULTS) as master, _restored(ct):
        started = time.monotonic() - t0
        for rep in range(reps):
            log(f"    round {rep + 1}/{reps}: the real master")
            runs["real"].append(real_run(ct, master, agent_port, frames))
            log(f"    round {rep + 1}/{reps}: the stub")
            runs["stub"].append(stub_run(ct, agent_port, frames))
    return {"frames": frames, "command": COMMAND, "reps": reps, "master_start_s": started,
            "master_env": PYFARM_DEFAULTS,
            "clock": "each master's own: job time_submitted, task time_started/time_finished "
                     "(real); request arrival at the stub (stub)",
            "runs": runs}
